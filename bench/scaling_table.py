"""The scaling table of docs/scaling.md: models on the meta device, priced on target rooflines (simulated).

    PYTHONPATH=src python bench/scaling_table.py            # prints the markdown tables and the calibration
    PYTHONPATH=src python bench/scaling_table.py --json out.json

Nothing here is measured: every figure is *simulated for* a target profile.
The H100 calibration solves for the achievable compute fraction that makes
the modeled bf16 step of Llama-3.1-8B (2 x 8192 tokens per GPU, optimizer on
an FSDP-8 shard) take as long as torchtitan's published measured figure.
"""

from __future__ import annotations

import argparse
import json
import sys

from adaprec.explainer import simulate_config
from adaprec.simulation import Simulation

MODELS = (("gpt2-124m", "GPT-2 124M"), ("llama-1b", "Llama-style 1B (Llama-3.2-1B shape)"),
          ("llama2-7b", "Llama-2-7B"), ("llama2-70b", "Llama-2-70B"))
TARGETS = ("h100-sxm", "a100")
BATCH, SEQ = 8, 2048  # 16,384 tokens per step
GRID_KG_PER_KWH = 0.4
# torchtitan docs/performance.md, Table 1: Llama 3.1 8B, 8 H100, FSDP + torch.compile, bf16, local batch 2,
# seq_len 8192, selective activation checkpointing: 6,667 tokens/s per GPU
CAL_TPS, CAL_BATCH, CAL_SEQ, CAL_SHARDS = 6667.0, 2, 8192, 8


def bf16_time(sim: Simulation, eta: float, shards: int = 1) -> float:
    """The bf16 regime's step time with achievable compute fraction ``eta`` (optimizer on 1/shards)."""
    eta0 = sim.profile["compute_efficiency"]
    gemm = sum(max(r.times["bf16"].compute_s * eta0 / eta, r.times["bf16"].memory_s) for r in sim.rows)
    b = sim.regimes["bf16"]
    return gemm + b.non_gemm_s + b.optimizer_s / shards


def calibrate() -> dict:
    sim = simulate_config("llama3.1-8b", "h100-sxm", batch=CAL_BATCH, seq_len=CAL_SEQ)
    want = CAL_BATCH * CAL_SEQ / CAL_TPS
    lo, hi = 0.05, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if bf16_time(sim, mid, CAL_SHARDS) > want else (lo, mid)
    eta = (lo + hi) / 2
    now = bf16_time(sim, sim.profile["compute_efficiency"], CAL_SHARDS)
    plan = sim.regimes["plan"]
    plan_t = plan.gemm.time_s + plan.non_gemm_s + plan.optimizer_s / CAL_SHARDS
    fp8 = simulate_config("llama3.1-8b", "h100-sxm", batch=CAL_BATCH, seq_len=CAL_SEQ,
                          formats=("fp8_e4m3", "fp8_e5m2", "bf16"))
    f = fp8.regimes["plan"]
    fp8_t = f.gemm.time_s + f.non_gemm_s + f.optimizer_s / CAL_SHARDS
    return {"measured_step_s": want, "eta_solved": eta, "profile_eta": sim.profile["compute_efficiency"],
            "modeled_bf16_step_s_with_profile_eta": now, "error_vs_measured": now / want - 1,
            "plan_speedup_vs_bf16": now / plan_t, "fp8_only_speedup_vs_bf16": now / fp8_t}


def row(sim: Simulation) -> dict:
    p, b, f = (sim.regimes[k] for k in ("plan", "bf16", "fp32"))
    proj = sim.projection(grid_kg_per_kwh=GRID_KG_PER_KWH)
    gib = 1024**3
    return {
        "params_b": sim.parameters / 1e9, "plan_ms": p.time_s * 1e3, "bf16_ms": b.time_s * 1e3,
        "fp32_ms": f.time_s * 1e3, "plan_j": p.energy_j, "bf16_j": b.energy_j, "fp32_j": f.energy_j,
        "speedup_vs_bf16": sim.speedup("bf16"), "energy_saving_vs_bf16": 1 - p.energy_j / b.energy_j,
        "mac_share": sim.mac_share(), "mem_gib": {k: {r: sim.regimes[r].memory[k] / gib for r in ("plan", "bf16")}
                                                   for k in ("weights", "gradients", "optimizer_state", "activations", "total")},
        "run": {k: proj[k] for k in ("plan", "bf16")}, "run_tokens": proj["tokens"],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-70b", action="store_true")
    args = ap.parse_args()
    out: dict = {"calibration": calibrate(), "tables": {}}
    c = out["calibration"]
    print(f"calibration: measured {c['measured_step_s']:.3f} s per step; solved achievable compute "
          f"{c['eta_solved']:.3f}; with the profile's {c['profile_eta']:.3f}: modeled "
          f"{c['modeled_bf16_step_s_with_profile_eta']:.3f} s ({100 * c['error_vs_measured']:+.1f} %); "
          f"plan {c['plan_speedup_vs_bf16']:.2f}x, fp8-only plan {c['fp8_only_speedup_vs_bf16']:.2f}x vs bf16")
    for target in TARGETS:
        print(f"\n### simulated for {target}: {BATCH} x {SEQ} tokens per step\n")
        print("| model | params | plan ms | bf16 ms | fp32 ms | plan vs bf16 | energy plan / bf16 (J) | MACs by format "
              "(plan) | peak memory plan / bf16 (GiB): weights, grads, optimizer, activations, total | 20 tok/param run: "
              "plan / bf16 MWh | tCO2e plan / bf16 |")
        print("|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")
        for spec, label in MODELS:
            if args.skip_70b and spec == "llama2-70b":
                continue
            r = row(simulate_config(spec, target, batch=BATCH, seq_len=SEQ))
            out["tables"].setdefault(target, {})[spec] = r
            share = ", ".join(f"{k} {100 * v:.0f} %" for k, v in r["mac_share"].items())
            m = r["mem_gib"]
            mem = "; ".join(f"{m[k]['plan']:.1f} / {m[k]['bf16']:.1f}"
                            for k in ("weights", "gradients", "optimizer_state", "activations", "total"))
            print(f"| {label} | {r['params_b']:.3g} B | {r['plan_ms']:.1f} | {r['bf16_ms']:.1f} | {r['fp32_ms']:.0f} | "
                  f"{r['speedup_vs_bf16']:.2f}x | {r['plan_j']:.3g} / {r['bf16_j']:.3g} | {share} | {mem} | "
                  f"{r['run']['plan']['kwh'] / 1e3:.3g} / {r['run']['bf16']['kwh'] / 1e3:.3g} | "
                  f"{r['run']['plan']['tco2e']:.3g} / {r['run']['bf16']['tco2e']:.3g} |")
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
