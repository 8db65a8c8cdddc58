"""Native execution on this machine: the probe's GEMM table, then GPT-style training side by side.

Issue 10's benchmark. (a) What ``adaprec.hardware.probe`` measured here.
(b) A character-level GPT on the Shakespeare plays at two sizes, trained
from the same seed and the same batches under

* plain fp32 PyTorch,
* ``torch.autocast("cpu", dtype=torch.bfloat16)``,
* torchao's int8 mixed-precision training, set up as torchao documents it
  (``quantize_(model, Int8MixedPrecisionTrainingConfig())`` on the fresh
  model, *then* the optimizer), on both of its paths: the default one, which
  swaps each Linear's weight for a tensor subclass, and ``module_swap=True``,
  which swaps the Linear's class and keeps plain parameters,
* adaprec's default (``AdaptivePrecision(model, opt)``: error-budget,
  hardware-aware) and adaprec with its all-fp32 plan (the cost of the
  machinery alone).

Every variant's first step is checked by ``_peers.check_setup``: every
trainable parameter must be in the optimizer and change in that step, or the
bench stops with the reason (a variant set up wrong is not reported). On a
middle, untimed step (or the first later one in which nothing compiles; by
then adaprec's policy has left its initial fp32 plan) the torch profiler
counts the int8 GEMMs (``aten::_int_mm``) each variant really ran, whoever
called them.

Sizes: nanoGPT's documented CPU config (n_layer=4, n_head=4, n_embd=128,
block 64, batch 12, dropout 0, 2000 iterations; nanoGPT's README reports a
validation loss of about 1.88 on its tiny-shakespeare text) and a wider one
where GEMMs dominate (6 layers, 384 wide, block 256, batch 8). The variants
train side by side in turns of a fortieth of the iterations each (the machine
is shared and drifts by tens of percent within minutes; turns of one step
would make every variant evict the others' weights from the caches). Step time is
the median of the timed steps (the first 5 skipped); validation loss is the
mean next-character loss on fixed held-out windows after training.

Run: ``python bench/bench_native.py [--small-iters 2000] [--wide-iters 150] [--sizes small wide]
[--variants ...] [--write [--section TITLE]]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import adaprec  # noqa: E402
from _markdown import write_section  # noqa: E402
from _peers import INT8_GEMM, SetupError, check_setup, count_ops  # noqa: E402
from adaprec.experiments.tasks.char_transformer import CharGPT, encode, load_text  # noqa: E402
from adaprec.hardware import probe  # noqa: E402


@dataclass(frozen=True)
class Size:
    name: str
    layers: int
    heads: int
    width: int
    block: int
    batch: int
    iters: int
    lr: float


@dataclass
class Result:
    variant: str
    step_ms: float
    val_loss: float
    total_s: float
    int8_gemms: int
    check: str
    note: str = ""


def _data() -> tuple[torch.Tensor, torch.Tensor, int]:
    data, vocab = encode(load_text())
    n = int(0.9 * len(data))
    return data[:n], data[n:], vocab


def _batches(train: torch.Tensor, size: Size, seed: int = 1337):
    g = torch.Generator().manual_seed(seed)
    offs = torch.arange(size.block)
    for _ in range(size.iters):
        start = torch.randint(0, len(train) - size.block - 1, (size.batch, 1), generator=g)
        yield train[start + offs], train[start + offs + 1]


@torch.no_grad()
def _val_loss(model: torch.nn.Module, val: torch.Tensor, block: int, windows: int = 256) -> float:
    model.eval()
    starts = torch.linspace(0, len(val) - block - 2, windows).long().unsqueeze(1)
    offs = torch.arange(block)
    total = 0.0
    for chunk in starts.split(32):
        logits = model(val[chunk + offs])
        total += float(F.cross_entropy(logits.flatten(0, 1), val[chunk + offs + 1].flatten())) * len(chunk)
    model.train()
    return total / windows


def _lr(it: int, size: Size) -> float:
    """nanoGPT's schedule: linear warm-up (100 iterations), cosine decay to a tenth."""
    warm = min(100, size.iters // 10)
    if it < warm:
        return size.lr * (it + 1) / warm
    ratio = (it - warm) / max(1, size.iters - warm)
    return size.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * ratio)))


