"""The policy's plan timed against the fp32 plan on the user's own model, so a plan is never slower than plain.

Why: whether narrow formats pay depends on more than the GEMMs the shape
measurement times. Once any module is narrow, every recognised op of a step
goes through adaprec's dispatch in Python (casts, the ledger's tally, the
saved-tensor hooks), while an fp32 plan's step is counted once and replayed
at plain PyTorch's speed. On an AMX Xeon that cost 300-400 us per linear per
step: on nanoGPT's CPU config and the small CNNs it outweighed what the bf16
GEMMs saved (0.49-0.74x plain fp32), while on GPT-2 the narrow plan ran
1.99x. Only timing the step itself tells the two apart.

How: whenever the policy's plan starts computing in a set of formats not
checked yet (the warm-up's bf16 right after the first step; error-budget's
measured plan once it adds int8), the controller runs blocks of ``block``
steps, fp32 plan and policy plan in turn (``pairs`` of each); the first step
of a block is not timed (an fp32 plan's first step is the one it counts
before replaying), and a monitored step runs the policy's plan outside the
check. A plan slower than fp32, or slower relative to fp32 than the plan
checked before it, loses the formats it added: the policy never chooses
them again (all of them: the fp32 plan runs), the modules that used them
move to bf16 or fp32 at once, the timeline records why (without timings, so
a resumed run's timeline equals the uninterrupted one's) and the report's
"speed check" line has the figures. The fp32 steps train in the reference
format and the policy decides from its own plan as if they had not run.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from adaprec.engine.allocator import trim_heap
from adaprec.plan import ModulePrecision, PrecisionPlan, preset

__all__ = ["SpeedCheck", "narrow_formats"]

FP32 = ModulePrecision()


def _narrow(mp: ModulePrecision) -> frozenset[str]:
    return frozenset((mp.weight.format, mp.activation.format, mp.grad_output.format)) - {"fp32"}


def narrow_formats(plan: PrecisionPlan) -> frozenset[str]:
    """The narrow formats ``plan``'s GEMMs compute in (weight, activation and output-gradient roles)."""
    return frozenset().union(*(_narrow(mp) for mp in plan.modules.values()))


