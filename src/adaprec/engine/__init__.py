"""Applying a precision plan to a live model: emulation and native execution."""

from adaprec.engine.engine import BACKENDS, PrecisionEngine, find_quantizable

__all__ = ["PrecisionEngine", "find_quantizable", "BACKENDS"]
