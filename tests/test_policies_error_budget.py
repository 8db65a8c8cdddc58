"""Error-budget policy on synthetic snapshots: narrows with hysteresis, widens on violation."""

import io

import pytest
import torch

from adaprec.errors import PolicyError
from adaprec.monitor import Snapshot, TensorStats
from adaprec.plan import PrecisionPlan
from adaprec.policies import ErrorBudgetPolicy

MODS = ["first", "mid", "last"]
INF = float("inf")
GOOD = {"fp4_e2m1": 10.0, "fp6_e3m2": 25.0, "fp8_e4m3": 31.0, "fp8_e5m2": 25.0, "bf16": 55.0, "fp32": INF}


def roundtrip(d):
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def stats(sqnr, current, overflow=None, underflow=None):
    return TensorStats(
        amax=1.0,
        sqnr_db=dict(sqnr),
        overflow_frac={f: (overflow or {}).get(f, 0.0) for f in sqnr},
        underflow_frac={f: (underflow or {}).get(f, 0.0) for f in sqnr},
        current=current,
    )


def snapshot(step, plan, per_module=None, **kw):
    """Stats for every module and role (same figures), unless given per module."""
    mods = {}
    for m in MODS:
        sq = (per_module or {}).get(m, GOOD)
        if sq is None:
            continue
        mods[m] = {r: stats(sq, plan.get(m).recipe(r).format) for r in
                   ("weight", "activation", "grad_output", "grad_weight")}
    return Snapshot(step=step, epoch=0, plan=plan, modules=mods, **kw)


# The float ladders these synthetic snapshots were built for (the defaults put
# per-tensor integers first; the rule is the same for any ladder).
FLOAT_LADDERS = {
    "weight": ("fp4_e2m1", "fp6_e3m2", "fp8_e4m3", "bf16", "fp32"),
    "activation": ("fp4_e2m1", "fp6_e3m2", "fp8_e4m3", "bf16", "fp32"),
    "grad_output": ("fp8_e5m2", "bf16", "fp32"),
}


def make(**kw):
    kw.setdefault("ladders", FLOAT_LADDERS)
    kw.setdefault("warmup_steps", 0)
    kw.setdefault("early_extra_db", 0.0)
    kw.setdefault("sensitive_edges", False)
    pol = ErrorBudgetPolicy(**kw)
    plan = pol.setup(PrecisionPlan.uniform(MODS, "bf16"), total_steps=1000)
    return pol, plan


def test_narrows_only_after_patience_checks():
    pol, plan = make(patience=3)
    for step in range(2):
        plan = pol.decide(snapshot(step, plan), step)
        assert plan.get("mid").weight.format == "bf16"
        # an unsampled snapshot neither counts nor resets the streak
        plan = pol.decide(Snapshot(step=step, epoch=0, plan=plan), step)
    plan = pol.decide(snapshot(2, plan), 2)
    mid = plan.get("mid")
    assert (mid.weight.format, mid.weight.scaling) == ("fp6_e3m2", "tensor")  # 25 dB >= 20, fp4's 10 dB is not
    assert (mid.grad_output.format, mid.grad_output.rounding) == ("fp8_e5m2", "stochastic")  # range first
    assert mid.grad_weight.format == "bf16"
    reason = pol.last_reasons[("mid", "weight")]
    assert "sqnr 25.0 dB >= 20.0 dB for 3 checks" in reason


def test_widens_immediately_on_violation():
    pol, plan = make(patience=1)
    plan = pol.decide(snapshot(0, plan), 0)
    assert plan.get("mid").weight.format == "fp6_e3m2"
    worse = dict(GOOD, fp6_e3m2=15.0)
    plan = pol.decide(snapshot(1, plan, {"mid": worse}), 1)
    assert plan.get("mid").weight.format == "fp8_e4m3"
    assert "sqnr 15.0 dB < 20.0 dB" in pol.last_reasons[("mid", "weight")]


