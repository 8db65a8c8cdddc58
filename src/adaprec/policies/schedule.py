"""Fixed phases by step or epoch: e.g. fp32 for 100 steps, bf16 to epoch 5, then fp8."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adaprec.errors import PlanError, PolicyError
from adaprec.monitor.snapshot import Snapshot
from adaprec.plan import ModulePrecision, PrecisionPlan
from adaprec.policies.base import Policy, resolve_precision
from adaprec.policies.static import apply_uniform

__all__ = ["SchedulePolicy", "DEFAULT_PHASES"]

DEFAULT_PHASES: tuple[dict[str, Any], ...] = (
    {"until_step": 100, "plan": "bf16"},
    {"plan": "fp8-hybrid"},
)
_BOUNDS = ("until_step", "until_epoch")


class SchedulePolicy(Policy):
    """Phases in order; the first phase whose bound is not yet reached is in force.

    ``phases``: a list of dicts, each with ``plan`` (a preset name, a
    :class:`ModulePrecision` or its dict) and at most one bound,
    ``until_step`` (the phase ends before this step) or ``until_epoch``
    (ends when this epoch begins). The last phase has no bound. Bounds of
    the same kind must increase.
    """

    name = "schedule"

    def __init__(self, phases: Sequence[Mapping[str, Any]] = DEFAULT_PHASES) -> None:
        super().__init__()
        if isinstance(phases, (str, bytes)) or not isinstance(phases, Sequence) or not phases:
            raise PolicyError("schedule policy: phases must be a non-empty list of dicts like "
                              "[{'until_step': 100, 'plan': 'fp32'}, {'plan': 'bf16'}]")
        self.phases: list[tuple[str | None, int | None, ModulePrecision, str]] = []
        last: dict[str, int] = {}
        for i, ph in enumerate(phases):
            if not isinstance(ph, Mapping):
                raise PolicyError(f"schedule policy: phase {i} must be a dict, got {ph!r}")
            unknown = set(ph) - {"plan", *_BOUNDS}
            if unknown:
                raise PolicyError(f"schedule policy: phase {i} has unknown keys {sorted(unknown)}; "
                                  f"allowed: plan, until_step, until_epoch")
            if "plan" not in ph:
                raise PolicyError(f"schedule policy: phase {i} needs a 'plan' (a preset name such as 'bf16')")
            try:
                mp = resolve_precision(ph["plan"])
            except PlanError as e:
                raise PolicyError(f"schedule policy: phase {i}: {e}") from None
            bounds = [b for b in _BOUNDS if b in ph]
            if len(bounds) > 1:
                raise PolicyError(f"schedule policy: phase {i} has both until_step and until_epoch; give one")
            kind = bounds[0] if bounds else None
            if kind is None and i != len(phases) - 1:
                raise PolicyError(f"schedule policy: phase {i} has no bound but is not the last; "
                                  "give it until_step or until_epoch")
            if kind is not None and i == len(phases) - 1:
                raise PolicyError("schedule policy: the last phase must have no bound (it runs to the end)")
            bound = None
            if kind is not None:
                bound = ph[kind]
                if not isinstance(bound, int) or isinstance(bound, bool) or bound < 0:
                    raise PolicyError(f"schedule policy: phase {i} {kind} must be an int >= 0, got {bound!r}")
                if kind in last and bound <= last[kind]:
                    raise PolicyError(f"schedule policy: phase {i} {kind}={bound} does not come after "
                                      f"the previous {kind}={last[kind]}")
                last[kind] = bound
            label = ph["plan"] if isinstance(ph["plan"], str) else "custom"
            self.phases.append((kind, bound, mp, label))
        self._plans: list[PrecisionPlan] = []

    def initial_plan(self, template: PrecisionPlan) -> PrecisionPlan:
        self._plans = [apply_uniform(template, mp) for _, _, mp, _ in self.phases]
        return self._plans[self.phase_at(0, 0)]

    def phase_at(self, step: int, epoch: int) -> int:
        """Index of the phase in force at (step, epoch)."""
        for i, (kind, bound, _, _) in enumerate(self.phases):
            if kind is None or bound is None:
                return i
            if (kind == "until_step" and step < bound) or (kind == "until_epoch" and epoch < bound):
                return i
        return len(self.phases) - 1

    def decide(self, snapshot: Snapshot, step: int) -> PrecisionPlan:
        self._template()
        i = self.phase_at(step + 1, snapshot.epoch)  # ``step`` has just run: this plan is the next step's
        plan = self._plans[i]
        kind, bound, _, label = self.phases[i]
        until = f", until {kind.split('_')[1]} {bound}" if kind else ""
        self._explain(snapshot.plan, plan, f"schedule phase {i} ({label}{until}) at step {step}, epoch {snapshot.epoch}")
        return plan
