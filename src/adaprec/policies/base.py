"""The policy contract: a pure decision from a monitor snapshot to a plan.

A policy never touches modules or tensors. Given the same snapshot, step and
state it returns the same plan, which is what makes decisions testable,
replayable and identical on every distributed rank. ``last_reasons`` says,
for every (module, role) the last decision changed, why (with the measured
figure), so the controller can write the timeline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

from adaprec.errors import CheckpointError, UsageError
from adaprec.monitor.snapshot import Snapshot
from adaprec.plan import ModulePrecision, PrecisionPlan, preset

__all__ = ["Policy", "RungPolicy", "resolve_precision"]


def resolve_precision(spec: str | ModulePrecision | Mapping[str, Any]) -> ModulePrecision:
    """A preset name, a ModulePrecision or its dict -> ModulePrecision (PlanError if invalid)."""
    if isinstance(spec, ModulePrecision):
        return spec
    if isinstance(spec, str):
        return preset(spec)
    return ModulePrecision.from_dict(spec)


class Policy(ABC):
    """Base class of every precision policy.

    Subclasses implement :meth:`decide` (and :meth:`initial_plan` when they
    do not start from the template as is), keep all state that decisions
    depend on in :meth:`state_dict`, and fill ``last_reasons``.

    Besides the plan, each :meth:`decide` leaves a verdict the controller
    reads: ``rollback_requested`` (undo the step just taken: put back the
    weights and optimizer state from before it) and ``incident`` (what was
    seen, for the step's reason and the timeline; None when nothing was).
    A policy that may ask for a rollback sets ``may_roll_back``: only then
    does the controller keep a pre-step copy (it costs memory).
    """

    name: str = "policy"
    may_roll_back: bool = False

    def __init__(self) -> None:
        self.template: PrecisionPlan | None = None
        self.total_steps: int | None = None
        self.steps_per_epoch: int | None = None
        self.last_reasons: dict[tuple[str, str], str] = {}
        self.rollback_requested = False  # the verdict of the last decide(): undo the step just taken
        self.incident: str | None = None  # and what was seen (None: nothing)
        # module -> formats this device executes natively and faster than fp32 (None: unrestricted)
        self.allowed: dict[str, frozenset[str]] | None = None
        # modules whose activation, weight and output gradient must share one format (their native kernels need it)
        self.coupled: frozenset[str] = frozenset()
        self.fused_moments: frozenset[str] = frozenset()  # modules whose 8-bit moments the fused kernel updates

    def restrict(self, allowed: Mapping[str, Iterable[str]] | None, coupled: Iterable[str] = (), *,
                 fused_moments: Iterable[str] = ()) -> None:
        """Tell the policy which formats each module may use on this device (hardware-aware decisions).

        Called by the controller before :meth:`setup`; ``None`` lifts the
        restriction (research mode: any format, emulated where needed).
        ``fused_moments``: the modules whose 8-bit moments the user's optimizer
        keeps at no cost in step time here (the fused kernel covers the
        optimizer, :func:`adaprec.optim.fused_adam.covers`, and the module has
        a parameter of ``AUTO_MIN_NUMEL`` elements or more).
        """
        self.allowed = None if allowed is None else {m: frozenset(f) | {"fp32"} for m, f in allowed.items()}
        self.coupled = frozenset(coupled)
        self.fused_moments = frozenset(fused_moments)

    def storage_note(self) -> str:
        """What the plan's storage roles do on this device and why, for the report ("" when the policy does
        not decide them)."""
        return ""

    def moments_min_numel(self) -> int | None:
        """The fewest elements a parameter needs for the plan's narrow ``optimizer_state`` to apply to it (None:
        the optimizer state's own floor, 4096)."""
        return None

    def allowed_for(self, module: str) -> frozenset[str] | None:
        """The formats ``module`` may use, or None when unrestricted."""
        if self.allowed is None:
            return None
        return self.allowed.get(module, frozenset({"fp32"}))

    def setup(
        self, template: PrecisionPlan, total_steps: int | None = None, steps_per_epoch: int | None = None
    ) -> PrecisionPlan:
        """Learn the modules (``template``: every quantizable module, pins included) and the run length.

        Returns the plan to start training with.
        """
        self.template = template
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.last_reasons = {}
        return self.initial_plan(template)

    def initial_plan(self, template: PrecisionPlan) -> PrecisionPlan:
        return template

    @abstractmethod
    def decide(self, snapshot: Snapshot, step: int) -> PrecisionPlan:
        """The plan to use from ``step`` on (pure given the snapshot, step and state)."""

    def wants_sample(self, step: int) -> bool:
        """Ask for tensor statistics at ``step`` besides the monitor's schedule (default: never)."""
        return False

    @property
    def candidate_formats(self) -> tuple[str, ...]:
        """Formats this policy may choose from measurements; the monitor measures these.

        Empty: the policy reads no per-format statistics (the monitor's defaults apply).
        """
        return ()

    @property
    def candidate_formats_by_role(self) -> Mapping[str, tuple[str, ...]]:
        """Per tensor role, the formats this policy may choose for it (a subset of ``candidate_formats``;
        ``"saved"``, if given, lists storage specs, measured by their own round trip instead).

        The monitor then measures each role only against its own candidates,
        which keeps sampled steps cheap. Empty: every role gets ``candidate_formats``.
        """
        return {}

    def on_guard_raise(self, modules: Iterable[str]) -> None:  # noqa: B027 - optional hook
        """The guard widened ``modules`` after an incident; a policy may treat them as sensitive."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{self.name} policy state must be a dict, got {type(d).__name__}")

    # --- helpers for subclasses ---------------------------------------------------
    def _template(self) -> PrecisionPlan:
        if self.template is None:
            raise UsageError(f"policy {self.name!r}: call setup(template, total_steps, steps_per_epoch) before decide()")
        return self.template

    def _explain(self, old: PrecisionPlan, new: PrecisionPlan, reason: str) -> None:
        """Set ``last_reasons`` to ``reason`` for every (module, role) that changes."""
        self.last_reasons = {(c.module, c.role): reason for c in old.diff(new)}


class RungPolicy(Policy):
    """A policy that runs every unpinned module at one rung of a fixed ladder (``self.rungs[self.rung]``)."""

    rungs: list[ModulePrecision]
    rung: int

    def _plan(self, template: PrecisionPlan) -> PrecisionPlan:
        mp = self.rungs[self.rung]
        return template.map(lambda _n, _old: mp)

    def initial_plan(self, template: PrecisionPlan) -> PrecisionPlan:
        return self._plan(template)


def _check_keys(d: Mapping[str, Any], keys: Iterable[str], who: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise CheckpointError(f"{who} policy state lacks {missing}; pass the dict its state_dict() wrote")