def test_flapping_measurements_never_narrow():
    pol, plan = make(patience=2)
    bad = dict(GOOD, fp4_e2m1=5.0, fp6_e3m2=5.0, fp8_e4m3=5.0)
    for step in range(10):
        plan = pol.decide(snapshot(step, plan, {"mid": GOOD if step % 2 else bad}), step)
        assert plan.get("mid").weight.format == "bf16"


def test_narrows_to_most_conservative_format_of_the_streak():
    pol, plan = make(patience=2)
    only_fp8 = dict(GOOD, fp6_e3m2=18.0)
    plan = pol.decide(snapshot(0, plan, {"mid": GOOD}), 0)
    plan = pol.decide(snapshot(1, plan, {"mid": only_fp8}), 1)
    assert plan.get("mid").weight.format == "fp8_e4m3"


def test_overflow_and_underflow_limits():
    pol, plan = make(patience=1, max_overflow=1e-3, max_underflow=0.1)
    mods = {}
    for m in MODS:
        st = stats(GOOD, "bf16", overflow={"fp6_e3m2": 0.01}, underflow={"fp8_e4m3": 0.5})
        mods[m] = {"weight": st}
    plan = pol.decide(Snapshot(step=0, epoch=0, plan=plan, modules=mods), 0)
    assert plan.get("mid").weight.format == "bf16"  # fp6 saturates, fp8 flushes too much


def test_sensitive_edges_and_overflowed_modules_stay_wider():
    pol, plan = make(patience=1, sensitive_edges=True, sensitive_extra_db=15.0)
    assert pol.target("first", "weight", 0) == pytest.approx(35.0)
    assert pol.target("mid", "weight", 0) == pytest.approx(20.0)
    plan = pol.decide(snapshot(0, plan), 0)
    assert plan.get("first").weight.format == "bf16" and plan.get("last").weight.format == "bf16"
    assert plan.get("mid").weight.format == "fp6_e3m2"
    pol2, plan2 = make(patience=1, sensitive_extra_db=15.0)
    plan2 = pol2.decide(snapshot(0, plan2, overflowed=("mid",)), 0)
    assert plan2.get("mid").weight.format == "bf16" and plan2.get("first").weight.format == "fp6_e3m2"
    pol3, _ = make(sensitive_extra_db=15.0)
    pol3.on_guard_raise(["last"])
    assert pol3.target("last", "weight", 0) == pytest.approx(35.0)


def test_warmup_then_targets_relax_as_training_matures():
    pol = ErrorBudgetPolicy(warmup_steps=10, warmup_format="fp32", early_extra_db=6.0, mature_steps=100,
                            sensitive_edges=False, patience=1, ladders=FLOAT_LADDERS)
    plan = pol.setup(PrecisionPlan.uniform(MODS, "bf16"))
    assert plan.is_fp32  # the warm-up holds from the very first step
    plan = pol.decide(snapshot(5, plan.map(lambda n, mp: mp)), 5)
    assert plan.is_fp32
    plan = pol.decide(snapshot(6, PrecisionPlan.uniform(MODS, "bf16")), 6)
    assert plan.is_fp32 and "warm-up" in next(iter(pol.last_reasons.values()))
    assert pol.target("mid", "weight", 10) == pytest.approx(26.0)
    assert pol.target("mid", "weight", 60) == pytest.approx(23.0)
    assert pol.target("mid", "weight", 500) == pytest.approx(20.0)
    plan = pol.decide(snapshot(10, plan), 10)
    assert plan.get("mid").weight.format == "fp8_e4m3"  # 25 dB < 26 dB right after warm-up
    plan = pol.decide(snapshot(200, plan), 200)
    plan = pol.decide(snapshot(201, plan), 201)
    assert plan.get("mid").weight.format == "fp6_e3m2"


def test_nonfinite_snapshot_changes_nothing():
    pol, plan = make(patience=1)
    assert pol.decide(snapshot(0, plan, nonfinite=True), 0) == plan


