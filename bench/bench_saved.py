"""What autograd keeps for backward, stored narrow: steady-state peak memory and gradient error, per variant.

Issue 19, item 3. The activation-heavy GPT of ``bench_memory.py`` (4 x 256,
context 512, batch 16, torch's own ``nn.TransformerEncoderLayer``) trains
on the Shakespeare plays with plain fp32 AdamW, and with the tensors
autograd saves for backward kept in a storage format by
:class:`adaprec.engine.saved.SavedTensorStorage` (bf16, int8 with a scale
per row, int8 / fp8 E4M3 with a scale per 256-element block), alone and on
top of ``torch.autocast`` bf16. Two more variants keep every layer's output
alive through backward (as ``output_hidden_states=True`` does) to measure the
``alive anyway`` rule: with it (the default) and without (``sweep=False``).

Each variant runs in a fresh Python process; the peak is the process
high-water mark after a reset once the warm-up steps are done
(:class:`adaprec.memory.PeakMemory`). The gradient error is that of one
step after the run against the same step unpacked (same weights, same batch):
``|g - g_ref| / |g_ref|`` over all parameters; the loss of that step is
equal bit for bit (packing changes only what backward reads). Validation
loss after the run is compared with plain fp32's.

Run: ``python bench/bench_saved.py [--steps 16] [--warmup 8] [--variants ...] [--write]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import write_section  # noqa: E402
from bench_memory import REGIMES, EncoderGPT, _data, _loss, _windows, validation_loss  # noqa: E402

# name -> (storage format or None, autocast bf16, hold every layer's output through backward, sweep)
VARIANTS: dict[str, tuple[str | None, bool, bool, bool]] = {
    "plain fp32": (None, False, False, True),
    "saved bf16": ("bf16", False, False, True),
    "saved int8/row": ("int8/row", False, False, True),
    "saved fp8_e4m3 (block 256)": ("fp8_e4m3", False, False, True),
    "autocast bf16": (None, True, False, True),
    "autocast bf16 + saved fp8_e4m3": ("fp8_e4m3", True, False, True),
    "hidden states held: plain fp32": (None, False, True, True),
    "hidden states held: saved bf16": ("bf16", False, True, True),
    "hidden states held: saved bf16 without sweep": ("bf16", False, True, False),
}
# glibc's default serves blocks under a moving threshold (up to 32 MiB) from its heap and keeps them when freed;
# a fixed 1 MiB threshold maps every large tensor on its own and returns it to the OS when freed
ALLOCATORS = {"glibc default": {}, "mmap threshold 1 MiB": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}}


def _live_peak(step) -> tuple[int, str]:
    """Peak of live tensor bytes during ``step()`` above its start (allocator events), and the phase it fell in."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(record_function)
    events = prof.profiler.kineto_results.events()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    phases = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name() in ("forward", "backward")}
    cur = peak = at = 0
    for t, n in mem:
        cur += n
        if cur > peak:
            peak, at = cur, t
    where = next((k for k, (a, b) in phases.items() if a <= at <= b), "optimizer")
    return peak, where


