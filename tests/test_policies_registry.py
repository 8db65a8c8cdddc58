"""build(), static and schedule policies, replay."""

import pytest

from adaprec.errors import PolicyError
from adaprec.monitor import Snapshot
from adaprec.plan import PRESETS, PrecisionPlan
from adaprec.policies import (
    CyclicPolicy,
    ErrorBudgetPolicy,
    GradientDiversityPolicy,
    Guard,
    ProgressivePolicy,
    ReplayPolicy,
    SchedulePolicy,
    StaticPolicy,
    build,
    with_guard,
)
from adaprec.timeline import Timeline

MODS = ["l1", "l2", "out"]
TEMPLATE = PrecisionPlan.uniform(MODS, pins={"out": "fp32"})


def snap(step, plan, epoch=0):
    return Snapshot(step=step, epoch=epoch, plan=plan)


@pytest.mark.parametrize(
    "spec, cls",
    [("fp32", StaticPolicy), ("fp8-hybrid", StaticPolicy), ("FP8_hybrid", StaticPolicy), ("schedule", SchedulePolicy),
     ("cyclic", CyclicPolicy), ("progressive", ProgressivePolicy), ("gradient-diversity", GradientDiversityPolicy),
     ("gradient_diversity", GradientDiversityPolicy), ("error-budget", ErrorBudgetPolicy)],
)
def test_build_by_name(spec, cls):
    assert type(build(spec)) is cls


def test_build_from_dict_plan_and_policy():
    p = build({"name": "cyclic", "bmin": 4, "num_cycles": 8})
    assert isinstance(p, CyclicPolicy) and p.bmin == 4 and p.num_cycles == 8
    plan = PrecisionPlan.uniform(MODS, "bf16")
    static = build(plan)
    assert isinstance(static, StaticPolicy) and static.setup(TEMPLATE).get("l1") == PRESETS["bf16"]
    assert build(static) is static


def test_build_errors_name_the_problem():
    with pytest.raises(PolicyError, match="known policies: .*error-budget"):
        build("fastest")
    with pytest.raises(PolicyError, match="no option 'bits_min'.*bmin"):
        build({"name": "cyclic", "bits_min": 4})
    with pytest.raises(PolicyError, match="'name'"):
        build({"bmin": 4})
    with pytest.raises(PolicyError, match="replay:PATH"):
        build("replay")
    with pytest.raises(PolicyError, match="takes no options"):
        build({"name": "bf16", "x": 1})
    with pytest.raises(PolicyError):
        build(42)


def test_static_preset_keeps_pins():
    plan = build("fp8").setup(TEMPLATE)
    assert plan.get("l1") == PRESETS["fp8"] and plan.get("out").is_fp32 and plan.pinned == {"out"}


def test_schedule_by_step_and_epoch():
    pol = SchedulePolicy([{"until_step": 10, "plan": "fp32"}, {"until_epoch": 2, "plan": "bf16"},
                          {"plan": "fp8-hybrid"}])
    plan = pol.setup(TEMPLATE, steps_per_epoch=20)
    assert plan.get("l1").is_fp32
    fmts = {}
    for step in range(0, 60, 5):
        plan = pol.decide(snap(step, plan, epoch=step // 20), step)
        fmts[step] = plan.get("l1").weight.format
    assert fmts[5] == "fp32" and fmts[10] == "bf16" and fmts[35] == "bf16" and fmts[40] == "fp8_e4m3"
    assert plan.get("out").is_fp32


@pytest.mark.parametrize(
    "phases, match",
    [([], "non-empty"), ([{"plan": "bf16"}, {"plan": "fp32"}], "no bound"),
     ([{"until_step": 5, "plan": "bf16"}], "last phase"), ([{"until_step": 5}, {"plan": "fp32"}], "'plan'"),
     ([{"until_step": 5, "plan": "bf17"}, {"plan": "fp32"}], "bf17"),
     ([{"until_step": 5, "plan": "bf16"}, {"until_step": 3, "plan": "fp16"}, {"plan": "fp32"}], "after"),
     ([{"until": 5, "plan": "bf16"}, {"plan": "fp32"}], "unknown keys")],
)
def test_schedule_validation(phases, match):
    with pytest.raises(PolicyError, match=match):
        SchedulePolicy(phases)


def test_replay_gives_identical_plans(tmp_path):
    live = with_guard(CyclicPolicy(num_cycles=3, bmin=4, bmax=8), quiet_steps=5)
    plan = live.setup(TEMPLATE, total_steps=60)
    tl = Timeline(plan)
    recorded = []
    for step in range(60):
        nonfinite = step in (16, 17)  # twice in a row in the same module's gradients: the guard steps in at 17
        new = live.decide(Snapshot(step=step, epoch=0, plan=plan, nonfinite=nonfinite, nonfinite_cause="gradients",
                                   overflowed=("l2",)), step)
        tl.record_plan_change(step, plan, new, live.name, live.last_reasons)
        plan = new
        recorded.append(plan)
    path = tmp_path / "t.json"
    tl.to_json(path)
    for rp in (ReplayPolicy(tl), build(f"replay:{path}"), ReplayPolicy(str(path))):
        p = rp.setup(TEMPLATE)
        assert p == tl.initial
        for step in range(60):
            p = rp.decide(snap(step, p), step)
            assert p == recorded[step], step
    changed = [e for e in tl.events if e.step == 17]
    assert changed and all("guard" in e.reason for e in changed)


def test_replay_rejects_other_models(tmp_path):
    tl = Timeline(PrecisionPlan.uniform(["x"]))
    rp = ReplayPolicy(tl)
    plan = rp.setup(TEMPLATE)  # while the engine discovers modules the template may still grow
    with pytest.raises(PolicyError, match="does not run"):
        rp.decide(snap(0, plan), 0)  # the first decision comes after discovery: now it is an error


def test_with_guard_accepts_names_and_does_not_double_wrap():
    g = with_guard("error-budget")
    assert isinstance(g, Guard) and with_guard(g) is g
