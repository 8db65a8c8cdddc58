"""Simulated step cost on a target: roofline arithmetic, the plan the rules allow there, the errors."""

from __future__ import annotations

import json

import pytest
import torch

import adaprec
from adaprec.cli import main
from adaprec.energy import load_profile
from adaprec.energy.roofline import RooflineTime, bytes_time, gemm_time, load_target
from adaprec.errors import AdaprecError, ProfileError
from adaprec.policies.error_budget import DEFAULT_LADDERS
from adaprec.simulation import plan_for_target


def test_roofline_compute_bound_gemm_by_hand() -> None:
    h = load_profile("h100-sxm")
    eta, bw = h.compute_efficiency, h.bandwidth_bytes_s * h.memory_efficiency
    m = n = k = 8192  # 2 M N K = 1.0995e12 FLOP; bytes of three bf16 matrices: 3 x 2 x 8192^2
    t = gemm_time(h, [("bf16", m * n * k)], 3 * 2 * m * n)
    assert t.compute_s == pytest.approx(2 * m * n * k / (989e12 * eta))
    assert t.memory_s == pytest.approx(3 * 2 * m * n / bw)
    assert t.bound == "compute" and t.time_s == t.compute_s
    fp8 = gemm_time(h, [("fp8_e4m3", m * n * k)], 3 * 1 * m * n)
    assert fp8.compute_s == pytest.approx(t.compute_s * 989 / 1979)


def test_roofline_memory_bound_gemm_by_hand() -> None:
    a = load_profile("a100")
    # a matrix-vector product: 4096 x 4096 weights in bf16 read once, 1 token
    macs, nbytes = 4096 * 4096, 4096 * 4096 * 2 + 2 * 4096 * 2
    t = gemm_time(a, [("bf16", macs)], nbytes)
    assert t.memory_s == pytest.approx(nbytes / (2039e9 * a.memory_efficiency))
    assert t.bound == "memory" and t.time_s == t.memory_s
    both = t + RooflineTime.of(1.0, 0.5)
    assert both.time_s == pytest.approx(t.time_s + 1.0)
    assert bytes_time(a, 2039e9 * a.memory_efficiency) == pytest.approx(1.0)


def test_profiles_have_sources_peaks_and_native_sets() -> None:
    for name, fp8 in (("h100-sxm", True), ("a100", False), ("rtx-4090", True), ("cpu-epyc-2t", False)):
        p = load_target(name)
        assert p.sources and p.native["gemm"]
        assert ("fp8_e4m3" in p.native["gemm"]) == fp8
        assert 0 < p.compute_efficiency <= 1 and p.calibration
    assert load_profile("a100").peak("bf16")[0] == 312e12


def test_unknown_target_names_the_known_ones() -> None:
    with pytest.raises(ProfileError) as info:
        load_target("h200")
    for name in ("h100-sxm", "a100", "rtx-4090", "cpu-epyc-2t"):
        assert name in str(info.value)
    with pytest.raises(ProfileError, match="energy table"):
        load_target("7nm")


def test_plan_for_target_narrowest_native_with_pins_and_edges_wide() -> None:
    mods = [("emb", "embedding"), ("first", "linear"), ("mid", "linear"), ("attn", "attention"), ("head", "linear")]
    h100 = plan_for_target(mods, load_profile("h100-sxm"), DEFAULT_LADDERS, pinned={"emb": "fp32"},
                           edges=["first", "head"])
    assert h100["emb"][0]["weight"] == "fp32"
    assert h100["mid"][0] == {"weight": "int8", "activation": "int8", "grad_output": "int8", "grad_weight": "bf16"}
    assert h100["first"][0]["weight"] == "bf16" and h100["head"][0]["activation"] == "bf16"
    assert h100["attn"][0]["activation"] == "bf16"  # one 16-bit dtype for activation x activation products
    fp8 = plan_for_target(mods, load_profile("h100-sxm"), DEFAULT_LADDERS, allow=["fp8_e4m3", "fp8_e5m2", "bf16"])
    assert fp8["mid"][0]["weight"] == "fp8_e4m3" and fp8["mid"][0]["grad_output"] == "fp8_e5m2"
    a100 = plan_for_target(mods, load_profile("a100"), DEFAULT_LADDERS, allow=["fp8_e4m3", "fp8_e5m2", "bf16"])
    assert a100["mid"][0]["weight"] == "bf16"  # no fp8 units on an A100
    cpu = plan_for_target(mods, load_profile("cpu-epyc-2t"), DEFAULT_LADDERS)
    assert cpu["attn"][0]["activation"] == "fp32"  # bf16 attention measured slower here: not native-fast


