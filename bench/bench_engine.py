"""Training-step time: plain PyTorch fp32 vs adaprec (fp32 plan, fp8-hybrid emulated), side by side.

Targets (issue: engine): the fp32 plan costs at most 1.05x plain fp32 (the
price of the machinery itself); the fp8-hybrid emulated plan at most 1.5x.
Also measured: monitoring overhead of error-budget sampling every 10 steps
(issue: adaptive core, target at most 5 % of step time). It is measured
inside one run, past the warm-up: the extra time of the sampled steps
(measurement, snapshot, policy decision) over the median unsampled step,
spread over the 10 steps of a period. Comparing with a run that never
samples would be unfair, since that run never leaves the warm-up plan.

Each variant runs interleaved in rounds (plain, fp32 plan, ... , plain, ...)
so drift on a shared machine hits all of them alike; the figure is the
median over rounds of the mean step time in that round.

Run: ``python bench/bench_engine.py [--rounds 5] [--steps 30] [--write]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import adaprec  # noqa: E402
from _markdown import write_section  # noqa: E402
from adaprec.experiments.tasks import get_task  # noqa: E402


def _batches(task, n: int):
    out = []
    while len(out) < n:
        for b in task.train_loader(len(out)):
            out.append(b)
            if len(out) == n:
                break
    return out


def _variant(task, policy: str | None, **ap_kwargs) -> Callable[[list], float]:
    model = task.make_model(0)
    opt = task.make_optimizer(model)
    ap = None if policy is None else adaprec.AdaptivePrecision(model, opt, policy, **ap_kwargs)

    def run(batches: list) -> float:
        t0 = time.perf_counter()
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            if ap is None:
                task.loss_fn(model(x), y).backward()
                opt.step()
            else:
                with ap.autocast():
                    loss = task.loss_fn(model(x), y)
                ap.backward(loss)
                ap.step()
        return (time.perf_counter() - t0) / len(batches)

    return run


VARIANTS = {
    "plain fp32": (None, {}),
    "adaprec fp32 plan": ("fp32", {"guard": False, "monitor_every": 10**9}),
    "adaprec fp32 plan + guard": ("fp32", {"monitor_every": 10**9}),
    "adaprec fp8-hybrid (emulated)": ("fp8-hybrid", {"guard": False, "monitor_every": 10**9, "backend": "emulate"}),
    "adaprec fp8-hybrid (emulated, compiled casts)": (
        "fp8-hybrid", {"guard": False, "monitor_every": 10**9, "backend": "emulate", "compile": True}
    ),
}
MONITOR_EVERY = 10


def monitoring_overhead(task, settle: int, timed: int) -> tuple[float, float, float]:
    """(median unsampled step, median sampled step, overhead fraction) of error-budget, past warm-up."""
    batches = _batches(task, settle + timed)
    model = task.make_model(0)
    opt = task.make_optimizer(model)
    ap = adaprec.AdaptivePrecision(
        model, opt, "error-budget", guard=False, monitor_every=MONITOR_EVERY, backend="emulate",
        total_steps=settle + timed,
    )
    times: list[float] = []
    for x, y in batches:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with ap.autocast():
            loss = task.loss_fn(model(x), y)
        ap.backward(loss)
        ap.step()
        times.append(time.perf_counter() - t0)
    steps = range(settle, settle + timed)
    sampled = statistics.median(times[i] for i in steps if i % MONITOR_EVERY == 0)
    plain = statistics.median(times[i] for i in steps if i % MONITOR_EVERY != 0)
    return plain, sampled, (sampled - plain) / (MONITOR_EVERY * plain)


def bench_task(name: str, rounds: int, steps: int) -> dict[str, float]:
    task = get_task(name)
    batches = _batches(task, steps)
    runs = {k: _variant(task, p, **kw) for k, (p, kw) in VARIANTS.items()}
    for run in runs.values():  # warm-up: first-call costs, compiles, allocator
        run(batches[:5])
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            times[k].append(run(batches))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--settle", type=int, default=100, help="error-budget steps before timing (warm-up ends)")
    ap.add_argument("--timed", type=int, default=200, help="error-budget steps timed for the monitoring overhead")
    ap.add_argument("--tasks", nargs="+", default=["digits-cnn", "char-transformer"])
    ap.add_argument("--write", action="store_true", help="write the table to docs/BENCHMARKS.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    lines = [
        f"Measured on this machine: {torch.get_num_threads()} threads, torch {torch.__version__}, CPU only; "
        f"{args.rounds} interleaved rounds of {args.steps} steps, median of round means. Monitoring overhead: "
        f"one error-budget run of {args.settle + args.timed} steps (warm-up a tenth of them), sampling every "
        f"{MONITOR_EVERY}; the last {args.timed} steps timed one by one.",
        "",
        "| task | variant | step time (ms) | ratio to plain fp32 | target | met |",
        "|---|---|---:|---:|---|---|",
    ]
    for name in args.tasks:
        t = bench_task(name, args.rounds, args.steps)
        base = t["plain fp32"]
        for k, v in t.items():
            ratio = v / base
            target, met = "", ""
            if k == "adaprec fp32 plan":
                target, met = "<= 1.05x", "yes" if ratio <= 1.05 else "no"
            elif k.startswith("adaprec fp8-hybrid"):
                target, met = "<= 1.5x", "yes" if ratio <= 1.5 else "no"
            lines.append(f"| {name} | {k} | {v * 1e3:.2f} | {ratio:.2f}x | {target} | {met} |")
        plain, sampled, mon = monitoring_overhead(get_task(name), args.settle, args.timed)
        lines += [
            f"| {name} | adaprec error-budget, unsampled step (median) | {plain * 1e3:.2f} | {plain / base:.2f}x |  |  |",
            f"| {name} | adaprec error-budget, sampled step (median) | {sampled * 1e3:.2f} | {sampled / base:.2f}x |  |  |",
            f"| {name} | monitoring overhead (sampled-step extra / {MONITOR_EVERY} steps) | | {100 * mon:+.1f} % "
            f"| <= 5 % | {'yes' if mon <= 0.05 else 'no'} |",
        ]
        print("\n".join(lines[-len(t) - 3 :]), flush=True)
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("Training-step overhead (issues: engine, adaptive core)", table)


if __name__ == "__main__":
    main()
