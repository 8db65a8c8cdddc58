"""A fixed plan for the whole run: a named preset or an explicit plan."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adaprec.errors import PlanError, PolicyError
from adaprec.monitor.snapshot import Snapshot
from adaprec.plan import ModulePrecision, PrecisionPlan
from adaprec.policies.base import Policy, resolve_precision

__all__ = ["StaticPolicy", "apply_uniform"]


def apply_uniform(template: PrecisionPlan, mp: ModulePrecision) -> PrecisionPlan:
    """``mp`` for every unpinned module of ``template``; pinned ones keep theirs."""
    return template.map(lambda _name, _old: mp)


class StaticPolicy(Policy):
    """Always the same plan.

    ``plan``: a preset name (``fp32``, ``bf16``, ``fp16``, ``fp8``,
    ``fp8-hybrid``; applied to every unpinned module), a
    :class:`ModulePrecision` (likewise), or a full :class:`PrecisionPlan`
    (used as given, except that the template's pinned modules keep their pins).
    """

    def __init__(self, plan: str | ModulePrecision | PrecisionPlan | Mapping[str, Any] = "fp32") -> None:
        super().__init__()
        self.spec = plan
        if isinstance(plan, PrecisionPlan):
            self.name = "static"
            self._mp: ModulePrecision | None = None
        else:
            try:
                self._mp = resolve_precision(plan)
            except PlanError as e:
                raise PolicyError(f"static policy: {e}") from None
            self.name = plan if isinstance(plan, str) else "static"
        self._plan: PrecisionPlan | None = None

    def initial_plan(self, template: PrecisionPlan) -> PrecisionPlan:
        if self._mp is not None:
            self._plan = apply_uniform(template, self._mp)
        else:
            assert isinstance(self.spec, PrecisionPlan)
            mods = dict(self.spec.modules)
            for n in template.pinned:
                mods[n] = template.get(n)
            self._plan = PrecisionPlan(mods, frozenset(template.pinned) | self.spec.pinned)
        return self._plan

    def decide(self, snapshot: Snapshot, step: int) -> PrecisionPlan:
        self._template()
        assert self._plan is not None
        self.last_reasons = {}
        if snapshot.plan != self._plan:
            self._explain(snapshot.plan, self._plan, f"static plan {self.name}")
        return self._plan
