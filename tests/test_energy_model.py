"""Profiles, BitOPs, the energy model and the ledger, checked against hand arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaprec.energy.ledger as ledger_mod
from adaprec.energy import EnergyLedger, MacCounter, StepCost, bitops, list_profiles, load_profile, price_step
from adaprec.engine import Capabilities, PrecisionEngine
from adaprec.errors import CheckpointError, ProfileError
from adaprec.formats import get
from adaprec.plan import ModulePrecision, PrecisionPlan, TensorRecipe

NAMES = ["0", "1"]
B, D0, D1, D2 = 5, 8, 16, 4


BF16_FAST = Capabilities(native={"gemm": frozenset({"bf16"})}, fast={"gemm": frozenset({"bf16"})})


def _step_cost(plan: str | ModulePrecision = "fp32", caps: Capabilities | None = None) -> StepCost:
    """One training step of a pure-matmul model: x(B,D0) -> W1 -> W2, no bias, x without grad.

    Run by the engine under ``plan``: natively where ``caps`` allows, emulated otherwise.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D0, D1, bias=False), nn.Linear(D1, D2, bias=False))
    x = torch.randn(B, D0)
    eng = PrecisionEngine(model, backend="auto" if caps else "emulate", capabilities=caps)
    eng.discover(x)
    eng.set_plan(PrecisionPlan.uniform(eng.kinds, plan))
    eng.begin_step(0, False)
    with eng.activate():
        y = model(x)
    y.sum().backward()
    eng.commit_backward()
    return eng.pop_step_cost()


def _by_hand(profile_name: str, mac_pj: dict[str, float], fmt_bytes: dict[str, float]) -> float:
    """Joules of the step above, priced from the profile's per-op and per-byte figures.

    ``mac_pj`` maps the GEMM formats (w/a/go) to the pJ of one MAC;
    ``fmt_bytes`` the bytes per element of each role.
    """
    p = load_profile(profile_name)
    m1, m2 = B * D0 * D1, B * D1 * D2
    # layer 1: forward + weight grad (its input needs no grad); layer 2: all three
    compute_pj = (2 * m1 + 3 * m2) * mac_pj["gemm"]
    w, a, go, gw, opt = (fmt_bytes[k] for k in ("weight", "activation", "grad_output", "grad_weight", "opt"))
    n_w1, n_w2 = D0 * D1, D1 * D2
    x, h, y = B * D0, B * D1, B * D2
    bytes_l1 = n_w1 * w + (x + h) * a + h * go + x * a + n_w1 * gw + 4 * n_w1 * opt
    # layer 2 also re-reads W2 for the input grad and writes the grad of h
    bytes_l2 = 2 * n_w2 * w + (h + y) * a + (y + h) * go + h * a + n_w2 * gw + 4 * n_w2 * opt
    return (compute_pj + (bytes_l1 + bytes_l2) * p.pj_per_byte) * 1e-12


@pytest.mark.parametrize("profile_name", ["7nm", "45nm"])
def test_modeled_saving_of_bf16_and_fp8_plans_matches_hand_computation(profile_name: str) -> None:
    p = load_profile(profile_name)
    cost = _step_cost()
    mac = {f: p.op_energy(f)[0].mult + p.op_energy(f)[0].add for f in ("fp32", "bf16", "fp8_e4m3")}
    assert mac["fp32"] == p.ops["fp32"].mult + p.ops["fp32"].add  # a table row, not the rule
    e32 = _by_hand(profile_name, {"gemm": mac["fp32"]}, dict(weight=4, activation=4, grad_output=4, grad_weight=4, opt=4))
    e16 = _by_hand(profile_name, {"gemm": mac["bf16"]}, dict(weight=2, activation=2, grad_output=2, grad_weight=2, opt=4))
    # fp8 preset: w/a/go in E4M3 (1 byte), weight grad kept in bf16, optimizer state fp32
    e8 = _by_hand(profile_name, {"gemm": mac["fp8_e4m3"]}, dict(weight=1, activation=1, grad_output=1, grad_weight=2, opt=4))
    # the plan's formats, priced as if they ran natively (the simulated figure)
    planned = {preset: price_step(_step_cost(preset), p, "planned").modeled_j for preset in ("fp32", "bf16", "fp8")}
    assert price_step(cost, p).modeled_j == pytest.approx(e32, rel=1e-12)
    assert planned["fp32"] == pytest.approx(e32, rel=1e-12)
    assert 1 - planned["bf16"] / planned["fp32"] == pytest.approx(1 - e16 / e32, rel=1e-12)
    assert 1 - planned["fp8"] / planned["fp32"] == pytest.approx(1 - e8 / e32, rel=1e-12)
    assert planned["fp8"] < planned["bf16"] < planned["fp32"]
    # what executed: emulated formats are the fp32 they ran as; native bf16 stores w/a/go in 2 bytes,
    # while the weight gradient and the optimizer state stay fp32 in memory
    assert price_step(_step_cost("fp8"), p).modeled_j == pytest.approx(e32, rel=1e-12)
    e16_native = _by_hand(profile_name, {"gemm": mac["bf16"]}, dict(weight=2, activation=2, grad_output=2, grad_weight=4, opt=4))
    assert price_step(_step_cost("bf16", BF16_FAST), p).modeled_j == pytest.approx(e16_native, rel=1e-12)
    # the counterfactuals do not depend on what ran
    assert price_step(_step_cost("bf16", BF16_FAST), p, "fp32").modeled_j == pytest.approx(e32, rel=1e-12)


