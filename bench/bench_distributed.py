"""The cost of adaprec's one collective per step under torch.distributed (issue 12).

Two gloo ranks on this machine's CPU train the same model under DDP with adaprec
(error-budget, statistics sampled every ``--every`` steps). Every call of the
controller's exchange (:class:`adaprec.distributed.RankSync`) is timed where it
runs, split into sampled steps (the header plus the monitor's statistics) and
unsampled ones (the header alone: loss, inf/NaN flag, cast-fault count, plan and
site hashes, the step's ledger figures). Beside it, side by side in the same
process group: a bare ``all_reduce`` of one float (the latency floor of any
collective here) and the training step's own median time. Two models: the digits
CNN (3 sites) and a 12-layer MLP (12 sites), so the payload's growth shows.

Run: ``python bench/bench_distributed.py [--steps 120] [--every 10] [--write]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import adaprec  # noqa: E402
from _markdown import write_section  # noqa: E402

EB = {"name": "error-budget", "warmup_steps": 10, "patience": 2}


def _deep_mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, 256), nn.ReLU()]
    for _ in range(10):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10))


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "digits-cnn":
        from adaprec.experiments.tasks.digits import DigitsCNN

        torch.manual_seed(0)
        return DigitsCNN(), (1, 8, 8)
    return _deep_mlp(), (64,)


def _worker(rank: int, init: str, out: str, steps: int, every: int, models: list[str]) -> None:
    from _train import FAST_INT8_BF16

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    results = {}
    try:
        one = torch.zeros(1)
        for _ in range(20):
            dist.all_reduce(one)
        floor = []
        for _ in range(300):
            t = time.perf_counter()
            dist.all_reduce(one)
            floor.append(time.perf_counter() - t)
        results["all_reduce_1"] = statistics.median(floor)
        for name in models:
            model, shape = _model(name)
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
            ap = adaprec.AdaptivePrecision(ddp, opt, EB, hardware=FAST_INT8_BF16, monitor_every=every)
            sync = ap.reducer.sync
            timed: dict[str, list[float]] = {"sampled": [], "unsampled": []}
            sizes: dict[str, int] = {}
            exchange = sync.exchange

            def timed_exchange(step, *, sampled, payload, _ex=exchange, timed=timed, sizes=sizes, sync=sync,  # noqa: ANN001, ANN202
                               **kw):
                dist.barrier()  # align the ranks first: time the exchange, not the other rank's lag
                t = time.perf_counter()
                red = _ex(step, sampled=sampled, payload=payload, **kw)
                key = "sampled" if sampled else "unsampled"
                timed[key].append(time.perf_counter() - t)
                sizes[key] = 10 + len(kw["energy"]) + (sync.ex.capacity if sampled else 0)  # as sent, padding too
                return red

            sync.exchange = timed_exchange
            g = torch.Generator().manual_seed(rank)
            step_times = []
            for _ in range(steps):
                x = torch.randn(32, *shape, generator=g)
                y = torch.randint(0, 10, (32,), generator=g)
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                with ap.autocast():
                    loss = nn.functional.cross_entropy(ddp(x), y)
                ap.backward(loss)
                ap.step()
                step_times.append(time.perf_counter() - t)
            skip = 5
            results[name] = {
                "sites": len(ap.engine.kinds),
                "sampled": statistics.median(timed["sampled"][1:]),  # the first one also agrees on the capacity
                "unsampled": statistics.median(timed["unsampled"][skip:]),
                "n_sampled": len(timed["sampled"]),
                "n_unsampled": len(timed["unsampled"]),
                "floats": sizes,
                "step": statistics.median(step_times[skip:]),
                "collectives": sync.ex.calls,
                "steps": steps,
                "changes": len(ap.timeline.events),
            }
            ap.close()
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--write", action="store_true", help="write the table to docs/BENCHMARKS.md")
    args = ap.parse_args()
    models = ["digits-cnn", "mlp-12"]
    out = tempfile.mkdtemp(prefix="adaprec-bench-dist-")
    mp.start_processes(_worker, args=(os.path.join(out, "pg"), out, args.steps, args.every, models), nprocs=2,
                       start_method="spawn")
    res = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    us = 1e6
    lines = [
        f"Two gloo ranks on this CPU ({os.cpu_count()} cores, 1 thread per rank), DDP, adaprec error-budget, "
        f"statistics sampled every {args.every} steps, {args.steps} steps per model; medians of the timed calls "
        "of adaprec's exchange on rank 0 (rank 1 alike), each after a barrier so it times the exchange and not the other rank's lag (the training step column includes those barriers). The exchange is one `all_gather` of one float64 vector per "
        "step (a second one only the first time the sampled part grows, and on a step with inf/NaN to name the "
        "modules). Floor: a bare `all_reduce` of one float in the same group.",
        "",
        "| model | sites | floats sent, unsampled / sampled | exchange, unsampled step | exchange, sampled step "
        "| training step (median) | share of a step, unsampled / sampled | collectives / steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    r0 = res[0]
    for name in models:
        m = r0[name]
        lines.append(
            f"| {name} | {m['sites']} | {m['floats'].get('unsampled', 0)} / {m['floats'].get('sampled', 0)} "
            f"| {m['unsampled'] * us:.0f} µs | {m['sampled'] * us:.0f} µs | {m['step'] * 1e3:.2f} ms "
            f"| {100 * m['unsampled'] / m['step']:.1f} % / {100 * m['sampled'] / m['step']:.1f} % "
            f"| {m['collectives']} / {m['steps']} |"
        )
    lines += ["", f"Floor, `all_reduce` of one float: {r0['all_reduce_1'] * us:.0f} µs (rank 0), "
              f"{res[1]['all_reduce_1'] * us:.0f} µs (rank 1).",
              "", "Run: `python bench/bench_distributed.py --write`."]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section("Distributed: the cost of one decision for all ranks (issue 12)", body)


if __name__ == "__main__":
    main()
