"""Applying a precision plan to a live model, op by op: native kernels where the device has them, emulation elsewhere."""

from adaprec.engine.counter import MacCounter
from adaprec.engine.engine import BACKENDS, PrecisionEngine
from adaprec.engine.execution import Capabilities
from adaprec.engine.saved import SavedTensorStorage
from adaprec.engine.saved_bytes import SavedBytes

__all__ = ["PrecisionEngine", "BACKENDS", "Capabilities", "MacCounter", "SavedTensorStorage", "SavedBytes"]
