"""Training speed on models adaprec did not write, side by side with what a user would pick instead.

Issue 20's benchmark. Each workload of ``bench/_models.py`` (a Hugging Face
GPT-2 and BERT built from configs, torch's own ``nn.TransformerEncoder``,
the project's char GPTs, the headline's small tasks) trains from the same
seed on the same batches under

* plain fp32 PyTorch, ``torch.autocast(bf16)``, and ``torch.compile`` of the autocast model,
* torchao's int8 mixed-precision training (``module_swap=True``: its path that runs ``_int_mm``),
* adaprec with an fp32 plan, and adaprec's default (error-budget, hardware-aware; its warm-up
  shortened to the bench's ``--warmup`` steps, so the median past warm-up is its steady state).

The variants take turns of a few steps each, in one process, so a shared
machine's drift hits them alike. Step time is the median past the warm-up
steps; validation loss is each workload's held-out loss after the same
steps. Every variant's first step goes through :func:`_peers.check_setup`
(its trainable parameters are in its optimizer and move), which also leaves
that step untimed.

Run: ``python bench/bench_speed.py [--workloads gpt2,bert,...] [--steps 16] [--warmup 4] [--write]``
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import adaprec  # noqa: E402
from _markdown import write_section  # noqa: E402
from _models import WORKLOADS, Workload  # noqa: E402
from _peers import check_setup  # noqa: E402
from adaprec.hardware import probe  # noqa: E402

VARIANTS = ("plain fp32", "autocast bf16", "autocast bf16 compiled", "torchao int8-mp module_swap",
            "adaprec fp32 plan", "adaprec default")
SLOW_PEERS = ("autocast", "torchao")  # --peer-steps: bf16 and int8 without their units on a CPU run 10-100x slower
SECTION = "Speed on models adaprec did not write (issue 20)"


@dataclass
class Run:
    """One variant's model, optimizer and step."""

    variant: str
    work: Workload
    warmup: int = 4
    times: list[float] = field(default_factory=list)
    check: str = "not run"
    note: str = ""

    def __post_init__(self) -> None:
        torch.manual_seed(0)
        self.model = self.work.build()
        if self.variant.startswith("torchao"):
            from torchao import quantize_
            from torchao.prototype.quantized_training import Int8MixedPrecisionTrainingConfig

            quantize_(self.model, Int8MixedPrecisionTrainingConfig(module_swap=True))  # before the optimizer
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.work.lr)
        self.ap = None
        if self.variant.startswith("adaprec"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # the default's warm-up (100 steps) shortened to the bench's, as bench_memory does: the median
                # past warm-up is then the policy's steady state, not its warm-up sampling
                policy = "fp32" if "fp32" in self.variant else {"name": "error-budget", "warmup_steps": self.warmup}
                self.ap = adaprec.AdaptivePrecision(self.model, self.opt, policy)
        self.net = torch.compile(self.model) if self.variant.endswith("compiled") else self.model

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        fwd, loss_fn, model = self.work.forward, self.work.loss, self.net
        self.opt.zero_grad(set_to_none=True)
        if self.ap is not None:
            with self.ap.autocast():
                loss = loss_fn(fwd(model, x), y)
            self.ap.backward(loss)
            self.ap.step()
            return
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.variant.startswith("autocast")):
            loss = loss_fn(fwd(model, x), y)
        loss.backward()
        self.opt.step()

    def step(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if i == 0:
            found = check_setup(self.variant, self.model, self.opt, lambda: self._step(x, y))
            self.check = found.summary()
            found.raise_if_failed()
            return
        t0 = time.perf_counter()
        self._step(x, y)
        self.times.append(time.perf_counter() - t0)

    def finish(self, warmup: int) -> dict:
        val = self.work.validate(self.model)
        if self.ap is not None:
            s = self.ap.energy.summary()
            self.note = "MACs " + ", ".join(f"{f} {100 * n / s['macs']:.0f}%" for f, n in sorted(
                s["macs_by_format"].items(), key=lambda kv: -kv[1]))
            if self.ap.setup.widened:
                self.note += f"; kept wider where narrow does not pay: {len(self.ap.setup.widened)} modules"
            if self.ap.speed.verdict:
                self.note += "; speed check: fp32 (narrow was slower here)"
            self.ap.close()
        return {"variant": self.variant, "step_ms": 1e3 * statistics.median(self.times[warmup:] or self.times),
                "val": val, "check": self.check, "note": self.note}


def bench(key: str, variants: list[str], steps: int, warmup: int, turn: int,
          peer_steps: int | None = None) -> tuple[str, list[dict]]:
    work = WORKLOADS[key]()
    runs = [Run(v, work, warmup) for v in variants]
    batches = list(itertools.islice(work.batches(1337), steps))
    slow = min(peer_steps or steps, steps)
    for start in range(0, steps, turn):
        for r in runs:
            last = slow if r.variant.startswith(SLOW_PEERS) else steps
            for i in range(start, min(start + turn, last)):
                r.step(i, *batches[i])
        print(f"  {work.name}: {min(start + turn, steps)}/{steps}", flush=True)
    out = []
    for r in runs:
        cut = r.variant.startswith(SLOW_PEERS) and slow < steps
        row = r.finish(min(warmup, max(0, slow - 3)) if cut else warmup)
        if cut:  # a peer whose narrow arithmetic this CPU lacks: fewer steps, its loss after those
            row["note"] = f"{slow} steps (val loss after {slow}, not {steps})" + (f"; {row['note']}" if row["note"] else "")
        out.append(row)
    return work.name, out


def table(results: list[tuple[str, list[dict]]]) -> str:
    lines = ["| workload | variant | step ms | vs plain fp32 | vs autocast bf16 | val loss vs fp32 | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for name, rows in results:
        by = {r["variant"]: r for r in rows}
        fp32, ac = by.get("plain fp32"), by.get("autocast bf16")
        for r in rows:
            vs32 = f"{fp32['step_ms'] / r['step_ms']:.2f}x" if fp32 else "-"
            vsac = f"{ac['step_ms'] / r['step_ms']:.2f}x" if ac else "-"
            dl = f"{100 * (r['val'] - fp32['val']) / fp32['val']:+.2f} %" if fp32 else "-"
            lines.append(f"| {name} | {r['variant']} | {r['step_ms']:.1f} | {vs32} | {vsac} | {dl} | {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="gpt2,bert,encoder,encoder-params,wide,nanogpt,digits,mnist1d,mnist-mlp")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=16, help="steps per variant, the first (setup check) untimed")
    ap.add_argument("--warmup", type=int, default=4, help="timed steps left out of the median")
    ap.add_argument("--turn", type=int, default=2, help="steps a variant runs before the next takes its turn")
    ap.add_argument("--peer-steps", type=int, default=None,
                    help="steps of the autocast and torchao variants (10-100x slower than fp32 on a CPU without bf16/VNNI units)")
    ap.add_argument("--write", action="store_true", help="write the table to docs/BENCHMARKS.md")
    ap.add_argument("--section", default=SECTION, help="the BENCHMARKS.md section to write")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS] + [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"bench_speed: unknown {unknown}; variants: {list(VARIANTS)}; workloads: {list(WORKLOADS)}")
    torch.set_num_threads(torch.get_num_threads())
    results = []
    for key in args.workloads.split(","):
        print(f"[{key}]", flush=True)
        results.append(bench(key, variants, args.steps, args.warmup, args.turn, args.peer_steps))
        if args.write:  # after each workload: a long run stopped part-way keeps what it measured
            _write(args, results)
    print(table(results))


def _write(args: argparse.Namespace, results: list[tuple[str, list[dict]]]) -> None:
    report = probe()
    fast = ", ".join(report.fast_formats("gemm")) or "none (nothing narrow runs faster than fp32 here)"
    write_section(args.section, (
        f"`python bench/bench_speed.py --workloads {args.workloads} --variants '{args.variants}' "
        f"--steps {args.steps} --warmup {args.warmup}"
        + (f" --peer-steps {args.peer_steps}" if args.peer_steps else "") + "`: variants side by side in one "
        f"process, taking turns of {args.turn} steps; step time = median past {args.warmup} warm-up steps "
        f"(measured); val loss = the workload's held-out loss after {args.steps} steps. Machine: {report.name} "
        f"({report.capability}), torch {torch.__version__}, {torch.get_num_threads()} threads; its probe: "
        f"fast formats {fast}.\n\n{table(results)}"))

if __name__ == "__main__":
    main()