def test_scaling_rule_for_uncovered_formats_by_hand() -> None:
    p = load_profile("7nm")
    floats = [("fp32", 24, 32), ("bf16", 8, 16), ("fp16", 11, 16)]  # (name, mantissa+1, bits)
    c_mult = sum(p.ops[n].mult / s**2 for n, s, _ in floats) / 3
    c_add = sum(p.ops[n].add / b for n, _, b in floats) / 3
    op, assumed = p.op_energy("fp8_e4m3")
    assert assumed
    assert op.mult == pytest.approx(c_mult * 4**2) and op.add == pytest.approx(c_add * 8)
    # cross-check: an fp8 MAC costs 1.5-2.8x an int8 MAC in hardware studies
    assert 1.5 <= op.mac / p.mac_pj("int8") <= 2.8
    # table formats are not assumed; int4 scales from int8 by bits^2 / bits
    assert p.op_energy("bf16") == (p.ops["bf16"], False)
    int4, assumed4 = p.op_energy("int4")
    assert assumed4 and int4.mult == pytest.approx(p.ops["int8"].mult / 4) and int4.add == pytest.approx(p.ops["int8"].add / 2)


def test_cpt_bitops_formula() -> None:
    bw, ba, bg = 8, 6, 16
    mp = ModulePrecision(weight="int8", activation="fp6_e3m2", grad_output="bf16")
    assert (get("int8").bits, get("fp6_e3m2").bits, get("bf16").bits) == (bw, ba, bg)
    model = nn.Linear(12, 7)
    with MacCounter(model) as c:
        model(torch.randn(3, 12, requires_grad=True)).sum().backward()
        cost = c.pop_step_cost()
    assert {g.gemm for g in cost.modules[""].gemms} == {"forward", "input_grad", "weight_grad"}
    macs = cost.modules[""].gemms[0].macs
    plan = PrecisionPlan({"": mp})
    assert bitops(cost, plan) / (3 * macs * 32 * 32) == pytest.approx((bw * ba + bw * bg + ba * bg) / (3 * 32**2))
    assert bitops(cost, PrecisionPlan.uniform([""], "fp32")) == 3 * macs * 32 * 32


def test_roofline_profile_by_hand() -> None:
    h = load_profile("h100-sxm")
    cost = _step_cost("bf16")
    priced = price_step(cost, h, "planned")
    for name, mc in cost.modules.items():
        pm = priced.modules[name]
        t_compute = 2 * mc.macs / h.peak_flops["bf16"]
        t_memory = pm.bytes_moved / h.bandwidth_bytes_s
        assert pm.modeled_j == pytest.approx(max(t_compute, t_memory) * h.board_power_w)
    assert h.peak("fp4_e2m1") == (h.peak_flops["fp8_e4m3"], True)
    assert any("upper-bound" in a for a in priced.assumptions)


def test_bundled_profiles_state_sources_and_uncertainty() -> None:
    assert {"7nm", "45nm", "h100-sxm"} <= set(list_profiles())
    for name in list_profiles():
        p = load_profile(name)
        assert p.sources and 0.3 <= p.uncertainty <= 0.5
    assert load_profile("7nm").pj_per_byte == pytest.approx((250 + 450) / 2 / 8)


