"""The speed check: error-budget's plan timed against the fp32 plan on the model, fp32 kept where narrow is slower.

The clock is the test's: each step's time is set by what it ran (narrow modules or none), so the
verdict is decided by the rule, not by this machine's load.
"""

from __future__ import annotations

import functools
import io
import warnings

import pytest
import torch
from torch import nn

import adaprec
from _train import FAST_INT8_BF16, train_random
from adaprec.controller import setup as setup_mod
from adaprec.controller import speed_check as speed_mod
from adaprec.hardware import shapes


def _pays(run: shapes.GemmRun, number: int) -> float:
    """No clock for the shapes: every narrow GEMM is measured 3x faster than fp32."""
    t32 = run.shape.macs * 1e-9
    return t32 if run.format == "fp32" else t32 / 3.0


class _Clock:
    """perf_counter for the speed check: a step with narrow modules takes ``narrow`` s, an fp32 one ``wide`` s."""

    def __init__(self, narrow: float, wide: float, int8: float | None = None, wide_spike: float = 0.0) -> None:
        self.narrow, self.wide, self.int8, self.t, self.ap, self.calls = narrow, wide, int8, 0.0, None, 0
        self._pending = 0.0
        self.wide_spike, self.wide_steps = wide_spike, 0  # added to every other fp32 step (a one-time cost)

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2:  # a step starts (after the check chose its plan): its length is set by that plan
            fmts = speed_mod.narrow_formats(self.ap.engine.plan)
            self._pending = (self.int8 if "int8" in fmts and self.int8 is not None
                             else self.narrow if fmts else self.wide)
            if not fmts:
                self.wide_steps += 1
                self._pending += self.wide_spike if self.wide_steps % 2 == 0 else 0.0
            return self.t
        self.t += self._pending
        return self.t


def _setup(tmp_path, monkeypatch, narrow: float, wide: float, int8: float | None = None, monitor_every=1000,
           timer=None, wide_spike: float = 0.0, **policy):
    monkeypatch.setattr(setup_mod, "probe", lambda device: FAST_INT8_BF16)
    monkeypatch.setattr(setup_mod, "measure_gemms", functools.partial(shapes.measure_gemms, timer=timer or _pays,
                                                                      cache_dir=tmp_path))
    clock = _Clock(narrow, wide, int8, wide_spike)
    monkeypatch.setattr(speed_mod.time, "perf_counter", clock)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = adaprec.AdaptivePrecision(model, opt, {"name": "error-budget", "warmup_steps": 2, **policy},
                                       count_bytes=False, monitor_every=monitor_every)
    clock.ap = ap
    return ap, model, opt


def _train(ap, model, opt, steps, seed=0):
    train_random(ap, model, opt, steps, rows=32, seed=seed)


def _until_checked(ap, model, opt) -> int:
    """Train until the check is over (monitored steps run outside it); the steps it took."""
    for n in range(1, 60):
        _train(ap, model, opt, 1, seed=n)
        if ap.speed.done:
            return n
    raise AssertionError("the speed check never ended")


def _narrow(ap) -> bool:
    return any(mp.weight.format != "fp32" for mp in ap.plan.modules.values())


def test_a_plan_slower_than_fp32_falls_back_to_fp32_for_the_rest_of_the_run(tmp_path, monkeypatch):
    ap, model, opt = _setup(tmp_path, monkeypatch, narrow=0.010, wide=0.006)
    check = ap.speed
    _train(ap, model, opt, 1)
    assert _narrow(ap) and check.verdict is None  # the first step found the modules; the policy narrowed
    took = _until_checked(ap, model, opt)
    assert check.length <= took <= check.length + 4  # a few monitored steps run outside the check
    assert check.verdict is not None and "10.0 ms" in check.verdict and "6.0 ms" in check.verdict
    # the timed steps: the check alternated the two plans, first step of each block untimed
    assert len(check.times["fp32"]) == len(check.times["plan"]) == 4
    assert not _narrow(ap)
    _train(ap, model, opt, 10)
    assert not _narrow(ap)  # the policy was restricted: it never narrows again
    # nor does it keep packing what autograd saves in bf16: that cost is part of what the check refused
    assert {mp.saved for mp in ap.plan.modules.values()} == {"fp32"} and not ap.saved.active
    assert "speed check: the policy's plan (bf16) ran 10.0 ms" in ap.report()
    assert "so bf16 is dropped" in ap.report()
    events = [e for e in ap.timeline.events if "bf16 ran slower here" in (e.reason or "")]
    assert events and {e.step for e in events} == {took}  # recorded once, as the step the check ended


