"""The policy's plan timed against the fp32 plan on the user's own model, so a plan is never slower than plain.

Why: whether narrow formats pay depends on more than the GEMMs the shape
measurement times. Once any module is narrow, every recognised op of a step
goes through adaprec's dispatch in Python (casts, the ledger's tally, the
saved-tensor hooks), while an fp32 plan's step is counted once and replayed
at plain PyTorch's speed. On an AMX Xeon that cost 300-400 us per linear per
step: on nanoGPT's CPU config and the small CNNs it outweighed what the bf16
GEMMs saved (0.49-0.74x plain fp32), while on GPT-2 the narrow plan ran
1.99x. Only timing the step itself tells the two apart.

How: right after the step that finds the modules, the controller runs blocks
of ``block`` steps, fp32 plan and policy plan in turn (``pairs`` of each);
the first step of a block is not timed (an fp32 plan's first step is the one
it counts before replaying), and a monitored step runs the policy's plan
outside the check. If the policy's plan
is not faster (median step time), the policy is restricted to fp32 for the
rest of the run, the timeline records why, and the report's "speed check"
line says what was measured either way. The fp32 steps train in the reference format, so the check
changes no result beyond the precision of those few steps.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from adaprec.plan import ModulePrecision, PrecisionPlan

__all__ = ["SpeedCheck"]

FP32 = ModulePrecision()


class SpeedCheck:
    """Times the policy's plan against fp32 in turns, then keeps fp32 where the policy's plan is not faster."""

    def __init__(self, enabled: bool, block: int = 3, pairs: int = 2) -> None:
        self.enabled, self.block, self.pairs = enabled, block, pairs
        self.times: dict[str, list[float]] = {"fp32": [], "plan": []}
        self.done = not enabled
        self.verdict: str | None = None  # why the fp32 plan runs, once the check found the policy's slower
        self.summary: str | None = None  # what the check measured and decided (the report's line)
        self._i = 0  # steps of the check so far
        self._run: tuple[str, float, bool] | None = None  # this step: (which plan, start, timed?)
        self._policy_plan: PrecisionPlan | None = None  # the policy's plan while an fp32 step runs

    @classmethod
    def for_run(cls, config: Any, policy: Any, model: Any, world_size: int) -> SpeedCheck:
        """On where the plan is the default's choice from this device's own measurements: a policy that asks
        (error-budget's ``speed_check``, on by default), the probe's report (``hardware="auto"``), not research
        mode, one CPU process (GPU steps need a sync to time; ranks would have to agree on timings)."""
        on = (bool(getattr(policy, "speed_check", False)) and config.hardware == "auto" and config.target is None
              and config.backend == "auto" and world_size == 1
              and not any(p.is_cuda for p in model.parameters()))
        return cls(on)

    @property
    def length(self) -> int:
        """Steps the check takes (after the first step)."""
        return 2 * self.pairs * self.block

    def before_step(self, ap: Any) -> None:
        """At a step's forward: run the fp32 plan in place of the policy's on the check's fp32 steps."""
        self._run = None
        self.ran(ap, ap.plan)  # a forward that never reached ap.step() (an evaluation pass): the policy's plan back
        if self.done or not ap.setup.decided:
            return  # the first step finds the modules: no decision to check yet
        plan = ap.plan
        if all(mp == FP32 for mp in plan.modules.values()) or ap.sampling_next:
            return  # nothing narrow to check (yet); a monitored step measures the policy's plan, outside the check
        which = "fp32" if (self._i // self.block) % 2 == 0 else "plan"
        timed = self._i % self.block != 0
        if which == "fp32":
            self._policy_plan = plan
            ap.engine.set_plan(plan.map(lambda _n, _mp: FP32))
        self._i += 1
        self._run = (which, time.perf_counter(), timed)

    def ran(self, ap: Any, plan: PrecisionPlan) -> PrecisionPlan:
        """Before the policy reads the step: its own plan in force again (it decides from that plan)."""
        if self._policy_plan is None:
            return plan
        policy_plan, self._policy_plan = self._policy_plan, None
        ap.engine.set_plan(policy_plan)
        return policy_plan

    def end(self, ap: Any, step: int, new_plan: PrecisionPlan) -> PrecisionPlan:
        """After the update: time the step; once the check is over, the fp32 plan if the policy's did not pay."""
        if self._run is not None:
            which, t0, timed = self._run
            if timed:
                self.times[which].append(time.perf_counter() - t0)
            self._run = None
        if self.done or self._i < self.length:
            return new_plan
        self.done = True
        t32, tplan = (statistics.median(self.times[k]) if self.times[k] else None for k in ("fp32", "plan"))
        if t32 is None or tplan is None:
            return new_plan
        self.summary = (f"the policy's plan ran {1e3 * tplan:.1f} ms per step and the fp32 plan {1e3 * t32:.1f} ms "
                        f"(median of {len(self.times['plan'])} and {len(self.times['fp32'])} steps timed in turns "
                        "on this model)")
        if tplan <= t32:
            self.summary += ": the policy's plan is kept"
            return new_plan
        self.verdict = f"{self.summary}: narrow does not pay here, so the fp32 plan runs"
        self.summary = self.verdict
        return self._fall_back(ap, new_plan)

    def _fall_back(self, ap: Any, new_plan: PrecisionPlan) -> PrecisionPlan:
        _, coupled = ap.setup.allowed()
        names = list(ap.setup.template.modules)
        ap.policy.restrict({m: frozenset({"fp32"}) for m in names}, coupled)
        ap.setup.configure_monitor()  # nothing left to measure: no statistics taken
        fp32 = new_plan.map(lambda _n, _mp: FP32)
        # the timeline's reason holds no timing (a resumed run's timeline equals the uninterrupted one's); the
        # report's line has the figures
        why = "speed check: the policy's plan ran slower than the fp32 plan on this model (timed in turns)"
        ap.policy.last_reasons = {(c.module, c.role): why for c in ap.plan.diff(fp32)}
        return fp32

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "verdict": self.verdict, "summary": self.summary, "i": self._i,
                "times": {k: list(v) for k, v in self.times.items()}}

    def load_state_dict(self, state: dict[str, Any] | None, ap: Any) -> None:
        """Resume where the check was; a verdict for fp32 restricts the (freshly loaded) policy again."""
        if state is None:  # a state saved before the check existed: the check runs again
            return
        self.done, self.verdict, self._i = bool(state["done"]), state["verdict"], int(state["i"])
        self.summary = state.get("summary")
        self.times = {k: [float(t) for t in v] for k, v in state["times"].items()}
        if self.verdict is not None:
            self._fall_back(ap, ap.plan)