def test_pinned_modules_are_left_alone():
    pol = ErrorBudgetPolicy(warmup_steps=0, patience=1, sensitive_edges=False)
    tpl = PrecisionPlan.uniform(MODS, "bf16", pins={"mid": "fp32"})
    plan = pol.setup(tpl)
    plan = pol.decide(snapshot(0, plan), 0)
    assert plan.get("mid").is_fp32 and plan.get("first").weight.format != "bf16"


def test_state_round_trip_continues_identically():
    a, pa = make(patience=3)
    for s in range(2):
        pa = a.decide(snapshot(s, pa), s)
    b, _ = make(patience=3)
    b.load_state_dict(roundtrip(a.state_dict()))
    s = snapshot(2, pa)
    assert a.decide(s, 2) == b.decide(s, 2) != pa


def test_bad_options():
    with pytest.raises(PolicyError, match="role"):
        ErrorBudgetPolicy(targets={"bias": 3})
    with pytest.raises(PolicyError, match="fp7"):
        ErrorBudgetPolicy(ladders={"weight": ["fp7", "fp32"]})
    with pytest.raises(PolicyError, match="warmup_format"):
        ErrorBudgetPolicy(warmup_format="fp9")


def test_storage_auto_narrows_only_where_bf16_is_fast_or_in_research_mode():
    p = ErrorBudgetPolicy()
    p.restrict({"fc": {"int8"}})  # no fast bf16 here: packing would cost step time
    assert p.optimizer_state == "fp32" and p.saved_ladder == ("fp32",) and "kept fp32" in p.storage_note()
    assert "int8" in p.candidate_formats  # int8 still runs fast here: the compute roles measure it
    p.restrict({"fc": set()})
    assert p.candidate_formats == ()  # only fp32 left to measure: the monitor takes no statistics
    p.restrict({"fc": {"bf16", "int8"}})
    # saved tensors only in formats packed by one cast (block-scaled codes cost eager passes: slower steps);
    # moments fp32 where the optimizer's 8-bit moments have no fused kernel (eager: a slower step)
    assert p.optimizer_state == "fp32" and p.flow_narrow
    assert p.saved_ladder == ("bf16", "fp32") and "storage='narrow' adds" in p.storage_note()
    assert "does not cover" in p.storage_note()
    p.restrict({"fc": {"bf16", "int8"}}, fused_moments={"fc"})  # the fused kernel updates fc's moments: 8-bit
    assert p.optimizer_state.startswith("int8") and "fused kernel" in p.storage_note()
    assert p._moments("fc").startswith("int8") and p._moments("small") == "fp32"  # the plan says what is held
    wide = ErrorBudgetPolicy(optimizer_state="bf16")  # moments the kernel does not take: fp32 under auto
    wide.restrict({"fc": {"bf16"}}, fused_moments={"fc"})
    assert wide.optimizer_state == "fp32"
    p.restrict({"fc": {"int8"}}, fused_moments={"fc"})  # no fast bf16: saved fp32, but the kernel's moments
    assert p.optimizer_state.startswith("int8") and p.saved_ladder == ("fp32",) and not p.flow_narrow
    assert "saved tensors and outputs kept fp32" in p.storage_note()
    p.restrict(None)  # research mode: everything narrow, emulated; outputs stay fp32
    assert p.optimizer_state.startswith("int8") and p.saved_ladder[0].startswith("int8") and not p.flow_narrow
    forced = ErrorBudgetPolicy(storage="narrow")
    forced.restrict({"fc": set()})
    assert forced.optimizer_state.startswith("int8") and "kept narrow" in forced.storage_note()
    assert forced.saved_ladder[0].startswith("int8") and forced.saved_ladder[-1] == "fp32"
    never = ErrorBudgetPolicy(storage="fp32")
    never.restrict(None)
    assert never.optimizer_state == "fp32" and never.saved_ladder == ("fp32",)
    with pytest.raises(PolicyError, match="storage must be one of auto, narrow, fp32"):
        ErrorBudgetPolicy(storage="small")
