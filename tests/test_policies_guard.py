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


def test_one_nonfinite_step_is_only_skipped_as_gradscaler_would():
    g, plan = guarded()
    new = g.decide(snap(5, plan, nonfinite=True, nonfinite_cause="gradients", overflowed=("b",)), 5)
    assert new == plan and not g.rollback_requested  # the controller skips the step; nothing else changes
    assert "skipped" in g.incident and "b" in g.incident
    assert g.decide(snap(6, plan), 6) == plan and g.skips == []  # a clean step ends the streak


def test_repeated_nonfinite_gradients_raise_the_named_module_one_rung():
    g, plan = guarded()
    g.decide(snap(5, plan, nonfinite=True, nonfinite_cause="gradients", overflowed=("b",)), 5)
    new = g.decide(snap(6, plan, nonfinite=True, nonfinite_cause="gradients", overflowed=("b",)), 6)
    b = new.get("b")
    assert (b.weight.format, b.grad_output.format, b.grad_weight.format) == ("bf16", "bf16", "fp32")
    assert new.get("a") == plan.get("a") and new.get("c") == plan.get("c")
    assert not g.rollback_requested  # nothing to roll back: the failed steps were skipped
    assert "steps 5-6" in g.last_reasons[("b", "weight")]
    again = g.decide(snap(7, new), 7)  # a clean step: b held wide
    assert again.get("b") == b


def test_nonfinite_loss_twice_is_not_blamed_on_precision():
    """Two bad batches in a row (steps 40, 41): skipped, the plan stays; GradScaler survives this too."""
    g, plan = guarded(max_retries=3)
    for step in (40, 41):
        assert g.decide(snap(step, plan, nonfinite=True, nonfinite_cause="loss"), step) == plan
    assert g.decide(snap(42, plan), 42) == plan


def test_unnamed_incident_raises_every_module_after_max_retries():
    g, plan = guarded(max_retries=2)
    for step in range(2):
        assert g.decide(snap(step, plan, nonfinite=True, nonfinite_cause="loss"), step) == plan
    new = g.decide(snap(2, plan, nonfinite=True, nonfinite_cause="loss"), 2)
    assert all(new.get(m).weight.format == "bf16" for m in MODS)


def test_quiet_period_then_back_to_the_wrapped_policy():
    g, plan = guarded(quiet_steps=10)
    g.decide(snap(0, plan, nonfinite=True, nonfinite_cause="cast", overflowed=("a",)), 0)
    plan = g.decide(snap(1, plan, nonfinite=True, nonfinite_cause="cast", overflowed=("a",)), 1)
    for step in range(2, 11):
        plan = g.decide(snap(step, plan), step)
        assert plan.get("a").weight.format == "bf16", step
    plan = g.decide(snap(11, plan), 11)
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


def test_all_fp32_and_still_failing_raises_after_max_retries_naming_steps():
    g, plan = guarded("fp32", max_retries=3)
    for step in range(10, 13):
        assert g.decide(snap(step, plan, nonfinite=True, overflowed=("a",)), step) == plan
    with pytest.raises(TrainingUnstableError, match=r"4 consecutive steps \(steps 10-13\).*in a.*fp32"):
        g.decide(snap(13, plan, nonfinite=True, overflowed=("a",)), 13)


def test_repeated_failure_climbs_to_fp32_then_stops():
    g, plan = guarded("fp8", max_retries=2)
    seen = []
    with pytest.raises(TrainingUnstableError):
        for step in range(20):
            plan = g.decide(snap(step, plan, nonfinite=True, nonfinite_cause="gradients", overflowed=("a",)), step)
            seen.append(plan.get("a").weight.format)
    assert seen[:3] == ["fp8_e4m3", "bf16", "fp32"]  # skip, then one rung per repeat
    assert len(seen) <= 8  # no endless loop: a few rungs, then max_retries steps in fp32


def test_named_module_already_fp32_raises_the_others():
    g = Guard(StaticPolicy("fp8"))
    tpl = PrecisionPlan.uniform(MODS)
    g.setup(tpl)
    plan = tpl.with_role("b", "weight", "fp8_e4m3")  # all fp32 except b.weight
    g.decide(snap(0, plan, nonfinite=True, nonfinite_cause="gradients", overflowed=("a",)), 0)
    new = g.decide(snap(1, plan, nonfinite=True, nonfinite_cause="gradients", overflowed=("a",)), 1)
    assert new.get("b").weight.format == "bf16"


def test_guard_state_round_trip():
    a, pa = guarded(quiet_steps=5)
    a.decide(snap(0, pa, nonfinite=True, nonfinite_cause="gradients", overflowed=("b",)), 0)
    pa = a.decide(snap(1, pa, nonfinite=True, nonfinite_cause="gradients", overflowed=("b",)), 1)
    b = Guard(StaticPolicy("fp8"), quiet_steps=5)
    b.setup(PrecisionPlan.uniform(MODS))
    b.load_state_dict(roundtrip(a.state_dict()))
    for step in (2, 5, 6):
        s = snap(step, pa)
        assert a.decide(s, step) == b.decide(s, step)


def test_with_guard_options():
    g = with_guard("bf16", quiet_steps=3)
    assert isinstance(g, Guard) and g.name == "guard(bf16)" and g.quiet_steps == 3
    with pytest.raises(PolicyError, match="spike"):
        with_guard("bf16", spike=2.0)
    with pytest.raises(PolicyError, match="spike_factor"):
        Guard(StaticPolicy("bf16"), spike_factor=0.5)
