"""Optimizer state kept in narrow storage for real (the plan's ``optimizer_state`` role)."""

from adaprec.optim.narrow_state import (
    DEFAULT_MIN_NUMEL,
    MomentFormats,
    NarrowOptimizerState,
    adam_update_,
    moment_formats,
    sgd_update_,
)

__all__ = [
    "NarrowOptimizerState",
    "MomentFormats",
    "moment_formats",
    "adam_update_",
    "sgd_update_",
    "DEFAULT_MIN_NUMEL",
]
