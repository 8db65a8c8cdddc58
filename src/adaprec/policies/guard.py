"""The guard: overrides any policy when training goes unstable.

An inf/NaN loss or gradient first costs only the step (the controller skips
it, as ``torch.amp.GradScaler`` does): one bad batch is not a precision
problem. Precision is raised only when the evidence points at it: the
same failure again on the next step (gradients or a cast overflowing in a
narrow format), an overflow storm (values saturating the format in force),
a loss spike under a narrow plan, or ``max_retries`` failures in a row of
any kind. Raised modules stay at least that wide until ``quiet_steps``
pass without incident, then the wrapped policy is back in control. Only
when every module is fp32 and ``max_retries`` consecutive steps still fail
does it stop, with :class:`TrainingUnstableError` naming modules and steps.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

from adaprec.errors import CheckpointError, PolicyError, TrainingUnstableError
from adaprec.formats import width_key
from adaprec.monitor.snapshot import Snapshot
from adaprec.plan import ROLES, ModulePrecision, PrecisionPlan, preset
from adaprec.policies.base import Policy, _check_keys
from adaprec.policies.ladder import widen_module

__all__ = ["Guard"]


class Guard(Policy):
    """Wraps ``policy``; read ``rollback_requested`` (alias ``retry``) after each ``decide``.

    Args:
        policy: the policy to protect.
        spike_factor: a loss above ``spike_factor`` x the loss trend (EMA) is an
            incident, if it is also ``spike_sigmas`` standard deviations of the
            recent losses above the trend, and ``min_jump`` x the first loss
            of the run above it (minibatch noise near zero loss is not a spike).
        quiet_steps: steps without incident before raised modules may narrow again.
        max_retries: consecutive incidents (retries of a step) tolerated before
            the guard puts every module in fp32 at once.
        overflow_storm: a module whose tensor in its current format saturates
            in more than this fraction of values is an incident.
        min_history: losses the trend must have seen before spikes count.
    """

    may_roll_back = True

    def __init__(
        self,
        policy: Policy,
        spike_factor: float = 3.0,
        quiet_steps: int = 200,
        max_retries: int = 3,
        overflow_storm: float = 0.01,
        min_history: int = 10,
        spike_sigmas: float = 6.0,
        min_jump: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(policy, Policy):
            raise PolicyError(f"Guard wraps a Policy, got {type(policy).__name__}")
        if not spike_factor > 1:
            raise PolicyError(f"guard: spike_factor must be > 1, got {spike_factor!r}")
        for key, v in (("quiet_steps", quiet_steps), ("max_retries", max_retries), ("min_history", min_history)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise PolicyError(f"guard: {key} must be an int >= 0, got {v!r}")
        if not 0 < overflow_storm <= 1:
            raise PolicyError(f"guard: overflow_storm is a fraction in (0, 1], got {overflow_storm!r}")
        self.policy = policy
        self.spike_factor, self.quiet_steps, self.max_retries = float(spike_factor), quiet_steps, max_retries
        self.overflow_storm, self.min_history = float(overflow_storm), min_history
        if not spike_sigmas > 0:
            raise PolicyError(f"guard: spike_sigmas must be > 0, got {spike_sigmas!r}")
        self.spike_sigmas = float(spike_sigmas)
        if not min_jump >= 0:
            raise PolicyError(f"guard: min_jump must be >= 0, got {min_jump!r}")
        self.min_jump = float(min_jump)
        self.first_loss: float | None = None
        self.floor: dict[str, ModulePrecision] = {}
        self.last_incident_step: int | None = None
        self.consecutive = 0
        self.skips: list[int] = []  # steps of the current run of consecutive inf/NaN steps
        self.fp32_skips: list[int] = []  # those of them taken with every adjustable module in fp32

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"guard({self.policy.name})"

    @property
    def candidate_formats(self) -> tuple[str, ...]:
        return self.policy.candidate_formats

    @property
    def candidate_formats_by_role(self) -> Mapping[str, tuple[str, ...]]:
        return self.policy.candidate_formats_by_role

    def wants_sample(self, step: int) -> bool:
        return self.policy.wants_sample(step)

    @property
    def retry(self) -> bool:
        """Alias of ``rollback_requested``: restore weights and optimizer, run the step again."""
        return self.rollback_requested

    def restrict(self, allowed, coupled=(), *, fused_moments=()) -> None:  # noqa: ANN001 - as Policy.restrict
        super().restrict(allowed, coupled, fused_moments=fused_moments)
        self.policy.restrict(allowed, coupled, fused_moments=fused_moments)

    def storage_note(self) -> str:
        return self.policy.storage_note()

    def moments_min_numel(self) -> int | None:
        return self.policy.moments_min_numel()

    def setup(
        self, template: PrecisionPlan, total_steps: int | None = None, steps_per_epoch: int | None = None
    ) -> PrecisionPlan:
        super().setup(template, total_steps, steps_per_epoch)
        return self.policy.setup(template, total_steps, steps_per_epoch)

    # --- detection -----------------------------------------------------------------------
    def detect(self, snapshot: Snapshot) -> tuple[str | None, list[str]]:
        """(what went wrong or None, modules named as offenders)."""
        plan_mods = set(snapshot.plan.modules)
        named = [m for m in snapshot.overflowed if m in plan_mods]
        storms = []
        for module, roles in snapshot.modules.items():
            for role, st in roles.items():
                frac = st.overflow_frac.get(st.current, 0.0)
                if frac > self.overflow_storm:
                    storms.append((module, role, frac))
        if snapshot.nonfinite:
            return "nonfinite loss or gradients", named
        if storms:
            m, r, f = max(storms, key=lambda s: s[2])
            offenders = sorted({s[0] for s in storms if s[0] in plan_mods} | set(named))
            return f"overflow storm ({m}.{r}: {f:.2%} of values saturate)", offenders
        loss, ema = snapshot.loss, snapshot.loss_ema
        if self.first_loss is None and loss is not None and math.isfinite(loss):
            self.first_loss = abs(loss)
        if (
            loss is not None and ema is not None and math.isfinite(loss) and ema > 0
            and len(snapshot.loss_history) >= self.min_history and loss > self.spike_factor * ema
            and loss > ema + self.spike_sigmas * statistics.pstdev(snapshot.loss_history[:-1])
            and loss - ema > self.min_jump * (self.first_loss or 0.0)
            and not all(snapshot.plan.get(m).is_fp32 for m in plan_mods)  # precision is not to blame
        ):
            return f"loss spike ({loss:.4g} > {self.spike_factor:g} x trend {ema:.4g})", named
        return None, []

    # --- decision -------------------------------------------------------------------------
    def decide(self, snapshot: Snapshot, step: int) -> PrecisionPlan:
        template = self._template()
        self.rollback_requested = False
        self.incident, offenders = self.detect(snapshot)
        if snapshot.nonfinite:
            return self._nonfinite(snapshot, step, offenders)
        self.skips, self.fp32_skips = [], []
        if self.incident is not None:
            return self._raise(snapshot, step, offenders)
        self.consecutive = 0
        plan = self.policy.decide(snapshot, step)
        reasons = dict(self.policy.last_reasons)
        if self.floor and self.last_incident_step is not None:
            if step - self.last_incident_step < self.quiet_steps:
                for module, floor in self.floor.items():
                    mp = plan.get(module)
                    merged = mp
                    for role in ROLES:
                        if width_key(floor.recipe(role)) > width_key(mp.recipe(role)):
                            merged = merged.with_role(role, floor.recipe(role))
                    if merged != mp and module not in template.pinned:
                        plan = plan.with_module(module, merged)
                # the wrapped policy's reasons hold only for what survived the floor
                changed = {(c.module, c.role) for c in snapshot.plan.diff(plan)}
                reasons = {k: v for k, v in reasons.items() if k in changed}
                for k in changed - set(reasons):
                    reasons[k] = f"guard: held wide until step {self.last_incident_step + self.quiet_steps}"
            else:
                for k in reasons:
                    reasons[k] = f"{reasons[k]} (guard quiet for {self.quiet_steps} steps)"
                self.floor = {}
        self.last_reasons = reasons
        return plan

    def _nonfinite(self, snapshot: Snapshot, step: int, offenders: list[str]) -> PrecisionPlan:
        """An inf/NaN step: skipped by the controller; precision raised only on evidence; stop in fp32."""
        current = snapshot.plan
        cause = snapshot.nonfinite_cause or "loss or gradients"
        self.skips.append(step)
        n = len(self.skips)
        where = f" in {', '.join(offenders)}" if offenders else ""
        free = [m for m in current.modules if m not in current.pinned]
        narrow = [m for m in free if not current.get(m).is_fp32]
        self.last_reasons = {}
        if not narrow:
            # only the failures with every module already fp32 count toward giving up
            self.fp32_skips.append(step)
            k = len(self.fp32_skips)
            if k > self.max_retries:
                first, last = self.fp32_skips[0], self.fp32_skips[-1]
                raise TrainingUnstableError(
                    f"{k} consecutive steps (steps {first}-{last}) produced inf/NaN ({cause}{where}) with every "
                    "adjustable module in fp32, so higher precision cannot help. Lower the learning rate, clip "
                    "gradients, or check the data and the loss for inf/NaN."
                )
            self.incident = f"inf/NaN in the {cause}{where}: step skipped ({k} in a row with every module fp32)"
            return current
        repeated = n >= 2 and cause in ("gradients", "cast")
        if not (repeated or n > self.max_retries):
            # one failure (or a non-finite loss, which a narrow format rarely causes): skip, as GradScaler does
            self.incident = f"inf/NaN in the {cause}{where}: step skipped ({n} in a row)"
            return current
        self.last_incident_step = step
        targets = [m for m in (offenders or free) if m in narrow] or narrow
        plan = self._widen(current, targets)
        why = (f"inf/NaN in the {cause}{where} on {n} consecutive steps ({self._steps_text()}): raised one rung")
        self.incident = why
        for c in current.diff(plan):
            self.floor[c.module] = plan.get(c.module)
        self.policy.on_guard_raise(dict.fromkeys(c.module for c in current.diff(plan)))
        self.last_reasons = {(c.module, c.role): f"guard at step {step}: {why}" for c in current.diff(plan)}
        return plan

    def _steps_text(self) -> str:
        s = self.skips
        return f"step {s[0]}" if len(s) == 1 else f"steps {s[0]}-{s[-1]}"

    def _raise(self, snapshot: Snapshot, step: int, offenders: list[str]) -> PrecisionPlan:
        current = snapshot.plan
        self.consecutive += 1
        self.last_incident_step = step
        free = [m for m in current.modules if m not in current.pinned]
        if self.consecutive > self.max_retries:
            plan = current.map(lambda _n, _mp: preset("fp32"))
            why = f"{self.incident}: {self.consecutive - 1} retries failed, every module to fp32"
        else:
            targets = [m for m in (offenders or free) if m not in current.pinned]
            plan = self._widen(current, targets)
            if plan == current:  # the named modules were fp32 already: the culprit is elsewhere
                plan = self._widen(current, free)
            why = f"{self.incident}: raised one rung (retry {self.consecutive}/{self.max_retries})"
        if plan == current:
            pinned_narrow = sorted(m for m in current.pinned if not current.get(m).is_fp32)
            extra = (f" Pinned modules {pinned_narrow} are not fp32; unpin them or pin them to fp32."
                     if pinned_narrow else "")
            raise TrainingUnstableError(
                f"training is unstable at step {step} ({self.incident}) with every adjustable module "
                f"already in fp32, so higher precision cannot help.{extra} Lower the learning rate, clip "
                "gradients, or check the data and loss for inf/NaN."
            )
        raised = [c.module for c in current.diff(plan)]
        for module in dict.fromkeys(raised):
            self.floor[module] = plan.get(module)
        self.policy.on_guard_raise(dict.fromkeys(raised))
        self.rollback_requested = True
        self.last_reasons = {(c.module, c.role): f"guard at step {step}: {why}" for c in current.diff(plan)}
        return plan

    def _widen(self, plan: PrecisionPlan, modules: list[str]) -> PrecisionPlan:
        for m in modules:
            wider = widen_module(plan.get(m), self.allowed_for(m))
            if wider is not None:
                plan = plan.with_module(m, wider)
        return plan

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "floor": {m: mp.to_dict() for m, mp in self.floor.items()},
            "last_incident_step": self.last_incident_step,
            "consecutive": self.consecutive,
            "first_loss": self.first_loss,
            "skips": list(self.skips),
            "fp32_skips": list(self.fp32_skips),
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        super().load_state_dict(d)
        _check_keys(d, ["policy", "floor", "last_incident_step", "consecutive"], "guard")
        try:
            self.floor = {m: ModulePrecision.from_dict(v) for m, v in d["floor"].items()}
        except Exception as e:
            raise CheckpointError(f"guard state has a malformed floor plan: {e}") from None
        self.last_incident_step = d["last_incident_step"]
        self.consecutive = int(d["consecutive"])
        self.first_loss = None if d.get("first_loss") is None else float(d["first_loss"])
        self.skips = [int(v) for v in d.get("skips", [])]
        self.fp32_skips = [int(v) for v in d.get("fp32_skips", [])]
        self.policy.load_state_dict(d["policy"])