_GOOD = """
name = "mine"
kind = "energy_table"
uncertainty = 0.4
sources = ["my lab bench"]
[ops]
fp32 = { mult = 2.0, add = 1.0 }
[memory]
traffic_level = "dram"
access_bits = 64
[memory.levels]
dram = [800.0, 800.0]
"""


def test_user_profile_path_and_validation(tmp_path) -> None:
    good = tmp_path / "mine.toml"
    good.write_text(_GOOD)
    p = load_profile(good)
    assert p.name == "mine" and p.mac_pj("fp32") == 3.0 and p.pj_per_byte == 100.0
    bad = tmp_path / "bad.toml"
    bad.write_text(_GOOD.replace('traffic_level = "dram"', ""))
    with pytest.raises(ProfileError, match=r"bad\.toml.*memory\.traffic_level"):
        load_profile(bad)
    bad.write_text(_GOOD.replace("add = 1.0", "plus = 1.0"))
    with pytest.raises(ProfileError, match=r"ops\.fp32\.add"):
        load_profile(bad)
    bad.write_text(_GOOD.replace('sources = ["my lab bench"]', ""))
    with pytest.raises(ProfileError, match="sources"):
        load_profile(bad)
    bad.write_text("name = ")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(bad)
    with pytest.raises(ProfileError, match="7nm"):
        load_profile("no-such-profile")


def test_ledger_summary_counterfactuals_and_labels() -> None:
    cost = _step_cost("fp8")  # emulated here: no fp8 units
    ledger = EnergyLedger("7nm", grid_intensity_g_per_kwh=400.0, target="h100-sxm")
    plan = PrecisionPlan.uniform(NAMES, "fp8")
    for step in range(3):
        ledger.record(step, plan, cost, measured_reason="no meter: test machine", wall_s=0.25)
    s = ledger.summary()
    p, h = load_profile("7nm"), load_profile("h100-sxm")
    assert s["modeled_j"] == pytest.approx(3 * price_step(cost, p).modeled_j)
    assert s["modeled_j"] == pytest.approx(s["fp32_modeled_j"])  # emulation saves nothing
    assert s["fp32_modeled_j"] == pytest.approx(3 * price_step(cost, p, "fp32").modeled_j)
    assert s["bf16_modeled_j"] == pytest.approx(3 * price_step(cost, p, "bf16").modeled_j)
    assert s["saving_vs_fp32"] == pytest.approx(0.0)
    assert s["macs_by_format"] == {"fp8_e4m3 (emulated)": 3 * cost.macs}
    assert s["emulated_formats"] == ["fp8_e4m3"] and s["native_formats"] == []
    assert s["emulated_mac_fraction"] == 1.0 and s["narrow_mac_fraction"] == 0.0 and s["coverage"] == 1.0
    assert s["wall_s"] == pytest.approx(0.75) and s["timed_steps"] == 3
    sim = s["simulated"]
    assert sim["target"] == "h100-sxm" and "simulated for h100-sxm" in sim["label"]
    assert sim["modeled_j"] == pytest.approx(3 * price_step(cost, h, "planned").modeled_j)
    assert 0 < sim["saving_vs_fp32"] < 1
    assert s["measured_j"] is None and s["measured_reason"] == "no meter: test machine"
    assert s["kind"]["modeled_j"] == "modeled (profile 7nm) on what executed"
    assert any("emulated GEMMs are priced as the fp32" in a for a in s["assumptions"])
    assert s["co2e_g"] == pytest.approx(s["modeled_j"] / 3.6e6 * 400.0)
    assert s["co2e_basis"] == "modeled (profile 7nm) on what executed"
    assert [r["step"] for r in ledger.steps()] == [0, 1, 2]
    assert s["bitops"] == 3 * cost.macs * 32 * 32  # what ran: fp32 arithmetic
    assert bitops(cost, plan) == cost.macs * 8 * 8  # the papers' measure: the plan's operand widths


def test_mixed_operands_are_attributed_to_the_wider_format() -> None:
    mixed = ModulePrecision(weight="fp8_e4m3", activation="bf16", grad_output="fp8_e5m2")
    cost = _step_cost(mixed)
    m1, m2 = B * D0 * D1, B * D1 * D2
    by = price_step(cost, load_profile("7nm"), "planned").macs_by_format()
    # forward (a=bf16, w=fp8) and weight grad (go=e5m2, a=bf16) -> bf16; input grad (e5m2 x e4m3) -> e4m3
    assert by == {"bf16": 2 * m1 + 2 * m2, "fp8_e4m3": m2}
    s = EnergyLedger().record(0, PrecisionPlan.uniform(NAMES, mixed), cost)
    assert s["macs_by_format"] == {"bf16 (emulated)": 2 * m1 + 2 * m2, "fp8_e4m3 (emulated)": m2}
    assert s["measured_j"] is None and s["measured_reason"]