def test_one_time_costs_in_timed_fp32_steps_do_not_turn_the_verdict(tmp_path, monkeypatch):
    """Half the timed fp32 steps carry a 0.5 s one-time cost (a kernel's first call, a shape measurement): the
    median of the fp32 steps would be 256 ms and keep the slower bf16 plan; the fastest step of each drops it."""
    ap, model, opt = _setup(tmp_path, monkeypatch, narrow=0.010, wide=0.006, wide_spike=0.5)
    _train(ap, model, opt, 1)
    _until_checked(ap, model, opt)
    times = ap.speed.times["fp32"]
    assert sum(t > 0.4 for t in times) == 2 and len(times) == 4  # the case the median gets wrong
    assert ap.speed.verdict is not None and "so bf16 is dropped" in ap.speed.verdict
    assert "10.0 ms" in ap.speed.verdict and "6.0 ms" in ap.speed.verdict and not _narrow(ap)


def test_a_plan_faster_than_fp32_is_kept_and_the_policy_never_saw_the_fp32_steps(tmp_path, monkeypatch):
    ap, model, opt = _setup(tmp_path, monkeypatch, narrow=0.004, wide=0.006)
    _train(ap, model, opt, 1)
    took = _until_checked(ap, model, opt)
    _train(ap, model, opt, 4)
    assert ap.speed.verdict is None and _narrow(ap)
    # the shapes measured int8 and bf16 alike (3x): int8 adds rounding error for no speed, so it is left out
    assert ap.setup.widened and all(why.startswith("int8 run no faster than bf16 at its GEMM shapes")
                                    for why in ap.setup.widened.values())
    assert "speed check: the policy's plan (bf16) ran 4.0 ms per step and the fp32 plan 6.0 ms" in ap.report()
    assert ": kept" in ap.report()
    # the check's fp32 steps ran fp32 (the ledger prices what ran) but were no plan change in the timeline
    assert all(e.new != "fp32" or e.old == "fp32" for e in ap.timeline.events if e.role == "weight")
    assert not any(e.step in range(1, 1 + took) and e.new == "fp32" for e in ap.timeline.events)


def test_the_verdict_survives_a_resume(tmp_path, monkeypatch):
    ap, model, opt = _setup(tmp_path, monkeypatch, narrow=0.010, wide=0.006)
    _train(ap, model, opt, 1)
    _until_checked(ap, model, opt)
    buf = io.BytesIO()
    torch.save({"ap": ap.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    ap2, model2, opt2 = _setup(tmp_path, monkeypatch, narrow=0.001, wide=0.006)  # would now pay: not re-checked
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    ap2.load_state_dict(ck["ap"])
    assert ap2.speed.done and ap2.speed.verdict == ap.speed.verdict
    _train(ap2, model2, opt2, 6)
    assert not _narrow(ap2)


@pytest.mark.parametrize("how", ["option off", "a given device report"])
def test_the_check_is_off_when_asked_or_when_the_device_report_is_given(tmp_path, monkeypatch, how):
    if how == "option off":
        ap, model, opt = _setup(tmp_path, monkeypatch, narrow=0.010, wide=0.006, speed_check=False)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ap = adaprec.AdaptivePrecision(model, opt, {"name": "error-budget", "warmup_steps": 2},
                                           hardware=FAST_INT8_BF16, count_bytes=False)
    _train(ap, model, opt, 16)
    assert ap.speed.done and ap.speed.verdict is None and ap.speed.times == {"fp32": [], "plan": []}
    assert _narrow(ap)


def test_bad_option_is_refused():
    with pytest.raises(adaprec.errors.PolicyError, match="speed_check must be True or False"):
        adaprec.policies.build({"name": "error-budget", "speed_check": "yes"})



def _int8_pays_more(run: shapes.GemmRun, number: int) -> float:
    """The shapes say int8 (4x) beats bf16 (3x): the policy takes int8 where its error allows."""
    t32 = run.shape.macs * 1e-9
    return t32 if run.format == "fp32" else t32 / (4.0 if run.format == "int8" else 3.0)


def test_a_format_added_later_that_slows_the_step_is_dropped_and_the_rest_kept(tmp_path, monkeypatch):
    # bf16 steps 4 ms, fp32 6 ms, any plan with int8 8 ms (its quantization passes cost more than it saves)
    ap, model, opt = _setup(tmp_path, monkeypatch, narrow=0.004, wide=0.006, int8=0.008, monitor_every=2,
                            timer=_int8_pays_more, patience=1)
    _train(ap, model, opt, 1)
    for n in range(150):
        _train(ap, model, opt, 1, seed=100 + n)
        if "int8" in ap.speed.dropped and ap.speed.kept == {"bf16"}:
            break
    check = ap.speed
    # error-budget moved to int8 soon after its 2-step warm-up; that plan ran slower than fp32, so int8 went,
    # its modules moved to bf16, and that plan, checked in its turn, was kept
    assert check.dropped == {"int8"} and check.kept == {"bf16"}, (check.kept, check.dropped, check.summary)
    assert "so int8 is dropped" in check.verdict and ": kept" in check.summary
    _train(ap, model, opt, 10, seed=7)
    assert speed_mod.narrow_formats(ap.plan) == {"bf16"}  # int8 never again; bf16 stays
    assert any("int8 ran slower here" in (e.reason or "") for e in ap.timeline.events)
