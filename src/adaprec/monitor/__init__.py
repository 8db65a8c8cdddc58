"""Per-layer numerical health, measured cheaply during training."""

from adaprec.monitor.health import HealthMonitor, ReduceFn
from adaprec.monitor.snapshot import Snapshot, TensorStats
from adaprec.monitor.stats import (
    DEFAULT_CANDIDATES,
    FIXED_POINT_CANDIDATES,
    amax,
    candidate_scaling,
    evaluate,
    overflow_frac,
    pow2_scale,
    sqnr_db,
    underflow_frac,
)

__all__ = [
    "HealthMonitor",
    "ReduceFn",
    "Snapshot",
    "TensorStats",
    "DEFAULT_CANDIDATES",
    "FIXED_POINT_CANDIDATES",
    "amax",
    "candidate_scaling",
    "evaluate",
    "overflow_frac",
    "pow2_scale",
    "sqnr_db",
    "underflow_frac",
]
