"""Dynamic loss scaling, one scale per named parameter group.

Small gradients underflow in narrow formats (fp16, fp8). Multiplying the
loss by a large scale shifts the gradients up into range; the optimizer sees
them divided back. The scale is found on line, as torch.amp.GradScaler does:

- a step whose gradients hold inf/NaN is skipped and its scale is multiplied
  by ``backoff_factor`` (never below ``min_scale``);
- after ``growth_interval`` clean steps in a row the scale is multiplied by
  ``growth_factor``.

Unlike GradScaler each named group keeps its own scale and counter, so one
layer group that overflows does not hold every other group's scale down.

Protocol::

    ls = DynamicLossScaler(groups=("body", "head"))
    (loss * ls.scale("body")).backward()        # or scale each group's loss part
    ... unscale gradients by 1 / ls.scale(group), check them for inf/NaN ...
    skipped = ls.update({"body": body_inf, "head": head_inf})
    # step the optimizer for the groups where skipped[group] is False
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from adaprec.errors import CheckpointError
from adaprec.formats.scaling import ScalingError

__all__ = ["DynamicLossScaler"]

_MAX_SCALE = 2.0**127  # keep every scale a finite float32


class DynamicLossScaler:
    """Per-group dynamic loss scales with GradScaler's grow/back-off rule.

    Args:
        init_scale: starting scale of every group (> 0).
        growth_factor: multiplier after ``growth_interval`` clean steps (> 1).
        backoff_factor: multiplier after a step with inf/NaN (in (0, 1)).
        growth_interval: clean steps in a row before growing (int >= 1).
        groups: names of the parameter groups; each gets its own scale.
        enabled: when ``False`` every scale is 1 and no step is skipped.
        min_scale: floor of the back-off (> 0, <= init_scale). Below it a
            smaller scale would not help: the overflow is a precision
            problem, and :meth:`at_min_scale` tells the caller so.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        groups: Iterable[str] = ("default",),
        enabled: bool = True,
        min_scale: float = 1.0,
    ) -> None:
        self._init_scale = _positive("init_scale", init_scale)
        if not _finite_number(growth_factor) or growth_factor <= 1.0:
            raise ScalingError(f"growth_factor must be a number > 1 (e.g. 2.0), got {growth_factor!r}")
        if not _finite_number(backoff_factor) or not 0.0 < backoff_factor < 1.0:
            raise ScalingError(f"backoff_factor must be in (0, 1) (e.g. 0.5), got {backoff_factor!r}")
        if not isinstance(growth_interval, int) or isinstance(growth_interval, bool) or growth_interval < 1:
            raise ScalingError(f"growth_interval must be an int >= 1 (e.g. 2000), got {growth_interval!r}")
        self._min_scale = _positive("min_scale", min_scale)
        if self._min_scale > self._init_scale:
            raise ScalingError(
                f"min_scale ({min_scale}) is above init_scale ({init_scale}); lower min_scale"
            )
        if isinstance(groups, str):
            groups = (groups,)
        names = list(groups)
        if not names or any(not isinstance(g, str) for g in names) or len(set(names)) != len(names):
            raise ScalingError(f"groups must be distinct string names, at least one; got {names!r}")
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.enabled = bool(enabled)
        self._scale = {g: self._init_scale for g in names}
        self._tracker = {g: 0 for g in names}

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self._scale)

    def _check_group(self, group: str) -> None:
        if group not in self._scale:
            raise ScalingError(
                f"unknown loss-scaling group {group!r}; known groups: {', '.join(self._scale)}"
            )

    def scale(self, group: str = "default") -> float:
        """The current scale of ``group`` (1.0 when disabled)."""
        self._check_group(group)
        return self._scale[group] if self.enabled else 1.0

    def growth_tracker(self, group: str = "default") -> int:
        """Clean steps in a row since the last growth or back-off."""
        self._check_group(group)
        return self._tracker[group]

    def at_min_scale(self, group: str = "default") -> bool:
        """True when backing off can go no lower: an overflow now needs more precision."""
        self._check_group(group)
        return self.enabled and self._scale[group] <= self._min_scale

    def update(self, found_inf: bool | Mapping[str, bool]) -> dict[str, bool]:
        """Record one step's overflow result; return ``{group: skipped}``.

        ``found_inf`` is one bool for every group, or a mapping group ->
        bool; groups missing from the mapping did not step and keep their
        state (they are reported as not skipped).
        """
        if isinstance(found_inf, Mapping):
            for g in found_inf:
                self._check_group(g)
            results = {g: bool(v) for g, v in found_inf.items()}
        else:
            results = {g: bool(found_inf) for g in self._scale}
        skipped = {g: False for g in self._scale}
        if not self.enabled:
            return skipped
        for g, inf in results.items():
            if inf:
                self._scale[g] = max(self._scale[g] * self.backoff_factor, self._min_scale)
                self._tracker[g] = 0
                skipped[g] = True
                continue
            self._tracker[g] += 1
            if self._tracker[g] >= self.growth_interval:
                grown = self._scale[g] * self.growth_factor
                if grown <= _MAX_SCALE:
                    self._scale[g] = grown
                self._tracker[g] = 0
        return skipped

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": dict(self._scale),
            "growth_tracker": dict(self._tracker),
            "init_scale": self._init_scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "min_scale": self._min_scale,
            "enabled": self.enabled,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = ("scale", "growth_tracker", "growth_factor", "backoff_factor", "growth_interval", "min_scale")
        missing = [k for k in keys if k not in state]
        if missing:
            raise CheckpointError(
                f"DynamicLossScaler state dict is missing {', '.join(missing)}; "
                "load a state dict saved by DynamicLossScaler.state_dict()"
            )
        scale, tracker = dict(state["scale"]), dict(state["growth_tracker"])
        if set(scale) != set(tracker) or not scale:
            raise CheckpointError("DynamicLossScaler state dict: scale and growth_tracker name different groups")
        if set(scale) != set(self._scale):
            raise CheckpointError(
                f"DynamicLossScaler state dict has groups {sorted(scale)} but this scaler has "
                f"{sorted(self._scale)}; build the scaler with the same groups before loading"
            )
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self._min_scale = float(state["min_scale"])
        self._init_scale = float(state.get("init_scale", self._init_scale))
        self.enabled = bool(state.get("enabled", self.enabled))
        self._scale = {g: float(scale[g]) for g in self._scale}
        self._tracker = {g: int(tracker[g]) for g in self._scale}


def _finite_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _positive(name: str, v: object) -> float:
    if not _finite_number(v) or v <= 0:  # type: ignore[operator]
        raise ScalingError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)  # type: ignore[arg-type]