def test_ledger_caches_pricing_and_round_trips_state(tmp_path, monkeypatch) -> None:
    calls = []
    real = ledger_mod.price_step
    monkeypatch.setattr(ledger_mod, "price_step", lambda *a: calls.append(1) or real(*a))
    plan = PrecisionPlan.uniform(NAMES, "bf16").with_role("1", "weight", TensorRecipe("fp8_e4m3"))
    cost = _step_cost(plan.get("1"))
    ledger = EnergyLedger("45nm")
    for step in range(5):
        ledger.record(step, plan, cost, measured_j=0.5 if step % 2 else None, measured_reason="window not closed")
    assert len(calls) == 3  # executed, fp32, bf16 priced once each
    path = tmp_path / "ledger.pt"
    torch.save(ledger.state_dict(), path)
    other = EnergyLedger("45nm")
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.summary() == ledger.summary()
    assert other.summary()["measured_j"] == pytest.approx(1.0)
    assert other.summary()["measured_steps"] == 2
    with pytest.raises(CheckpointError, match="45nm"):
        EnergyLedger("7nm").load_state_dict(ledger.state_dict())
    with pytest.raises(CheckpointError, match="missing"):
        EnergyLedger("45nm").load_state_dict({"rows": []})


def test_ledger_rows_share_what_steps_share_and_keep_little_per_step(tmp_path) -> None:
    """A long run's ledger grows by a step's own figures only (step, plan, wall time, meter), not a copy of
    everything priced: rows of one priced signature share one dict, in memory and after a reload."""
    import tracemalloc

    plan = PrecisionPlan.uniform(NAMES, "bf16")
    cost = _step_cost(plan.get("1"))
    ledger = EnergyLedger("45nm")
    ledger.record(0, plan, cost, wall_s=0.1)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for step in range(1, 2001):
        ledger.record(step, plan, cost, measured_reason="no meter", wall_s=0.1)
    per_step = (tracemalloc.get_traced_memory()[0] - before) / 2000
    tracemalloc.stop()
    assert per_step < 400, f"{per_step:.0f} bytes per recorded step"  # a dict per step copied ~1.7 KB
    steps = ledger.steps()
    assert len(steps) == 2001 and steps[5]["wall_s"] == 0.1 and steps[5]["macs"] == steps[0]["macs"]
    steps[5]["bytes_by_class"]["extra"] = 1.0  # a reader's copy: the ledger's shared figures stay as they were
    assert "extra" not in ledger.steps()[6]["bytes_by_class"]
    ledger.attribute_measured([(7, 2.5)], meter="test meter")
    assert ledger.steps()[7]["measured_j"] == 2.5 and ledger.steps()[8]["measured_j"] is None
    path = tmp_path / "ledger.pt"
    torch.save(ledger.state_dict(), path)
    other = EnergyLedger("45nm")
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.steps() == ledger.steps() and other.summary() == ledger.summary()
    assert other._rows[3].shared is other._rows[1500].shared
    # the checkpoint keeps columns: a few numbers a step (version 2's dict per step pickled to ~450 bytes)
    import pickle

    short = EnergyLedger("45nm")
    short.load_state_dict(torch.load(path, weights_only=True))
    short._rows = short._rows[:1001]
    per_step = (len(pickle.dumps(ledger.state_dict())) - len(pickle.dumps(short.state_dict()))) / 1000
    assert per_step < 64, f"{per_step:.0f} checkpoint bytes per step"
    # a version-2 checkpoint (a dict per step) still loads, its rows sharing again
    old = EnergyLedger("45nm")
    old.load_state_dict(dict(ledger.state_dict(), version=2, rows=ledger.steps()))
    assert old.steps() == ledger.steps() and old.summary() == ledger.summary()
    assert old._rows[3].shared is old._rows[1500].shared
    with pytest.raises(CheckpointError, match="malformed rows"):
        old.load_state_dict(dict(ledger.state_dict(), rows={"shared": [], "columns": {}}))
    assert old.steps() == ledger.steps()  # a bad state changed nothing
