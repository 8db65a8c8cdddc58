"""CPT, FracTrain PFQ and MuPPET: the published rules, driven by synthetic sequences."""

import io
import math

import pytest
import torch

from adaprec.errors import PolicyError
from adaprec.monitor import Snapshot
from adaprec.plan import PrecisionPlan
from adaprec.policies import (
    CyclicPolicy,
    GradientDiversityPolicy,
    ProgressivePolicy,
    cyclic_bits,
    muppet_switch_epochs,
    muppet_threshold,
    pfq_switch_epochs,
)

TEMPLATE = PrecisionPlan.uniform(["l1", "l2", "head"], pins={"head": "bf16"})


def roundtrip(d):
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def snap(step, plan, epoch=0, **kw):
    return Snapshot(step=step, epoch=epoch, plan=plan, **kw)


# --- CPT -------------------------------------------------------------------------------
def test_cyclic_bits_follow_cpt_formula():
    total, cycles, bmin, bmax = 1000, 4, 3, 8
    period = total / cycles
    for t in (0, 1, 50, 125, 200, 249, 250, 251, 333, 600, 999):
        u = (t % period) / period
        v = bmin + 0.5 * (bmax - bmin) * (1 - math.cos(math.pi * u))
        assert cyclic_bits(t, period, bmin, bmax) == math.floor(v + 0.5), t
    assert cyclic_bits(0, period) == bmin
    assert cyclic_bits(249, period) == bmax


def test_cyclic_policy_plans_and_profiles():
    pol = CyclicPolicy(num_cycles=2, bmin=3, bmax=8)
    plan = pol.setup(TEMPLATE, total_steps=100)
    assert plan.get("l1").weight.format == "int3"
    seen = []
    for t in range(100):
        plan = pol.decide(snap(t, plan), t)
        mp = plan.get("l1")
        seen.append(int(mp.weight.format[3:]))
        assert mp.activation.format == mp.weight.format and mp.weight.scaling == "tensor"
        assert (mp.grad_output.format, mp.grad_output.rounding) == ("int8", "stochastic")
        assert mp.grad_weight.format == "fp32"
        assert plan.get("head") == TEMPLATE.get("head")  # pinned
    assert seen[0] == 3 and max(seen) == 8 and seen[50] == 3  # second cycle restarts
    assert seen == [cyclic_bits(t, 50.0) for t in range(100)]
    lin = CyclicPolicy(num_cycles=1, profile="linear", direction="decay")
    lin.setup(TEMPLATE, total_steps=10)
    assert [lin.bits_at(t) for t in (0, 5)] == [8, math.floor(3 + 5 * 0.5 + 0.5)]


def test_cyclic_needs_run_length():
    with pytest.raises(PolicyError, match="total_steps"):
        CyclicPolicy().setup(TEMPLATE)
    CyclicPolicy(period=10).setup(TEMPLATE)  # explicit period is enough
    with pytest.raises(PolicyError, match="profile"):
        CyclicPolicy(profile="sine")
    with pytest.raises(PolicyError, match="bmin"):
        CyclicPolicy(bmin=9, bmax=8)


# --- FracTrain PFQ ----------------------------------------------------------------------
def test_pfq_switches_where_the_rule_says():
    # reference = mean of epochs 0..4 = 1.6; eps 0.05 -> tolerance 0.08
    losses = [2.0, 1.8, 1.6, 1.4, 1.2] + [1.0] * 6  # epochs 5..10 flat: t=10 has 5 flat predecessors
    # eps now 0.015 -> tolerance 0.024: a 0.03 wobble is no plateau, a flat 0.8 stretch is
    losses += [0.90, 0.93] * 5  # epochs 11..20
    losses += [0.80] * 6  # epochs 21..26
    assert pfq_switch_epochs(losses) == [10, 26]
    assert pfq_switch_epochs(losses[:10]) == []


def test_pfq_at_most_three_switches_each_needing_a_fresh_window():
    assert pfq_switch_epochs([1.0] * 40) == [5, 11, 17]