def _model(size: Size, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return CharGPT(vocab, d=size.width, heads=size.heads, layers=size.layers, block=size.block)


def _optimizer(model: torch.nn.Module, size: Size) -> torch.optim.Optimizer:
    """Built from the model's parameters as they are now: after any transform that replaces them."""
    return torch.optim.AdamW(model.parameters(), lr=size.lr, betas=(0.9, 0.99), weight_decay=0.1)


TORCHAO = {"torchao int8-mp": False, "torchao int8-mp module_swap": True}
"""torchao's two paths of int8 mixed-precision training, by their ``module_swap`` setting."""


def torchao_version() -> str | None:
    try:
        import torchao
    except ImportError:
        return None
    return torchao.__version__


def apply_torchao(model: torch.nn.Module, module_swap: bool) -> None:
    """torchao's documented setup: ``quantize_`` on the model (every Linear, its default filter)."""
    from torchao import quantize_
    from torchao.prototype.quantized_training import Int8MixedPrecisionTrainingConfig

    quantize_(model, Int8MixedPrecisionTrainingConfig(module_swap=module_swap))


def _compiles() -> int:
    """Frames dynamo has compiled so far in this process (a cache hit adds none)."""
    return int(torch._dynamo.utils.counters["frames"]["total"])


class Run:
    """One variant's model, optimizer and step; trained step by step beside the others."""

    def __init__(self, variant: str, size: Size, vocab: int) -> None:
        self.variant, self.size = variant, size
        self.model = _model(size, vocab)
        base = variant.removesuffix(" compiled")
        if base in TORCHAO:
            apply_torchao(self.model, TORCHAO[base])  # before the optimizer, as torchao documents
        self.opt = _optimizer(self.model, size)
        self.note = ""
        self.check = "not run"
        self.int8_gemms = -1
        self.ap = None
        self.times: list[float] = []
        if variant.startswith("adaprec"):
            policy = "fp32" if "fp32 plan" in variant else "error-budget"
            self.ap = adaprec.AdaptivePrecision(self.model, self.opt, policy=policy, total_steps=size.iters,
                                                guard=policy != "fp32")
        # torch.compile (inductor); adaprec's sampled steps run eager
        self.net = torch.compile(self.model) if variant.endswith("compiled") else self.model

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ap is not None and self.ap.sampling_next:
            return self.model(x)
        return self.net(x)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        model, opt, ap = self.model, self.opt, self.ap
        opt.zero_grad(set_to_none=True)
        if self.variant == "autocast bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            loss.backward()
        elif ap is not None:
            with ap.autocast():
                loss = F.cross_entropy(self._forward(x).flatten(0, 1), y.flatten())
            ap.backward(loss)
            ap.unscale_()
        else:
            loss = F.cross_entropy(self._forward(x).flatten(0, 1), y.flatten())
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if ap is not None:
            ap.step()
        else:
            opt.step()

    def step(self, it: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """One training step; the first is the setup check, the middle one (or the first later one that
        compiles nothing) counts GEMMs; both untimed."""
        for g in self.opt.param_groups:
            g["lr"] = _lr(it, self.size)
        if it == 0:
            found = check_setup(self.variant, self.model, self.opt, lambda: self._step(x, y))
            self.check = found.summary()
            print(f"  {self.variant}: setup check {self.check}", flush=True)
            found.raise_if_failed()
            return
        if it >= max(3, self.size.iters // 2) and self.int8_gemms < 0:
            compiles = _compiles()
            counts = count_ops(lambda: self._step(x, y), (INT8_GEMM, "aten::mm", "aten::addmm"))
            if _compiles() != compiles:
                return  # a (re)compile ran in this step and the profiler saw its tracing: count the next one
            self.int8_gemms = counts[INT8_GEMM]
            if self.variant.removesuffix(" compiled") in TORCHAO:
                self.note = (f"other GEMMs per step: {counts['aten::mm']} mm, {counts['aten::addmm']} addmm"
                             + ("; no int8 GEMM ran" if not self.int8_gemms else ""))
            print(f"  {self.variant}: {self.int8_gemms} int8 GEMMs ({INT8_GEMM}) in step {it + 1}", flush=True)
            return
        t0 = time.perf_counter()
        self._step(x, y)
        self.times.append(time.perf_counter() - t0)

    def finish(self, val: torch.Tensor) -> Result:
        loss = _val_loss(self.model, val, self.size.block)
        if self.ap is not None:
            s = self.ap.energy.summary()
            self.note = (f"coverage {100 * s['coverage']:.0f} %; MACs " + ", ".join(
                f"{f} {100 * n / s['macs']:.0f}%" for f, n in sorted(s["macs_by_format"].items(), key=lambda kv: -kv[1]))
                + (f"; emulated: {', '.join(s['emulated_formats'])}" if s["emulated_formats"] else ""))
            self.ap.close()
        return Result(self.variant, 1e3 * statistics.median(self.times[5:] or self.times), loss, sum(self.times),
                      self.int8_gemms, self.check, self.note)


def _train_side_by_side(variants: list[str], size: Size, train: torch.Tensor, val: torch.Tensor,
                        vocab: int) -> list[Result]:
    """The variants take turns of ``iters // 40`` steps on the same batches: a shared machine's drift hits them alike."""
    runs = [Run(v, size, vocab) for v in variants]
    batches = list(_batches(train, size))
    turn = max(1, size.iters // 40)
    for start in range(0, len(batches), turn):
        for r in runs:
            for it in range(start, min(start + turn, len(batches))):
                r.step(it, *batches[it])
        print(f"  {size.name}: {min(start + turn, len(batches))}/{size.iters}", flush=True)
    return [r.finish(val) for r in runs]


SECTION = "Native execution: training speed on this machine (issue: native)"

VARIANTS = ("plain fp32", "autocast bf16", *TORCHAO, "adaprec fp32 plan", "adaprec default",
            "plain fp32 compiled", "adaprec default compiled")
"""What the bench runs by default; any ``torchao ...`` variant also runs compiled with `` compiled`` appended."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-iters", type=int, default=2000)
    ap.add_argument("--wide-iters", type=int, default=150)
    ap.add_argument("--wide-layers", type=int, default=6)
    ap.add_argument("--sizes", nargs="+", choices=("small", "wide"), default=["small", "wide"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--write", action="store_true", help="write the section of docs/BENCHMARKS.md")
    ap.add_argument("--section", default=SECTION,
                    help="title of the docs/BENCHMARKS.md section --write replaces (a run of some variants "
                         "only can go to a section of its own)")
    args = ap.parse_args()
    unknown = [v for v in args.variants if v not in {*VARIANTS, *TORCHAO, *(f"{t} compiled" for t in TORCHAO)}]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose among {list(VARIANTS)} "
                 f"(a torchao variant also runs compiled: '{next(iter(TORCHAO))} compiled')")
    ao = torchao_version()
    if ao is None and any(v.startswith("torchao") for v in args.variants):
        ap.error("the torchao variants need torchao: pip install torch==2.13.0 torchao==0.18.0 "
                 "(or leave them out with --variants)")
    warnings.simplefilter("ignore")
    report = probe(refresh=True)
    sizes = [s for key, s in (
        ("small", Size("nanoGPT CPU config (4x128, block 64, batch 12)", 4, 4, 128, 64, 12, args.small_iters, 1e-3)),
        ("wide", Size(f"wide ({args.wide_layers}x384, block 256, batch 8)", args.wide_layers, 6, 384, 256, 8,
                      args.wide_iters, 1e-3)),
    ) if key in args.sizes]
    torch._dynamo.config.cache_size_limit = 64  # two compiled variants, and a recompile per adaprec plan
    train, val, vocab = _data()
    results: dict[str, list[Result]] = {}
    for size in sizes:
        try:
            results[size.name] = _train_side_by_side(args.variants, size, train, val, vocab)
        except SetupError as e:
            sys.exit(f"bench_native: {size.name}: {e}")
        for r in results[size.name]:
            print(f"{size.name} | {r.variant}: {r.step_ms:.1f} ms/step, val loss {r.val_loss:.4f}, "
                  f"{r.int8_gemms} int8 GEMMs/step, setup {r.check}, {r.total_s:.0f} s of steps  {r.note}",
                  flush=True)
    lines = [
        f"Machine: {report.name}, {report.threads} torch threads, torch {report.torch_version}"
        + (f", torchao {ao}" if ao else "") + ", "
        f"CPU capability {report.capability}; measured {time.strftime('%Y-%m-%d')} by `bench/bench_native.py`, "
        "all variants in one process, trained side by side in turns of a fortieth of the iterations (so the drift "
        "of this shared machine hits them alike), same seed and batches for all. Setup check: every trainable "
        "parameter is in the optimizer and changed in the first step (a variant that fails it stops the bench). "
        "int8 GEMMs: `aten::_int_mm` calls in one training step (the middle one, or the first later one that "
        "compiles nothing), counted by the torch profiler.",
        "",
        "### (a) The device probe",
        "",
        report.table(),
        "",
        "### (b) Training a GPT-style character model on the Shakespeare plays",
        "",
    ]
    verdicts = []
    for size in sizes:
        rs = {r.variant: r for r in results[size.name]}
        base = rs.get("plain fp32")
        iters = size.iters
        lines += [f"**{size.name}, {iters} iterations**", "",
                  "| variant | step time (ms, median) | speed vs plain fp32 | val loss | vs fp32 "
                  "| int8 GEMMs per step | setup check | note |",
                  "|---|---:|---:|---:|---:|---:|---|---|"]
        for r in results[size.name]:
            sp = f"{base.step_ms / r.step_ms:.2f}x" if base else "-"
            dv = f"{100 * (r.val_loss / base.val_loss - 1):+.2f} %" if base else "-"
            gemms = r.int8_gemms if r.int8_gemms >= 0 else "not counted (every step compiled)"
            lines.append(f"| {r.variant} | {r.step_ms:.1f} | {sp} | {r.val_loss:.4f} | {dv} | {gemms} "
                         f"| {r.check} | {r.note} |")
        lines.append("")
        d, ac, f32p = rs.get("adaprec default"), rs.get("autocast bf16"), rs.get("adaprec fp32 plan")
        wide = size.name.startswith("wide")

        def judged(ok: bool, target: str, wide: bool = wide) -> str:
            return f"target {target}: {'met' if ok else 'NOT met'}" if wide else "no speed target for this size"

        if base and d:
            verdicts.append(f"{size.name}: adaprec default {base.step_ms / d.step_ms:.2f}x plain fp32 ("
                            f"{judged(base.step_ms / d.step_ms >= 2, '>= 2x')}); val loss "
                            f"{100 * (d.val_loss / base.val_loss - 1):+.2f} % vs fp32 (target within 1 %: "
                            f"{'met' if abs(d.val_loss / base.val_loss - 1) <= 0.01 else 'NOT met'})")
        if ac and d:
            verdicts.append(f"{size.name}: adaprec default {ac.step_ms / d.step_ms:.2f}x autocast bf16 ("
                            f"{judged(ac.step_ms / d.step_ms >= 1.2, '>= 1.2x')})")
        if base and f32p:
            verdicts.append(f"{size.name}: adaprec's fp32 plan costs {f32p.step_ms / base.step_ms:.3f}x plain fp32 "
                            f"(target <= 1.05x: {'met' if f32p.step_ms / base.step_ms <= 1.05 else 'NOT met'})")
        for r in results[size.name]:
            if base and r.variant.removesuffix(" compiled") in TORCHAO:
                verdicts.append(f"{size.name}: {r.variant} {base.step_ms / r.step_ms:.2f}x plain fp32, val loss "
                                f"{100 * (r.val_loss / base.val_loss - 1):+.2f} % vs fp32, {r.int8_gemms} int8 "
                                "GEMMs per step")
        cf, cd = rs.get("plain fp32 compiled"), rs.get("adaprec default compiled")
        if cf and cd:
            verdicts.append(f"{size.name}: under torch.compile, adaprec default {cf.step_ms / cd.step_ms:.2f}x compiled "
                            f"plain fp32 (median step; compiles and eager sampled steps show in the total time)")
    lines += ["Targets, and the peers beside plain fp32:", ""] + [f"- {v}" for v in verdicts]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.section, body)


if __name__ == "__main__":
    main()
