"""The update stage: skip, roll back or step the optimizer, with its state kept as the plan says.

It owns the optimizer's narrow state (:class:`OptimizerStates`) and the
opt-in rollback copy, and measures the update's bytes for the ledger.
"""

from __future__ import annotations

from torch import nn

from adaprec.controller.gradients import StepHealth
from adaprec.controller.optimizer_state import OptimizerStates
from adaprec.controller.rollback import Rollback
from adaprec.controller.step_bytes import StepBytes
from adaprec.formats import compiled
from adaprec.monitor import HealthMonitor
from adaprec.plan import PrecisionPlan
from adaprec.policies import Policy

__all__ = ["Update"]


class Update:
    """Applies (or not) each step's update: ``states`` steps the optimizer, ``rollback`` (or None) undoes one."""

    def __init__(self, states: OptimizerStates, rollback: Rollback | None, step_bytes: StepBytes,
                 fused: bool) -> None:
        self.states, self.rollback, self.bytes, self.fused = states, rollback, step_bytes, fused

    def plan_changed(self, plan: PrecisionPlan, owners: dict[str, list[tuple[str, nn.Parameter]]],
                     min_numel: int | None = None) -> None:
        """The optimizer's moments follow the plan's ``optimizer_state`` (converted now when it changed);
        ``min_numel``: the policy's floor for narrow moments (:meth:`Policy.moments_min_numel`)."""
        self.states.apply(plan, owners, min_numel)

    def apply(self, step: int, health: StepHealth, policy: Policy, monitor: HealthMonitor) -> tuple[bool, bool, str]:
        """Skip, roll back or step: (stepped, rolled back, reason)."""
        if health.nonfinite or policy.rollback_requested:
            self.bytes.skipped()
        if health.nonfinite:
            return False, False, health.skip_reason()
        if policy.rollback_requested:
            monitor.discard_last_loss()  # an undone step's loss must not shift the trend later steps face
            rolled = self.rollback is not None and self.rollback.restore()
            what = policy.incident or "an incident"
            return False, rolled, (f"rolled back: guard saw {what}" if rolled else f"skipped: guard saw {what}")
        with self.bytes.update(f"{self.rollback is not None}|{self.states.key}", step), compiled(self.fused):
            if self.rollback is not None:
                self.rollback.save()
            self.states.step()
        return True, False, "ok"
