"""The precision timeline: every change of every tensor's format, when and why.

The controller records each decision that changed the plan; the timeline
turns into a report table (CSV), a file to replay (JSON, see
:class:`adaprec.policies.ReplayPolicy`) and a part of the checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adaprec.errors import CheckpointError, PlanError
from adaprec.files import write_text_atomic
from adaprec.plan import STORAGE_ROLES, PrecisionPlan, TensorRecipe

__all__ = ["TimelineEvent", "Timeline"]

_CSV_FIELDS = ("step", "module", "role", "old", "new", "policy", "reason")


@dataclass(frozen=True)
class TimelineEvent:
    """One (module, role) changing format at ``step``.

    ``old``/``new`` are short recipe strings for people (``fp8_e5m2/sr/tensor``);
    ``recipe`` is the full new recipe (a TensorRecipe dict, or
    ``{"format": name}`` for optimizer state), from which plans are rebuilt.
    """

    step: int
    module: str
    role: str
    old: str
    new: str
    policy: str
    reason: str = ""
    recipe: Mapping[str, Any] = field(default_factory=dict, compare=True, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recipe"] = dict(self.recipe)
        return d


class Timeline:
    """The ordered list of precision changes, plus the plan training started with."""

    def __init__(self, initial: PrecisionPlan | None = None) -> None:
        self.initial: PrecisionPlan | None = initial
        self.events: list[TimelineEvent] = []

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self):  # noqa: ANN204
        return iter(self.events)

    def set_initial(self, plan: PrecisionPlan) -> None:
        """The plan in force before the first recorded change."""
        self.initial = plan

    def record_plan_change(
        self,
        step: int,
        old_plan: PrecisionPlan,
        new_plan: PrecisionPlan,
        policy_name: str,
        reasons: Mapping[tuple[str, str], str] | None = None,
    ) -> list[TimelineEvent]:
        """Append one event per (module, role) that differs; returns them (empty when none)."""
        if self.initial is None:
            self.initial = old_plan
        reasons = reasons or {}
        new_events = []
        for c in old_plan.diff(new_plan):
            mp = new_plan.get(c.module)
            if c.role in STORAGE_ROLES:
                recipe: dict[str, Any] = {"format": getattr(mp, c.role)}
            else:
                recipe = asdict(mp.recipe(c.role))
            ev = TimelineEvent(int(step), c.module, c.role, c.old, c.new, policy_name,
                               reasons.get((c.module, c.role), ""), recipe)
            new_events.append(ev)
        self.events.extend(new_events)
        return new_events

    # --- reading ---------------------------------------------------------------------
    @staticmethod
    def apply(plan: PrecisionPlan, events: Iterable[TimelineEvent]) -> PrecisionPlan:
        """``plan`` with ``events`` applied in order."""
        for ev in events:
            if ev.role in STORAGE_ROLES:
                plan = plan.with_module(ev.module, plan.get(ev.module).with_storage(ev.role, ev.recipe["format"]))
            else:
                plan = plan.with_role(ev.module, ev.role, TensorRecipe(**ev.recipe))
        return plan

    def plans_at(self, step: int, initial_plan: PrecisionPlan | None = None) -> PrecisionPlan:
        """The plan in force at ``step``: the initial plan with every event up to and including ``step``."""
        start = initial_plan if initial_plan is not None else self.initial
        if start is None:
            raise PlanError("this timeline has no initial plan; pass initial_plan= (the plan training started with)")
        return self.apply(start, (ev for ev in self.events if ev.step <= step))

    def changes_at(self, step: int) -> list[TimelineEvent]:
        return [ev for ev in self.events if ev.step == step]

    # --- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "initial": self.initial.to_dict() if self.initial is not None else None,
            "events": [ev.to_dict() for ev in self.events],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Timeline:
        if not isinstance(d, Mapping) or "events" not in d:
            raise CheckpointError("a timeline dict needs an 'events' list (as written by Timeline.to_dict)")
        try:
            tl = cls(PrecisionPlan.from_dict(d["initial"]) if d.get("initial") is not None else None)
            for e in d["events"]:
                tl.events.append(TimelineEvent(
                    step=int(e["step"]), module=str(e["module"]), role=str(e["role"]), old=str(e["old"]),
                    new=str(e["new"]), policy=str(e["policy"]), reason=str(e.get("reason", "")),
                    recipe=dict(e.get("recipe") or {"format": e["new"].split("/")[0]}),
                ))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"timeline data is malformed ({e!r}); pass what Timeline.to_json wrote") from None
        return tl

    def to_json(self, path: str | os.PathLike[str] | None = None, indent: int | None = 2) -> str:
        """The timeline as JSON text; also written to ``path`` (atomically) when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            write_text_atomic(path, text)
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike[str]) -> Timeline:
        """Parse JSON text, or read the file at ``source``."""
        if isinstance(source, str) and source.lstrip().startswith("{"):
            text = source
        else:
            try:
                text = Path(source).read_text(encoding="utf-8")
            except OSError as e:
                raise CheckpointError(f"cannot read timeline file {str(source)!r}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"timeline JSON does not parse: {e}") from None
        return cls.from_dict(data)

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """One row per event (step, module, role, old, new, policy, reason); written to ``path`` when given."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(_CSV_FIELDS)
        for ev in self.events:
            w.writerow([getattr(ev, f) for f in _CSV_FIELDS])
        text = buf.getvalue()
        if path is not None:
            write_text_atomic(path, text)
        return text

    # --- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        other = Timeline.from_dict(d)
        self.initial, self.events = other.initial, other.events

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Timeline) and self.initial == other.initial and self.events == other.events

    __hash__ = None  # type: ignore[assignment]