def test_progressive_policy_climbs_the_ladder_on_snapshots():
    losses = [2.0, 1.8, 1.6, 1.4, 1.2] + [1.0] * 6 + [0.90, 0.93] * 5 + [0.80] * 6
    pol = ProgressivePolicy()
    plan = pol.setup(TEMPLATE, total_steps=None, steps_per_epoch=10)
    assert (plan.get("l1").weight.format, plan.get("l1").grad_output.format) == ("int3", "int6")
    fwd = []
    for e in range(len(losses) + 1):
        plan = pol.decide(snap(e * 10, plan, epoch=e, epoch_losses=tuple(losses[:e])), e * 10)
        fwd.append(plan.get("l1").weight.format)
        if e == 11:
            assert "plateau at epoch 10" in pol.last_reasons[("l1", "weight")]
    # switched when epoch 10's loss was known (e = 11), then when epoch 26's was (e = 27)
    assert fwd[10] == "int3" and fwd[11] == "int4" and fwd[26] == "int4" and fwd[27] == "int6"
    assert plan.get("l1").grad_output.format == "int8"
    assert plan.get("head") == TEMPLATE.get("head")


def test_progressive_state_round_trip():
    losses = [1.0] * 30
    a = ProgressivePolicy()
    pa = a.setup(TEMPLATE)
    pa = a.decide(snap(0, pa, epoch=8, epoch_losses=tuple(losses[:8])), 0)
    b = ProgressivePolicy()
    b.setup(TEMPLATE)
    b.load_state_dict(roundtrip(a.state_dict()))
    s = snap(1, pa, epoch=20, epoch_losses=tuple(losses[:20]))
    assert a.decide(s, 1) == b.decide(s, 1)
    assert a.switch_epochs == b.switch_epochs == [5, 11, 17]


# --- MuPPET -------------------------------------------------------------------------------
CHECKS = [(3, 10.0), (6, 4.0), (9, 8.0), (12, 5.0), (15, 3.0), (18, 2.5), (21, 2.0), (24, 1.0)]


def test_muppet_threshold_formula():
    for j in (0, 3, 10, 30):
        assert muppet_threshold(j) == pytest.approx(1 + 1.5 * math.exp(-0.1 * j))


def test_muppet_switches_after_two_violations():
    # j=6: 10/4=2.5 > 1.82 (1st); j=9: 1.25 < 1.61; j=12: 10/5=2 > 1.45 (2nd) -> switch.
    # reset; j=15: 1; j=18: 3/2.5=1.2 < 1.25; j=21: 1.5 > 1.18 (1st); j=24: 3 > 1.14 (2nd) -> switch
    assert muppet_switch_epochs(CHECKS) == [12, 24]


def test_gradient_diversity_policy_on_snapshots():
    pol = GradientDiversityPolicy()
    plan = pol.setup(TEMPLATE)
    assert plan.get("l1").weight.format == "int8"
    by_epoch = dict(CHECKS)
    formats = {}
    for e in range(1, 26):
        # diversity is reported every epoch; only every 3rd epoch counts
        div = by_epoch.get(e, 0.01)
        plan = pol.decide(snap(e, plan, epoch=e, model_grad_diversity=div), e)
        formats[e] = plan.get("l1").weight.format
    assert formats[11] == "int8" and formats[12] == "int12" and formats[23] == "int12" and formats[24] == "int14"
    assert pol.switch_epochs == [12, 24]
    assert plan.get("l1").grad_output.rounding == "stochastic"


def test_gradient_diversity_reaches_fp32_and_stops():
    pol = GradientDiversityPolicy(bits=(8,), every_epochs=1, patience=1)
    plan = pol.setup(TEMPLATE)
    plan = pol.decide(snap(0, plan, epoch=1, model_grad_diversity=10.0), 0)
    plan = pol.decide(snap(1, plan, epoch=2, model_grad_diversity=1.0), 1)
    assert plan.get("l1").is_fp32
    plan = pol.decide(snap(2, plan, epoch=3, model_grad_diversity=0.01), 2)
    assert plan.get("l1").is_fp32 and pol.switch_epochs == [2]


def test_gradient_diversity_state_round_trip():
    a = GradientDiversityPolicy()
    pa = a.setup(TEMPLATE)
    for e, d in CHECKS[:2]:
        pa = a.decide(snap(e, pa, epoch=e, model_grad_diversity=d), e)
    b = GradientDiversityPolicy()
    b.setup(TEMPLATE)
    b.load_state_dict(roundtrip(a.state_dict()))
    for e, d in CHECKS[2:]:
        s = snap(e, pa, epoch=e, model_grad_diversity=d)
        pa = a.decide(s, e)
        assert b.decide(s, e) == pa
