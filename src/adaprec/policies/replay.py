"""Replays a recorded timeline: the same plan at every step as the recorded run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from adaprec.errors import PolicyError
from adaprec.monitor.snapshot import Snapshot
from adaprec.plan import PrecisionPlan
from adaprec.policies.base import Policy
from adaprec.timeline import Timeline

__all__ = ["ReplayPolicy"]


class ReplayPolicy(Policy):
    """The plan at each step is the recorded initial plan with every event up to that step.

    ``timeline``: a :class:`Timeline` or the path of its JSON. Decisions
    ignore the snapshot, so a replayed run takes exactly the recorded
    precision path (to compare energy or accuracy at an identical schedule).
    """

    name = "replay"

    def __init__(self, timeline: Timeline | str | os.PathLike[str]) -> None:
        super().__init__()
        if isinstance(timeline, Timeline):
            self.timeline = timeline
        elif isinstance(timeline, (str, os.PathLike)):
            self.timeline = Timeline.from_json(timeline)
        else:
            raise PolicyError(f"replay policy needs a Timeline or a JSON path, got {type(timeline).__name__}")
        self._start: PrecisionPlan | None = None
        # cache: (last step asked, index of the first event after it, plan); replays ask steps in order
        self._cache: tuple[int, int, PrecisionPlan] | None = None

    def initial_plan(self, template: PrecisionPlan) -> PrecisionPlan:
        start = self.timeline.initial if self.timeline.initial is not None else template
        # while the engine is still discovering modules the template grows; the check waits for decide()
        self._stray = sorted(set(start.modules) - set(template.modules))
        if self._stray:
            known = {n: mp for n, mp in start.modules.items() if n in template.modules}
            start = PrecisionPlan({**dict(template.modules), **known}, start.pinned & set(template.modules))
        self._start = start
        return self.timeline.plans_at(-1, start) if any(e.step < 0 for e in self.timeline.events) else start

    def decide(self, snapshot: Snapshot, step: int) -> PrecisionPlan:
        self._template()
        if getattr(self, "_stray", None):
            raise PolicyError(
                f"replay policy: the recorded timeline names modules this model does not run: {self._stray}; "
                "replay a timeline recorded on the same model"
            )
        plan = self._plan_at(step)
        reasons = {(e.module, e.role): e.reason for e in self.timeline.changes_at(step)}
        changed = {(c.module, c.role) for c in snapshot.plan.diff(plan)}
        self.last_reasons = {k: f"replay: {reasons.get(k) or 'recorded change'}" for k in changed}
        return plan

    def _plan_at(self, step: int) -> PrecisionPlan:
        events = self.timeline.events
        if self._cache is not None and step >= self._cache[0]:
            _, i, plan = self._cache
        elif self._start is not None:
            i, plan = 0, self._start
        else:
            raise PolicyError("replay policy: call setup() before decide()")
        j = i
        while j < len(events) and events[j].step <= step:
            j += 1
        if j > i and all(events[k].step >= events[k - 1].step for k in range(i + 1, j)):
            plan = Timeline.apply(plan, events[i:j])
        elif j > i:  # events out of step order: rebuild from the start
            plan = self.timeline.plans_at(step, self._start)
        self._cache = (step, j, plan)
        return plan

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        super().load_state_dict(d)