class SpeedCheck:
    """Times the policy's plan against fp32 in turns whenever it starts computing in a new set of formats;
    drops the formats that made it slower."""

    def __init__(self, enabled: bool, block: int = 3, pairs: int = 2) -> None:
        self.enabled, self.block, self.pairs = enabled, block, pairs
        self.times: dict[str, list[float]] = {"fp32": [], "plan": []}
        self.checking: frozenset[str] | None = None  # the formats of the plan under check
        self.kept: frozenset[str] = frozenset()  # the formats of the last plan that passed
        self.ratio = 1.0  # that plan's step time over the fp32 plan's (1.0: none passed yet)
        self.dropped: set[str] = set()  # formats that made the policy's plan slower: never chosen again
        self.verdict: str | None = None  # why formats were dropped (the last time)
        self.summary: str | None = None  # what the last check measured and decided (the report's line)
        self._i = 0  # steps of the check in progress so far
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
        """Steps one check takes (monitored steps run outside it)."""
        return 2 * self.pairs * self.block

    @property
    def done(self) -> bool:
        """No check in progress (one starts when the policy's plan computes in formats not checked yet)."""
        return self.checking is None

    def before_step(self, ap: Any) -> None:
        """At a step's forward: run the fp32 plan in place of the policy's on the check's fp32 steps."""
        self._run = None
        self.ran(ap, ap.plan)  # a forward that never reached ap.step() (an evaluation pass): the policy's plan back
        if not self.enabled or not ap.setup.decided:
            return  # the first step finds the modules: no decision to check yet
        plan = ap.plan
        fmts = narrow_formats(plan)
        if fmts != self.checking:  # a new set of formats (or the plan changed during a check): check it
            self.checking = fmts if fmts and not fmts <= self.kept else None
            self._i, self.times = 0, {"fp32": [], "plan": []}
        if self.checking is None or ap.sampling_next:
            return  # nothing new to check; a monitored step measures the policy's plan, outside the check
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
        """After the update: time the step; once a check is over, drop the formats that made the plan slower."""
        if self._run is not None:
            which, t0, timed = self._run
            if timed:
                self.times[which].append(time.perf_counter() - t0)
            self._run = None
        if self.checking is None or self._i < self.length:
            return new_plan
        checked, self.checking = self.checking, None
        # two plans ran in turns, each allocating its own sizes: glibc keeps the freed heap they leave behind.
        # Hand it back once (quickstart-size model, steady-state peak over steps 21-27: 493-521 MiB in three
        # runs against 520-528 without; plain fp32 477: a little, not all of what adaprec adds there)
        trim_heap()
        # the fastest timed step of each: what lands in a timed step once (a kernel's first call for a new shape
        # or dtype, the shape table's measurement, a policy decision) only ever adds time, and the check falls in
        # the run's first steps, where those happen. Measured on the digits CNN (AMX Xeon, steady steps 7.7 ms
        # either way): timed steps of 15-322 ms; by the median the same code kept bf16 in one run (13.2 against
        # 31.6 ms) and dropped it in another (18.6 against 12.3 ms)
        t32, tplan = (min(self.times[k]) for k in ("fp32", "plan"))
        ratio = tplan / t32
        names = "/".join(sorted(checked))
        self.summary = (f"the policy's plan ({names}) ran {1e3 * tplan:.1f} ms per step and the fp32 plan "
                        f"{1e3 * t32:.1f} ms (the fastest of {len(self.times['plan'])} and {len(self.times['fp32'])} "
                        "steps timed in turns on this model)")
        if ratio <= min(1.0, self.ratio):
            self.kept, self.ratio = checked, ratio
            self.summary += ": kept"
            return new_plan
        new = checked - self.kept or checked
        self.dropped |= new
        self.verdict = self.summary = (
            f"{self.summary}: slower than fp32" + ("" if self.ratio == 1.0 else
                                                   f" relative to the {'/'.join(sorted(self.kept))} plan checked before")
            + f", so {'/'.join(sorted(new))} {'is' if len(new) == 1 else 'are'} dropped")
        return self._drop(ap, new_plan)

    def _restrict(self, ap: Any) -> dict[str, frozenset[str]]:
        allowed, coupled = ap.setup.allowed()
        names = list(ap.setup.template.modules)
        ok = {m: frozenset(f for f in (allowed or {}).get(m, frozenset({"fp32"})) if f not in self.dropped) | {"fp32"}
              for m in names}
        ap.policy.restrict(ok, coupled, fused_moments=ap.setup.fused_modules())
        ap.setup.configure_monitor()  # what is left to measure
        return ok

    def _drop(self, ap: Any, new_plan: PrecisionPlan) -> PrecisionPlan:
        ok = self._restrict(ap)

        def without_dropped(name: str, mp: ModulePrecision) -> ModulePrecision:
            if not _narrow(mp) & self.dropped:
                return mp
            if "bf16" in ok.get(name, ()):
                return replace(preset("bf16"), saved=mp.saved, optimizer_state=mp.optimizer_state, output=mp.output)
            return replace(FP32, saved=mp.saved, optimizer_state=mp.optimizer_state)

        plan = new_plan.map(without_dropped)
        # the timeline's reason holds no timing (a resumed run's timeline equals the uninterrupted one's); the
        # report's line has the figures
        why = f"speed check: {'/'.join(sorted(self.dropped))} ran slower here (timed in turns against fp32)"
        ap.policy.last_reasons = {(c.module, c.role): why for c in ap.plan.diff(plan)}
        return plan

    def state_dict(self) -> dict[str, Any]:
        return {"checking": None if self.checking is None else sorted(self.checking), "kept": sorted(self.kept),
                "ratio": self.ratio, "dropped": sorted(self.dropped), "verdict": self.verdict,
                "summary": self.summary, "i": self._i, "times": {k: list(v) for k, v in self.times.items()}}

    def load_state_dict(self, state: dict[str, Any] | None, ap: Any) -> None:
        """Resume where the check was; formats dropped before are taken from the (freshly loaded) policy again."""
        if state is None:  # a state saved before the check existed: the check runs again
            return
        self.checking = None if state["checking"] is None else frozenset(state["checking"])
        self.kept, self.ratio = frozenset(state["kept"]), float(state["ratio"])
        self.dropped = set(state["dropped"])
        self.verdict, self.summary, self._i = state["verdict"], state["summary"], int(state["i"])
        self.times = {k: [float(t) for t in v] for k, v in state["times"].items()}
        if self.dropped:
            self._restrict(ap)
