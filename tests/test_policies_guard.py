"""Guard: raises offending modules, asks for a retry, holds through a quiet period, stops at fp32."""

import io

import pytest
import torch

from adaprec.errors import PolicyError, TrainingUnstableError
from adaprec.monitor import Snapshot, TensorStats
from adaprec.plan import PrecisionPlan
from adaprec.policies import Guard, StaticPolicy, with_guard

MODS = ["a", "b", "c"]


def roundtrip(d):
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def guarded(preset="fp8", **kw):
    g = Guard(StaticPolicy(preset), **kw)
    return g, g.setup(PrecisionPlan.uniform(MODS))


def snap(step, plan, **kw):
    return Snapshot(step=step, epoch=0, plan=plan, **kw)


def test_nonfinite_raises_the_named_module_one_rung_and_requests_rollback():
    g, plan = guarded()
    new = g.decide(snap(5, plan, nonfinite=True, overflowed=("b",)), 5)
    assert g.rollback_requested and g.retry
    b = new.get("b")
    assert (b.weight.format, b.grad_output.format, b.grad_weight.format) == ("bf16", "bf16", "fp32")
    assert new.get("a") == plan.get("a") and new.get("c") == plan.get("c")
    assert "nonfinite" in g.last_reasons[("b", "weight")]
    # a clean retry: no rollback, b held wide
    again = g.decide(snap(5, new), 5)
    assert not g.rollback_requested and again.get("b") == b


def test_unnamed_incident_raises_every_module():
    g, plan = guarded()
    new = g.decide(snap(1, plan, nonfinite=True), 1)
    assert all(new.get(m).weight.format == "bf16" for m in MODS)


def test_quiet_period_then_back_to_the_wrapped_policy():
    g, plan = guarded(quiet_steps=10)
    plan = g.decide(snap(0, plan, nonfinite=True, overflowed=("a",)), 0)
    for step in range(1, 10):
        plan = g.decide(snap(step, plan), step)
        assert plan.get("a").weight.format == "bf16", step
    plan = g.decide(snap(10, plan), 10)
    assert plan.get("a").weight.format == "fp8_e4m3"
    assert "quiet" in g.last_reasons[("a", "weight")]


def test_overflow_storm_and_loss_spike_are_incidents():
    g, plan = guarded(overflow_storm=0.01)
    st = TensorStats(amax=1e6, sqnr_db={"fp8_e4m3": 3.0}, overflow_frac={"fp8_e4m3": 0.2}, current="fp8_e4m3")
    new = g.decide(snap(3, plan, modules={"c": {"activation": st}}), 3)
    assert g.rollback_requested and "overflow storm" in g.incident
    assert new.get("c").weight.format == "bf16" and new.get("a") == plan.get("a")

    g, plan = guarded(spike_factor=3.0, min_history=5)
    hist = (1.0,) * 5
    g.decide(snap(1, plan, loss=2.5, loss_ema=1.0, loss_history=hist), 1)
    assert not g.rollback_requested
    g.decide(snap(2, plan, loss=3.5, loss_ema=1.0, loss_history=hist), 2)
    assert g.rollback_requested and "loss spike" in g.incident
    g2, plan2 = guarded(min_history=5)
    g2.decide(snap(1, plan2, loss=100.0, loss_ema=1.0, loss_history=(1.0,)), 1)
    assert not g2.rollback_requested  # too little history for a trend


def test_all_fp32_and_still_failing_raises():
    g, plan = guarded("fp32")
    with pytest.raises(TrainingUnstableError, match="fp32"):
        g.decide(snap(0, plan, nonfinite=True), 0)


def test_repeated_failure_climbs_to_fp32_then_stops():
    g, plan = guarded("fp8", max_retries=2)
    seen = []
    with pytest.raises(TrainingUnstableError):
        for _ in range(10):
            plan = g.decide(snap(7, plan, nonfinite=True, overflowed=("a",)), 7)
            seen.append(plan.get("a").weight.format)
    assert seen[:2] == ["bf16", "fp32"]
    assert len(seen) <= 4  # no endless loop: at most max_retries + 1 plans before the error


def test_named_module_already_fp32_raises_the_others():
    g = Guard(StaticPolicy("fp8"))
    tpl = PrecisionPlan.uniform(MODS)
    g.setup(tpl)
    plan = tpl.with_role("b", "weight", "fp8_e4m3")  # all fp32 except b.weight
    new = g.decide(snap(0, plan, nonfinite=True, overflowed=("a",)), 0)
    assert new.get("b").weight.format == "bf16"


def test_guard_state_round_trip():
    a, pa = guarded(quiet_steps=5)
    pa = a.decide(snap(0, pa, nonfinite=True, overflowed=("b",)), 0)
    b = Guard(StaticPolicy("fp8"), quiet_steps=5)
    b.setup(PrecisionPlan.uniform(MODS))
    b.load_state_dict(roundtrip(a.state_dict()))
    for step in (1, 4, 5):
        s = snap(step, pa)
        assert a.decide(s, step) == b.decide(s, step)


def test_with_guard_options():
    g = with_guard("bf16", quiet_steps=3)
    assert isinstance(g, Guard) and g.name == "guard(bf16)" and g.quiet_steps == 3
    with pytest.raises(PolicyError, match="spike"):
        with_guard("bf16", spike=2.0)
    with pytest.raises(PolicyError, match="spike_factor"):
        Guard(StaticPolicy("bf16"), spike_factor=0.5)
