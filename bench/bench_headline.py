"""The headline benchmark: every task x every policy x 3 seeds, against fp32.

For each task it runs ``adaprec run`` (through :func:`run_experiment`) with
all policies, then reads the result store and tabulates, per policy: quality
(mean over seeds) and its difference from fp32, the measured step time and
its saving against fp32 on this machine, the modeled energy on what executed
(profile 7nm) and its saving, the share of MACs run natively in 8-bit or
narrower formats, the share emulated, and the coverage. Policies whose
formats this machine lacks (fp8, fixed point below 8 bits) run emulated:
their modeled saving is what ran (none), not what another device would do.

Resumable: rerun with the same ``--out`` and finished runs are kept.

Run: ``python bench/bench_headline.py [--seeds 3] [--tasks ...] [--out runs/headline] [--write]``
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import write_section  # noqa: E402
from adaprec.experiments.config import ExperimentConfig  # noqa: E402
from adaprec.experiments.runner import run_experiment  # noqa: E402
from adaprec.formats import get  # noqa: E402

TASKS = ["digits-cnn", "mnist1d-cnn", "mnist-mlp", "char-transformer"]
POLICIES = ["bf16", "fp8-hybrid", "cyclic", "progressive", "gradient-diversity", "error-budget"]


def _collect(run_dir: Path) -> tuple[str, bool, dict[str, dict[str, float]]]:
    con = sqlite3.connect(run_dir / "runs.sqlite")
    rows = con.execute(
        "select r.run_id, r.policy, r.metric, r.higher_is_better, r.final_metric, s.json "
        "from runs r join summary s on s.run_id = r.run_id where r.status = 'finished'"
    ).fetchall()
    con.close()
    per: dict[str, dict[str, list[float]]] = {}
    metric, higher = "", True
    for _run_id, policy, run_metric, run_higher, final, summary_json in rows:
        metric, higher = run_metric, run_higher
        s = json.loads(summary_json)
        energy = s.get("energy", s)
        macs = energy["macs_by_format"]
        total = max(1, sum(macs.values()))
        low = sum(v for f, v in macs.items() if "(emulated)" not in f and get(f).bits <= 8) / total
        emu = sum(v for f, v in macs.items() if "(emulated)" in f) / total
        d = per.setdefault(policy, {"q": [], "j": [], "fp32j": [], "low": [], "emu": [], "t": [], "cov": []})
        d["q"].append(float(final))
        d["j"].append(float(energy["modeled_j"]))
        d["fp32j"].append(float(energy["fp32_modeled_j"]))
        d["low"].append(low)
        d["emu"].append(emu)
        d["cov"].append(float(energy.get("coverage") or 0.0))
        if energy.get("wall_s") and energy.get("timed_steps"):
            d["t"].append(float(energy["wall_s"]) / energy["timed_steps"])
    out = {
        p: {
            "q": statistics.mean(d["q"]),
            "q_sd": statistics.pstdev(d["q"]),
            "j": statistics.mean(d["j"]),
            "saving": 1 - sum(d["j"]) / sum(d["fp32j"]),
            "low": statistics.mean(d["low"]),
            "emu": statistics.mean(d["emu"]),
            "cov": statistics.mean(d["cov"]),
            "t": statistics.mean(d["t"]) if d["t"] else float("nan"),
            "n": len(d["q"]),
        }
        for p, d in per.items()
    }
    return metric, bool(higher), out


def _forget(run_dir: Path, policies: list[str]) -> None:
    """Drop the runs of ``policies`` (rows and checkpoints) so a resumed run trains them again."""
    if not (run_dir / "runs.sqlite").exists():
        return
    con = sqlite3.connect(run_dir / "runs.sqlite")
    with con:
        for (run_id,) in con.execute(
            f"select run_id from runs where policy in ({','.join('?' * len(policies))})", policies
        ).fetchall():
            for table in ("steps", "timeline", "energy", "evals", "summary", "runs"):
                con.execute(f"delete from {table} where run_id = ?", (run_id,))
            for ckpt in (run_dir / "checkpoints").glob(f"{run_id}*"):
                ckpt.unlink()
    con.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--out", default="runs/headline")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--eager", action="store_true", help="no torch.compile of the casts (same bits, slower)")
    ap.add_argument("--redo", nargs="*", default=[], help="policies to train again (after a policy change)")
    ap.add_argument("--char-steps", type=int, default=None, help="steps of char-transformer (default: its 2000)")
    args = ap.parse_args()
    lines = [
        ("All tasks at their default steps" + (f" (char-transformer: {args.char_steps})" if args.char_steps else "")
         + f", {args.seeds} seeds. Step time is **measured** on this machine "
         "(mean over the run, all runs one after another); energy is **modeled** with profile 7nm on what "
        "executed (emulated formats priced as the fp32 they ran as; no meter on this machine). Quality: "
        "accuracy (higher is better) or bits per character (lower is better); Δ is against fp32 in the "
        "same units (accuracy in points)."),
        "",
        "| task | policy | quality (mean ± sd) | Δ vs fp32 | step time (ms) | time saving vs fp32 | modeled energy (J) "
        "| energy saving vs fp32 | MACs native ≤8-bit | MACs emulated | coverage |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for task in args.tasks:
        run_dir = Path(args.out) / task
        _forget(run_dir, args.redo)
        config = ExperimentConfig(
            task=task, policies=args.policies, seeds=args.seeds, quiet=True, compile=not args.eager,
            **({"steps": args.char_steps} if task == "char-transformer" and args.char_steps else {}),
        )
        run_experiment(config, out_dir=run_dir, resume=(run_dir / "runs.sqlite").exists(), progress=False,
                       report=False)
        metric, higher, res = _collect(run_dir)
        base = res["fp32"]["q"]
        scale = 100.0 if higher else 1.0
        base_t = res["fp32"]["t"]
        for policy in ["fp32"] + [p for p in args.policies if p in res]:
            r = res[policy]
            delta = (r["q"] - base) * scale
            lines.append(
                f"| {task} | {policy} | {r['q']:.4f} ± {r['q_sd']:.4f} | {delta:+.2f}{' pt' if higher else ''} | "
                f"{1e3 * r['t']:.1f} | {100 * (1 - r['t'] / base_t):.1f} % | {r['j']:.4g} | {100 * r['saving']:.1f} % | "
                f"{100 * r['low']:.0f} % | {100 * r['emu']:.0f} % | {100 * r['cov']:.0f} % |"
            )
        if "error-budget" in res:
            eb = res["error-budget"]
            ok_q = (base - eb["q"]) * 100 <= 0.5 if higher else eb["q"] <= base * 1.01
            verdicts.append(
                f"- {task}: error-budget {100 * (1 - eb['t'] / base_t):.1f} % less step time than fp32 (measured), "
                f"{100 * eb['saving']:.1f} % modeled energy saving (goal 75 %: "
                f"{'met' if eb['saving'] >= 0.75 else 'NOT met'}), quality "
                f"{'within' if ok_q else 'OUTSIDE'} the tolerance ({metric})."
            )
        print("\n".join(lines[-len(res):]), flush=True)
    table = "\n".join(lines + ["", "Goal for error-budget:", *verdicts])
    print(table)
    if args.write:
        write_section("Headline: energy saving and quality per task and policy (issue: main job)", table)


if __name__ == "__main__":
    main()
