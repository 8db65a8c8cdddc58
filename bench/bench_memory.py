"""Steady-state peak memory of one training step, each variant in its own fresh process.

Issue 19's benchmark. A character-level GPT built from ``nn.TransformerEncoderLayer``
(pre-norm, GELU, causal mask; a model adaprec did not write) trains on the
Shakespeare plays under

* plain fp32 PyTorch (AdamW),
* ``torch.autocast("cpu", dtype=torch.bfloat16)`` (AdamW),
* autocast bf16 with torchao's ``AdamW8bit`` (block-wise 8-bit moments),
* adaprec's default (``AdaptivePrecision(model, opt)``: error-budget, hardware-aware;
  its warm-up shortened to ``--warmup`` steps and its monitor period to a third of the steps after it,
  so the policy's first decisions after warm-up fall inside a bench),
* adaprec with ``storage="narrow"`` (memory before speed: what autograd keeps in block-scaled 8-bit codes
  where their measured round trip keeps the policy's 30 dB, the optimizer moments in 8 bits),
* on request (``--variants``), the same with ``saved_target=20`` (a looser budget for what autograd keeps).

in three regimes: activation-heavy (4 x 256, context 512, batch 16),
parameter-heavy (8 x 1024, 101 M parameters, context 32, batch 2) and the
quickstart's model size (2 x 256, context 128, batch 16).

Each variant runs in a new Python process (``python bench_memory.py --child ...``),
so no allocator cache or library state of one variant reaches another. Three
peaks: the process high-water mark (``VmHWM``) over the last quarter of the steps, after a reset through
``/proc/self/clear_refs`` (the steady state: with 32 steps and a warm-up of 12, adaprec's first decisions
after warm-up, its speed check included, are over by then; with 24 the window caught the parameter-heavy
default's switch to fp32 GEMMs at step 18, whose step peaked ~100 MiB above the steps after it),
the same over the whole run, warm-up included (what a memory limit must allow)
(:class:`adaprec.memory.PeakMemory`: everything the process holds,
Python, libraries and the allocator's cache included, under each variant's
own allocator settings: glibc's defaults for the peers, adaprec's
``tune_allocator`` choice for adaprec), and the peak of live tensor bytes
during the last step (:func:`adaprec.memory.live_tensor_peak`: what the
step needs, as CUDA's ``max_memory_allocated`` says). Validation loss is the
mean next-character loss on fixed held-out windows after the run.

``--peer-steps``: the autocast variants run fewer steps (bf16 arithmetic is
emulated and 20-100x slower on a CPU without bf16 units; memory is steady
after the first steps); their loss is then after fewer steps and marked so.

``--repeat N`` runs every variant in N fresh processes and reports medians, with the range of the process
peak: the process figure moves by tens of MiB from run to run while the live tensors do not.

Run: ``python bench/bench_memory.py [--steps 32] [--warmup 12] [--regimes activation,parameter,quickstart] [--repeat 3] [--write]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import write_section  # noqa: E402
from _peers import check_setup  # noqa: E402


@dataclass(frozen=True)
class Regime:
    name: str
    layers: int
    width: int
    heads: int
    block: int
    batch: int
    lr: float


REGIMES = {
    "activation": Regime("activation-heavy", 4, 256, 4, 512, 16, 1e-3),
    "parameter": Regime("parameter-heavy", 8, 1024, 16, 32, 2, 3e-4),
    "quickstart": Regime("quickstart size", 2, 256, 4, 128, 16, 1e-3),
}
VARIANTS = ("plain fp32", "autocast bf16", "autocast bf16 + torchao AdamW8bit", "adaprec default",
            "adaprec storage=narrow", "adaprec saved_target=20")
# not run unless asked (--variants): narrow storage with a looser budget for what autograd keeps (20 dB instead of 30)
EXTRA_VARIANTS = ("adaprec saved_target=20",)


class EncoderGPT(nn.Module):
    """A causal character LM from torch's own encoder layers."""

    def __init__(self, vocab: int, r: Regime) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, r.width)
        self.pos = nn.Embedding(r.block, r.width)
        layer = nn.TransformerEncoderLayer(r.width, r.heads, 4 * r.width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, r.layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(r.width)
        self.head = nn.Linear(r.width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(r.block), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        x = self.encoder(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.ln(x))


def _data() -> tuple[torch.Tensor, torch.Tensor, int]:
    from adaprec.experiments.tasks.char_transformer import encode, load_text

    ids, vocab = encode(load_text())  # the vocabulary of all the plays, as the other benches use
    ids = ids[:600_000]
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], vocab


def _windows(ids: torch.Tensor, block: int, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(ids) - block - 1, (batch,), generator=g)
    x = torch.stack([ids[s: s + block] for s in starts])
    y = torch.stack([ids[s + 1: s + block + 1] for s in starts])
    return x, y


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def validation_loss(model: nn.Module, val: torch.Tensor, regime: Regime, autocast: bool) -> float:
    """Mean next-character loss on four fixed held-out windows (seed 2), in eval mode."""
    gv = torch.Generator().manual_seed(2)
    model.eval()
    with torch.no_grad():
        losses = []
        for _ in range(4):
            x, y = _windows(val, regime.block, regime.batch, gv)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                losses.append(float(_loss(model(x), y)))
    return sum(losses) / len(losses)


def child(variant: str, regime: Regime, steps: int, warmup: int) -> dict:
    """Train one variant in this process; return its figures."""
    from adaprec.memory import PeakMemory, live_tensor_peak

    torch.manual_seed(0)
    train, val, vocab = _data()
    model = EncoderGPT(vocab, regime)
    params = sum(p.numel() for p in model.parameters())
    if variant.endswith("AdamW8bit"):
        from torchao.optim import AdamW8bit

        opt: torch.optim.Optimizer = AdamW8bit(model.parameters(), lr=regime.lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=regime.lr)
    ap = None
    if variant.startswith("adaprec"):
        import adaprec

        policy = {"name": "error-budget", "warmup_steps": warmup}
        if "saved_target=" in variant:
            policy["saved_target"] = float(variant.split("saved_target=")[1])
        if variant != "adaprec default":  # the storage roles used whatever this device's bf16 speed
            policy["storage"] = "narrow"
        ap = adaprec.AdaptivePrecision(model, opt, policy=policy, total_steps=steps,
                                       monitor_every=max(1, min(10, (steps - warmup) // 3)))
    autocast = variant.startswith("autocast")
    g = torch.Generator().manual_seed(1)
    peak = PeakMemory()
    times = []
    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        if ap is not None:
            with ap.autocast():
                loss = _loss(model(x), y)
            ap.backward(loss)
            ap.step()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = _loss(model(x), y)
            loss.backward()
            opt.step()

    setup = None
    live = None
    for step in range(steps):
        if step == steps - max(2, steps // 4):
            warm = peak.read()  # the warm-up's and the policy's first decisions' peak, for the whole-run column
            peak.reset()  # the steady state: after warm-up, before the last steps
        x, y = _windows(train, regime.block, regime.batch, g)
        t0 = time.perf_counter()
        if setup is None:  # a variant that does not train what it claims fails the bench
            setup = check_setup(variant, model, opt, lambda x=x, y=y: train_step(x, y))
            setup.raise_if_failed()
        elif step == steps - 1:  # the last step, under the profiler's allocator events (not timed)
            reading = peak.read()  # before it: the profiler's own records are not the variant's memory
            live = live_tensor_peak(lambda x=x, y=y: train_step(x, y))
            continue
        else:
            train_step(x, y)
        times.append(time.perf_counter() - t0)
    val_loss = validation_loss(model, val, regime, autocast)
    run_peak = max((r.peak_bytes for r in (warm, reading) if r.peak_bytes is not None), default=None)
    out = {"variant": variant, "regime": regime.name, "params": params, "peak_bytes": reading.peak_bytes,
           "run_peak_bytes": run_peak,
           "method": reading.method, "reason": reading.reason, "val_loss": val_loss,
           "live_bytes": live.peak_bytes if live is not None else None, "steps": steps,
           "step_ms": 1e3 * statistics.median(times[warmup:] or times), "macs": "", "setup": setup.summary(),
           "allocator": "glibc defaults", "kept": ""}
    if ap is not None:
        by_format = ap.energy.summary()["macs_by_format"]  # over all steps, warm-up included
        total = sum(by_format.values()) or 1
        out["macs"] = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(by_format.items(), key=lambda kv: -kv[1]))
        out["allocator"] = ap.allocator
        saved = {mp.saved for mp in ap.plan.modules.values()}
        state = {mp.optimizer_state for mp in ap.plan.modules.values()}
        out["kept"] = f"saved {'/'.join(sorted(saved))}; optimizer state {'/'.join(sorted(state))}"
        ap.close()
    return out


def _run_child(variant: str, key: str, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--regime-key", key, "--steps", str(steps),
           "--warmup", str(warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_memory: variant {variant!r} ({key}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _merge(runs: list[dict]) -> dict:
    """One row from repeated runs of a variant: the median of each figure, with the process peak's range."""
    out = dict(runs[0])
    for key in ("peak_bytes", "run_peak_bytes", "live_bytes", "val_loss", "step_ms"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    peaks = [r["peak_bytes"] for r in runs if r.get("peak_bytes") is not None]
    out["peak_range"] = (min(peaks), max(peaks)) if len(peaks) > 1 else None
    out["runs"] = len(runs)
    return out


def _ratio(r: dict, b: dict, key: str) -> str:
    if r.get(key) is None:
        return "n/a"
    mib = f"{r[key] / 2**20:,.0f}"
    if key == "peak_bytes" and r.get("peak_range"):
        lo, hi = r["peak_range"]
        mib += f" [{lo / 2**20:,.0f}-{hi / 2**20:,.0f}]"
    return f"{mib} ({r[key] / b[key]:.2f}x)" if b.get(key) else mib


def _table(rows: list[dict]) -> str:
    lines = ["| regime | variant | live tensors, step peak (MiB) | process RSS peak, steady (MiB) "
             "| process RSS peak, whole run (MiB) | val loss (steps) | vs fp32 | what adaprec kept narrow | allocator |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    base = {r["regime"]: r for r in rows if r["variant"] == "plain fp32"}
    for r in rows:
        b = base.get(r["regime"], r)  # without a plain fp32 row, ratios are to the variant itself
        dl = "-" if r["steps"] != b["steps"] else f"{100 * (r['val_loss'] - b['val_loss']) / b['val_loss']:+.2f} %"
        lines.append(f"| {r['regime']} ({r['params'] / 1e6:.1f} M params) | {r['variant']} | {_ratio(r, b, 'live_bytes')} "
                     f"| {_ratio(r, b, 'peak_bytes')} | {_ratio(r, b, 'run_peak_bytes')} | {r['val_loss']:.4f} ({r['steps']}) | {dl} | {r['kept'] or '-'} "
                     f"| {r['allocator']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=12, help="adaprec's error-budget warm-up (default policy: 100)")
    ap.add_argument("--regimes", default="activation,parameter,quickstart")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in EXTRA_VARIANTS))
    ap.add_argument("--repeat", type=int, default=1,
                    help="fresh processes per variant: the table gives medians, and the process peak's range")
    ap.add_argument("--peer-steps", type=int, default=None, help="steps of the autocast variants (default: --steps)")
    ap.add_argument("--write", action="store_true", help="write the table to docs/BENCHMARKS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--regime-key", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, REGIMES[args.regime_key], args.steps, args.warmup)))
        return
    if args.repeat < 1:
        raise SystemExit("bench_memory: --repeat must be at least 1")
    if args.warmup + 3 >= args.steps:
        raise SystemExit("bench_memory: --steps must exceed --warmup by more than 3 (the measured steps)")
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench_memory: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    rows = []
    for key in args.regimes.split(","):
        if key not in REGIMES:
            raise SystemExit(f"bench_memory: unknown regime {key!r}; known: {', '.join(REGIMES)}")
        for variant in variants:
            print(f"[{REGIMES[key].name}] {variant} ...", flush=True)
            steps = args.peer_steps if (args.peer_steps and variant.startswith("autocast")) else args.steps
            runs = []
            for _ in range(args.repeat):
                runs.append(_run_child(variant, key, steps, min(args.warmup, steps - 3)))
                r = runs[-1]
                print(f"    peak {r['peak_bytes'] / 2**20 if r['peak_bytes'] else math.nan:,.0f} MiB ({r['method']}), "
                      f"live {r['live_bytes'] / 2**20 if r['live_bytes'] else math.nan:,.0f} MiB, "
                      f"val loss {r['val_loss']:.4f}, {r['step_ms']:.0f} ms/step", flush=True)
            rows.append(_merge(runs))
    table = _table(rows)
    print(table)
    if args.write:
        write_section(
            "Steady-state peak memory",
            f"`python bench/bench_memory.py --steps {args.steps} --warmup {args.warmup}"
            f"{f' --peer-steps {args.peer_steps}' if args.peer_steps else ''}"
            f"{f' --repeat {args.repeat}' if args.repeat > 1 else ''}`: each variant in a fresh process"
            f"{f', {args.repeat} times: medians, with the process peak range in brackets; ratios are of medians' if args.repeat > 1 else ''}. Live "
            "tensors = the peak of allocated tensor bytes during the last step (`adaprec.memory.live_tensor_peak`, "
            "allocator events); process RSS = VmHWM from a reset once the warm-up steps are done to the start of "
            "that last step (its profiler's records are not the variant's) (`adaprec.memory.PeakMemory`), under "
            "each variant's allocator settings (last column); both measured. "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads. Step time is not reported here "
            f"(bench_native measures speed side by side; this bench's variants run one after another).\n\n{table}",
        )


if __name__ == "__main__":
    main()
