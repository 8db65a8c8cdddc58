"""What a policy sees: plain, frozen data measured by the health monitor.

A snapshot is the only input of a policy besides the step, so it holds
floats and names, never tensors or modules: the same snapshot gives the same
decision on every rank and in every replay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adaprec.plan import PrecisionPlan

__all__ = ["TensorStats", "Snapshot"]


def _finite_or_str(v: float) -> float | str:
    """JSON has no inf/NaN; spell them as strings so to_dict() output always dumps."""
    return v if math.isfinite(v) else str(v)


@dataclass(frozen=True)
class TensorStats:
    """Quantization health of one tensor role of one module, per format.

    ``sqnr_db[f]``: signal to quantization noise ratio (dB) if the tensor were
    cast to format ``f`` (``inf`` when exact). ``overflow_frac[f]``: fraction
    of values that would saturate. ``underflow_frac[f]``: fraction of nonzero
    values that would become zero. ``scaling[f]``: the scaling the figure was
    measured under (a policy assigning ``f`` uses the same). ``current``: the
    format the tensor was in when measured.
    """

    amax: float
    sqnr_db: Mapping[str, float] = field(default_factory=dict)
    overflow_frac: Mapping[str, float] = field(default_factory=dict)
    underflow_frac: Mapping[str, float] = field(default_factory=dict)
    scaling: Mapping[str, str] = field(default_factory=dict)
    current: str = ""
    numel: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "amax": _finite_or_str(self.amax),
            "sqnr_db": {k: _finite_or_str(v) for k, v in self.sqnr_db.items()},
            "overflow_frac": dict(self.overflow_frac),
            "underflow_frac": dict(self.underflow_frac),
            "scaling": dict(self.scaling),
            "current": self.current,
            "numel": self.numel,
        }


@dataclass(frozen=True)
class Snapshot:
    """Everything a policy may look at when it decides at ``step``.

    ``loss`` is the latest loss; ``loss_ema`` the trend *before* it (so a
    spike does not hide in its own average); ``loss_history`` the last losses
    (oldest first); ``epoch_losses`` the mean loss of every completed epoch.
    ``modules[fqn][role]`` holds :class:`TensorStats` on sampled steps and is
    empty otherwise. ``grad_diversity`` (MuPPET) is per module;
    ``model_grad_diversity`` pools all modules.
    """

    step: int
    epoch: int
    plan: PrecisionPlan
    loss: float | None = None
    loss_ema: float | None = None
    loss_history: tuple[float, ...] = ()
    epoch_losses: tuple[float, ...] = ()
    nonfinite: bool = False
    overflowed: tuple[str, ...] = ()
    # where the inf/NaN was seen: "loss" (the forward pass), "gradients", or "cast" (a tensor met a cast)
    nonfinite_cause: str = ""
    modules: Mapping[str, Mapping[str, TensorStats]] = field(default_factory=dict)
    grad_norm: Mapping[str, float] = field(default_factory=dict)
    grad_diversity: Mapping[str, float] = field(default_factory=dict)
    model_grad_diversity: float | None = None
    shadow: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def sampled(self) -> bool:
        """True when tensor statistics were measured for this snapshot."""
        return bool(self.modules)

    def stats(self, module: str, role: str) -> TensorStats | None:
        return self.modules.get(module, {}).get(role)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "plan": self.plan.to_dict(),
            "loss": self.loss,
            "loss_ema": self.loss_ema,
            "loss_history": list(self.loss_history),
            "epoch_losses": list(self.epoch_losses),
            "nonfinite": self.nonfinite,
            "overflowed": list(self.overflowed),
            "nonfinite_cause": self.nonfinite_cause,
            "modules": {m: {r: s.to_dict() for r, s in roles.items()} for m, roles in self.modules.items()},
            "grad_norm": dict(self.grad_norm),
            "grad_diversity": dict(self.grad_diversity),
            "model_grad_diversity": self.model_grad_diversity,
            "shadow": {m: list(v) for m, v in self.shadow.items()},
        }