def child(name: str, key: str, steps: int, warmup: int) -> dict:
    from adaprec.engine.saved import SavedTensorStorage
    from adaprec.memory import PeakMemory

    fmt, autocast, hold, sweep = VARIANTS[name]
    regime = REGIMES[key]
    torch.manual_seed(0)
    train, val, vocab = _data()
    model = EncoderGPT(vocab, regime)
    opt = torch.optim.AdamW(model.parameters(), lr=regime.lr)
    storage = SavedTensorStorage(fmt, model=model, sweep=sweep, enabled=fmt is not None)
    hidden: list[torch.Tensor] = []
    if hold:
        for layer in model.encoder.layers:
            layer.register_forward_hook(lambda m, a, out: hidden.append(out))

    def grads(x: torch.Tensor, y: torch.Tensor, use: bool) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), (storage if use else _null()):
            loss = _loss(model(x), y)
        loss.backward()
        hidden.clear()
        return float(loss), torch.cat([p.grad.flatten() for p in model.parameters()])

    g = torch.Generator().manual_seed(1)
    peak = PeakMemory()

    def step(mark=None) -> None:
        x, y = _windows(train, regime.block, regime.batch, g)
        opt.zero_grad(set_to_none=True)
        with (mark("forward") if mark else _null()), storage, \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = _loss(model(x), y)
        with mark("backward") if mark else _null():
            loss.backward()
        hidden.clear()
        opt.step()

    for i in range(steps):
        if i == warmup:
            peak.reset()  # the steady state: after the warm-up steps
        step()
    reading = peak.read()
    saved = storage.stats()
    live, live_where = _live_peak(step)
    # after the peak: an unpacked reference step would leave its fp32 high-water mark in the process
    x, y = _windows(train, regime.block, regime.batch, g)
    loss_ref, g_ref = grads(x, y, False)
    loss_fmt, g_fmt = grads(x, y, True)
    grad_err = float((g_fmt - g_ref).norm() / g_ref.norm())
    del g_ref, g_fmt
    val_loss = validation_loss(model, val, regime, autocast)
    by_reason = saved.by("reason")
    return {"variant": name, "regime": regime.name, "peak_bytes": reading.peak_bytes, "method": reading.method,
            "live_peak": live, "live_where": live_where,
            "val_loss": val_loss, "grad_err": grad_err, "loss_equal": loss_ref == loss_fmt,
            "saved_before": saved.bytes_before, "saved_after": saved.bytes_after,
            "alive_anyway": by_reason.get("alive anyway", (0, 0))[0],
            "packed": by_reason.get("packed", (0, 0))}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _run_child(name: str, key: str, steps: int, warmup: int, allocator: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--regime-key", key, "--steps", str(steps),
           "--warmup", str(warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ALLOCATORS[allocator]})
    if done.returncode != 0:
        raise SystemExit(f"bench_saved: variant {name!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    mib = 2**20
    allocs = list(ALLOCATORS)
    by = {(r["variant"], r["allocator"]): r for r in rows}
    names = list(dict.fromkeys(r["variant"] for r in rows))
    head = " | ".join(f"RSS peak, {a} (MiB)" for a in allocs)
    lines = [f"| variant | {head} | live tensors, step peak (MiB) | saved for backward (MiB) | "
             "gradient error (1 step) | val loss vs fp32 |",
             "|---|" + "---:|" * (len(allocs) + 4)]
    for name in names:
        ref_name = "hidden states held: plain fp32" if name.startswith("hidden states held") else "plain fp32"
        cells = []
        for a in allocs:
            r, b = by.get((name, a)), by.get((ref_name, a))
            if r is None or r["peak_bytes"] is None:
                cells.append("n/a")
                continue
            ratio = f" ({r['peak_bytes'] / b['peak_bytes']:.2f}x)" if b and b["peak_bytes"] else ""
            cells.append(f"{r['peak_bytes'] / mib:,.0f}{ratio}")
        r = next(by[(name, a)] for a in allocs if (name, a) in by)
        b = next((by[(ref_name, a)] for a in allocs if (ref_name, a) in by), r)
        base = next((by[("plain fp32", a)] for a in allocs if ("plain fp32", a) in by), r)
        live = f"{r['live_peak'] / mib:,.0f} ({r['live_peak'] / b['live_peak']:.2f}x, in {r['live_where']})"
        saved = f"{r['saved_before'] / mib:,.0f} -> {r['saved_after'] / mib:,.0f}" if r["saved_before"] else "-"
        if r["alive_anyway"]:
            saved += f" ({r['alive_anyway'] / mib:,.0f} alive anyway)"
        err = f"{100 * r['grad_err']:.2f} %" if r["saved_before"] else "-"
        dl = 100 * (r["val_loss"] - base["val_loss"]) / base["val_loss"]
        lines.append(f"| {name} | {' | '.join(cells)} | {live} | {saved} | {err} | {dl:+.2f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--regime", default="activation", choices=sorted(REGIMES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--allocators", default=",".join(ALLOCATORS))
    ap.add_argument("--write", action="store_true", help="write the table to docs/BENCHMARKS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--regime-key", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        out = child(args.child, args.regime_key, args.steps, args.warmup)
        out["allocator"] = next((k for k, env in ALLOCATORS.items()
                                 if all(os.environ.get(e) == v for e, v in env.items()) and env), "glibc default")
        print(json.dumps(out))
        return
    if args.steps <= args.warmup:
        raise SystemExit("bench_saved: --steps must exceed --warmup (the measured steps come after it)")
    names = [v.strip() for v in args.variants.split(",")]
    allocs = [a.strip() for a in args.allocators.split(",")]
    unknown = [v for v in names if v not in VARIANTS] + [a for a in allocs if a not in ALLOCATORS]
    if unknown:
        raise SystemExit(f"bench_saved: unknown {unknown}; variants: {', '.join(VARIANTS)}; "
                         f"allocators: {', '.join(ALLOCATORS)}")
    rows = []
    for alloc in allocs:
        for name in names:
            print(f"[{alloc}] {name} ...", flush=True)
            rows.append(_run_child(name, args.regime, args.steps, args.warmup, alloc))
            r = rows[-1]
            print(f"    RSS peak {(r['peak_bytes'] or 0) / 2**20:,.0f} MiB ({r['method']}), live peak "
                  f"{r['live_peak'] / 2**20:,.0f} MiB in {r['live_where']}, grad err {r['grad_err']:.2e}, "
                  f"loss equal {r['loss_equal']}, val {r['val_loss']:.4f}, saved {r['saved_before'] / 2**20:,.0f} "
                  f"-> {r['saved_after'] / 2**20:,.0f} MiB, alive anyway {r['alive_anyway'] / 2**20:,.0f} MiB",
                  flush=True)
    table = _table(rows)
    print(table)
    if args.write:
        write_section(
            "Saved tensors in a storage format (issue 19, item 3)",
            f"`python bench/bench_saved.py --steps {args.steps} --warmup {args.warmup}`: the "
            f"{REGIMES[args.regime].name} GPT of bench_memory, AdamW; each variant in a fresh process. RSS peak = "
            "process VmHWM after a reset once the warm-up steps are done (measured, `adaprec.memory.PeakMemory`), "
            "under glibc's default allocator settings and with a fixed 1 MiB mmap threshold "
            "(`MALLOC_MMAP_THRESHOLD_=1048576`: large tensors go back to the OS when freed). Live tensors = the "
            "peak of allocated tensor bytes during one steady step above its start (the profiler's allocator "
            "events), and the phase it falls in. Saved for backward = `SavedTensorStorage.stats()` of the last "
            "step, before -> after packing (parameters not counted). Gradient error: one step after the run "
            "against the same step unpacked (the loss is bit-identical). Val loss after the run, vs plain fp32. "
            "Ratios in parentheses: vs plain fp32 (the hidden-states rows: vs hidden states held, plain fp32). "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads. No timing (shared machine).\n\n{table}",
        )


if __name__ == "__main__":
    main()