def test_simulated_linear_row_matches_hand_roofline() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 10))
    x = torch.randn(64, 256)
    sim = adaprec.simulate(model, x, "h100-sxm")
    assert sim.label == "simulated for h100-sxm"
    mid = next(r for r in sim.rows if r.module == "2")
    assert mid.roles["weight"] == "int8"
    macs = 64 * 512 * 512
    h = load_profile("h100-sxm")
    # bf16 baseline: three GEMMs at the bf16 peak; bytes from the ledger's element counts at 2 bytes each
    compute = 3 * 2 * macs / (989e12 * h.compute_efficiency)
    assert mid.times["bf16"].compute_s == pytest.approx(compute)
    assert mid.times["plan"].compute_s == pytest.approx(compute * 989 / 1979)
    assert mid.bytes_moved["fp32"] == pytest.approx(2 * mid.bytes_moved["bf16"])
    assert sim.regimes["plan"].time_s < sim.regimes["bf16"].time_s < sim.regimes["fp32"].time_s
    p = sim.regimes["plan"]
    assert p.energy_j == pytest.approx(p.time_s * 700)
    assert sim.parameters == sum(q.numel() for q in model.parameters())
    proj = sim.projection(tokens=1e9, grid_kg_per_kwh=0.5)
    assert proj["bf16"]["kwh"] == pytest.approx(1e9 / 64 * sim.regimes["bf16"].energy_j / 3.6e6)
    assert proj["bf16"]["tco2e"] == pytest.approx(proj["bf16"]["kwh"] * 0.5 / 1000)
    text = sim.table()
    assert "simulated for h100-sxm" in text and "NVIDIA H100" in text and "nothing below was measured" in text


def test_explain_with_target_keeps_simulation_apart() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    e = adaprec.explain(model, torch.randn(8, 32), hardware=None, target="a100")
    d = e.to_dict()
    assert d["simulation"]["label"] == "simulated for a100" and "fp32_j" in d
    assert "simulated for a100" in e.table()


def _tiny_config(tmp_path) -> str:  # noqa: ANN001
    pytest.importorskip("transformers")
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_cli_simulate_json_and_table(tmp_path, capsys) -> None:  # noqa: ANN001
    cfg = _tiny_config(tmp_path)
    assert main(["simulate", cfg, "--target", "rtx-4090", "--seq-len", "32", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["label"] == "simulated for rtx-4090" and d["tokens_per_step"] == 32
    assert d["regimes"]["plan"]["time_s"] > 0 and d["profile"]["sources"]
    assert main(["explain", cfg, "--meta", "--target", "h100-sxm", "--seq-len", "16", "--format", "plain"]) == 0
    assert "simulated for h100-sxm" in capsys.readouterr().out


def test_cli_unknown_target_and_model_are_user_errors(tmp_path, capsys) -> None:  # noqa: ANN001
    cfg = _tiny_config(tmp_path)
    assert main(["simulate", cfg, "--target", "h200"]) == 2
    assert "a100" in capsys.readouterr().err
    assert main(["simulate", "no-such-model"]) == 2
    assert "llama2-7b" in capsys.readouterr().err
    with pytest.raises(AdaprecError):
        adaprec.simulate(torch.nn.Linear(2, 2), torch.randn(1, 2), "nope")
