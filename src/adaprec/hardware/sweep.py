"""Run each format's real kernel: check it gives right answers, then time it against fp32.

A flag says what the silicon claims; only running the kernel says whether
torch uses it here and whether it pays. Three op classes are measured, each
with its own verdict because one does not predict another: GEMMs, a conv2d
forward+backward and a causal ``F.scaled_dot_product_attention``
forward+backward (on a CPU with bf16 units bf16 GEMMs can be twice as fast
as fp32 while bf16 attention is no faster). Every kernel is first checked on
a small problem against a float64 reference (int8 exactly, the float formats
within a few units of their own epsilon), then timed on training-like
shapes, interleaved with fp32 round by round so that a busy neighbour slows
both sides alike; a shape whose fp32 runs scatter widely (a busy machine)
is timed once more and the steadier attempt kept. A format that is several
times slower than fp32 in its warm-up runs is timed no further: its verdict
is clear and waiting for it would make the sweep long.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adaprec.formats import FLOAT16_DTYPES

__all__ = [
    "ATTENTION_KERNEL",
    "CONV_FORMATS",
    "CONV_KERNEL",
    "GEMM_FORMATS",
    "NOISY_SPREAD",
    "SWEEP_KINDS",
    "Measurement",
    "SweepResult",
    "attention_formats",
    "attention_shape",
    "conv_shape",
    "gemm_kernel_name",
    "gemm_shapes",
    "make_timer",
    "run",
    "run_attention",
    "run_conv",
    "run_gemm",
]

SWEEP_KINDS = ("full", "quick", "none")
GEMM_FORMATS = ("fp32", "bf16", "fp16", "int8", "fp8_e4m3", "fp8_e5m2")
CONV_FORMATS = ("fp32", "bf16")

Shape = tuple[int, int, int]
# A format this many times slower than fp32 after warm-up is not timed further.
_SLOW = 4.0
# fp32 runs of one shape further apart than this (slowest / fastest): the timing was disturbed,
# so the shape is timed once more (at most _ATTEMPTS times in all) and the steadier attempt kept.
NOISY_SPREAD = 1.5
_ATTEMPTS = 2
_REPEATS = {"full": 5, "quick": 3, "none": 0}
_CHECK_SHAPE: Shape = (64, 128, 64)  # small; meets _int_mm (M > 16, K, N % 8) and _scaled_mm (% 16) rules
_FLOAT_DTYPES = {"fp32": torch.float32, **FLOAT16_DTYPES}
_FP8_OUT = torch.bfloat16  # the output type every _scaled_mm build accepts


def gemm_shapes(device_type: str, kind: str) -> tuple[Shape, ...]:
    """(M, K, N) shapes of the sweep: the GEMMs of a small transformer's training step."""
    if kind == "none":
        return ()
    if device_type == "cuda":
        if kind == "quick":
            return ((1024, 1024, 1024),)
        return ((4096, 4096, 4096), (8192, 1024, 4096), (16384, 1024, 1024))
    if kind == "quick":
        return ((256, 256, 256),)
    return ((1024, 512, 512), (2048, 384, 1536), (4096, 384, 384))


def conv_shape(device_type: str, kind: str) -> tuple[int, int, int, int] | None:
    """(batch, channels, height, width) of the 3x3 same-padding conv timed forward and backward."""
    if kind == "none":
        return None
    if device_type == "cuda":
        return (8, 64, 32, 32) if kind == "quick" else (32, 128, 56, 56)
    return (4, 32, 16, 16) if kind == "quick" else (8, 64, 32, 32)


def attention_formats(device_type: str) -> tuple[str, ...]:
    """Formats whose attention is checked and timed: fp32 and bf16, and fp16 on CUDA.

    CPUs are not asked about fp16 attention: no CPU adaprec meets has fp16 units
    that torch's CPU attention uses, and the GEMM sweep already says so for fp16."""
    return ("fp32", "bf16", "fp16") if device_type == "cuda" else ("fp32", "bf16")


def attention_shape(device_type: str, kind: str) -> tuple[int, int, int, int] | None:
    """(batch, heads, sequence, head dim) of the causal attention timed forward and backward."""
    if kind == "none":
        return None
    if device_type == "cuda":
        return (4, 8, 512, 64) if kind == "quick" else (8, 16, 2048, 128)
    return (2, 4, 128, 64) if kind == "quick" else (8, 6, 256, 64)


def gemm_kernel_name(fmt: str) -> str:
    """The torch call that runs a GEMM in ``fmt`` (what the engine's native path calls)."""
    if fmt in _FLOAT_DTYPES:
        return f"torch.mm({str(_FLOAT_DTYPES[fmt]).removeprefix('torch.')})"
    if fmt == "int8":
        return "torch._int_mm"
    if fmt == "fp8_e4m3":
        return "torch._scaled_mm(e4m3 x e4m3)"
    if fmt == "fp8_e5m2":
        return "torch._scaled_mm(e5m2 x e4m3)"  # e5m2 is a gradient format: it meets an e4m3 operand
    raise KeyError(fmt)


CONV_KERNEL = "F.conv2d({}) fwd+bwd"
ATTENTION_KERNEL = "F.scaled_dot_product_attention({}, causal) fwd+bwd"
_ATTENTION_CHECK_SHAPE = (2, 3, 37, 32)  # a sequence that is no multiple of any kernel's block size


def _dtype_name(fmt: str) -> str:
    return str(_FLOAT_DTYPES[fmt]).removeprefix("torch.")


@dataclass(frozen=True)
class Measurement:
    """What running one format's kernel showed."""

    format: str
    kernel: str
    ok: bool  # it ran and matched the float64 reference
    error: str  # why not ok ("" when ok)
    speedup: float | None  # geometric mean over shapes of fp32 median time / this median time
    shapes_measured: int
    shapes_total: int
    repeats: int  # timed runs per shape (after two warm-ups)
    stopped_early: bool  # dropped after being far slower than fp32
    gflops: float | None = None  # achieved GFLOP/s (geometric mean), for the record
    fp32_spread: float | None = None  # slowest / fastest fp32 run of a shape (worst shape): noise


@dataclass(frozen=True)
class SweepResult:
    gemm: dict[str, Measurement]
    conv: dict[str, Measurement]
    kind: str
    attention: dict[str, Measurement]


# ---------------------------------------------------------------- kernels


def _gen(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def _gemm_operands(
    fmt: str, a: torch.Tensor, b: torch.Tensor
) -> tuple[Callable[[], torch.Tensor], torch.Tensor, torch.Tensor]:
    """A zero-argument call running the GEMM in ``fmt``, and its two operands as the kernel sees them."""
    if fmt in _FLOAT_DTYPES:
        dt = _FLOAT_DTYPES[fmt]
        aq, bq = a.to(dt), b.to(dt)
        return (lambda: torch.mm(aq, bq)), aq, bq
    if fmt == "int8":
        aq = torch.clamp(torch.round(a * 32), -127, 127).to(torch.int8)
        bq = torch.clamp(torch.round(b * 32), -127, 127).to(torch.int8)
        return (lambda: torch._int_mm(aq, bq)), aq, bq
    if fmt in ("fp8_e4m3", "fp8_e5m2"):
        adt = torch.float8_e4m3fn if fmt == "fp8_e4m3" else torch.float8_e5m2
        aq = a.to(adt)
        bq = _col_major(b.to(torch.float8_e4m3fn))  # _scaled_mm wants its second operand column-major
        one = torch.ones((), device=a.device, dtype=torch.float32)
        return (lambda: torch._scaled_mm(aq, bq, one, one, out_dtype=_FP8_OUT)), aq, bq
    raise KeyError(fmt)


def _out_eps(fmt: str) -> float:
    if fmt in ("fp8_e4m3", "fp8_e5m2"):
        return torch.finfo(_FP8_OUT).eps
    if fmt == "fp32":
        return 2.0**-10  # TF32 may be allowed on GPUs: accept its 10 mantissa bits
    return torch.finfo(_FLOAT_DTYPES[fmt]).eps


def _check_gemm(fmt: str, device: torch.device) -> str:
    """'' if ``fmt``'s kernel runs and is right on a small problem, else what went wrong."""
    m, k, n = _CHECK_SHAPE
    g = _gen(device, 1234)
    a = torch.randn(m, k, device=device, generator=g)
    b = torch.randn(k, n, device=device, generator=g)
    try:
        call, aq, bq = _gemm_operands(fmt, a, b)
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # any failure means: not usable here, say why
        return _failure(gemm_kernel_name(fmt), e)
    ad, bd = aq.to(torch.float64), bq.to(torch.float64)
    ref = ad @ bd
    if tuple(out.shape) != (m, n):
        return f"{gemm_kernel_name(fmt)} returned shape {tuple(out.shape)}, expected {(m, n)}"
    if fmt == "int8":
        if out.dtype != torch.int32:
            return f"torch._int_mm returned {out.dtype}, expected torch.int32"
        wrong = int((out.to(torch.float64) != ref).sum())
        return "" if wrong == 0 else f"torch._int_mm differs from the exact int32 product in {wrong} entries"
    bad = _close(out.to(torch.float64), ref, ad.abs() @ bd.abs(), fmt)
    return f"{gemm_kernel_name(fmt)} is wrong: {bad}" if bad else ""


def _close(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, fmt: str) -> str:
    """'' if ``out`` is ``ref`` up to a few units of ``fmt``'s epsilon, else how far off it is.

    Two tests: the relative Frobenius error (catches a result scaled or
    shifted everywhere) and each entry's error against the size of its sum
    before cancellation, ``|A| @ |B|`` (catches a few garbage entries). 8 eps
    leaves room for a kernel that accumulates in the narrow type."""
    tol = 8 * _out_eps(fmt)
    err = out - ref
    normwise = float(err.norm() / ref.norm().clamp_min(1e-30))
    entrywise = float((err.abs() / (bound + 1e-30)).max())
    if not (math.isfinite(normwise) and math.isfinite(entrywise)):
        return "non-finite result"
    if normwise > tol or entrywise > tol:
        return f"relative error {normwise:.3g} (worst entry {entrywise:.3g} of its scale), allowed {tol:.3g}"
    return ""


def _conv_operands(
    fmt: str, shape: tuple[int, int, int, int], device: torch.device, seed: int
) -> tuple[Callable[[], torch.Tensor], torch.Tensor, torch.Tensor]:
    nb, c, h, w = shape
    dt = _FLOAT_DTYPES[fmt]
    g = _gen(device, seed)
    x = torch.randn(nb, c, h, w, device=device, generator=g).to(dt).requires_grad_()
    wt = (torch.randn(c, c, 3, 3, device=device, generator=g) / math.sqrt(9 * c)).to(dt).requires_grad_()
    gy = torch.randn(nb, c, h, w, device=device, generator=g).to(dt)

    def call() -> torch.Tensor:
        y = F.conv2d(x, wt, padding=1)
        torch.autograd.grad(y, (x, wt), gy)
        return y

    return call, x, wt


def _check_conv(fmt: str, device: torch.device) -> str:
    kernel = CONV_KERNEL.format(str(_FLOAT_DTYPES[fmt]).removeprefix("torch."))
    try:
        _, x, wt = _conv_operands(fmt, (2, 8, 8, 8), device, 99)
        y = F.conv2d(x, wt, padding=1)
        gx, gw = torch.autograd.grad(y, (x, wt), torch.ones_like(y))
    except Exception as e:
        return _failure(kernel, e)
    xd, wd = x.detach().double(), wt.detach().double()
    ref = F.conv2d(xd, wd, padding=1)
    bad = _close(y.detach().double(), ref, F.conv2d(xd.abs(), wd.abs(), padding=1), fmt)
    if bad:
        return f"{kernel} forward is wrong: {bad}"
    if not (torch.isfinite(gx).all() and torch.isfinite(gw).all()):
        return f"{kernel} backward gave non-finite gradients"
    return ""


def _attention_operands(
    fmt: str, shape: tuple[int, int, int, int], device: torch.device, seed: int
) -> tuple[Callable[[], torch.Tensor], tuple[torch.Tensor, ...]]:
    """A call running causal attention forward and backward in ``fmt``; its q, k, v and output gradient."""
    nb, heads, seq, dim = shape
    dt = _FLOAT_DTYPES[fmt]
    g = _gen(device, seed)
    q, k, v = (torch.randn(nb, heads, seq, dim, device=device, generator=g).to(dt) for _ in range(3))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    go = torch.randn(nb, heads, seq, dim, device=device, generator=g).to(dt)

    def call() -> torch.Tensor:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(o, (q, k, v), go)
        return o

    return call, (q, k, v, go)


def _attention_backend(o: torch.Tensor) -> str:
    """Which of torch's attention kernels produced ``o``, read from its autograd node.

    The fused kernels have their own backward node (ScaledDotProductFlashAttentionForCpuBackward0
    becomes 'flash_attention_for_cpu'); anything else is torch's decomposed math path."""
    name = type(o.grad_fn).__name__ if o.grad_fn is not None else ""
    if not name.startswith("ScaledDotProduct"):
        return "math"
    name = re.sub(r"Backward\d*$", "", name.removeprefix("ScaledDotProduct"))
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _attention_kernel(fmt: str, backend: str = "") -> str:
    name = ATTENTION_KERNEL.format(_dtype_name(fmt))
    return f"{name}: {backend}" if backend else name


def _attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention written out (scores, mask, softmax, weighted sum), and its probabilities."""
    seq = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    keep = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    p = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    return p @ v, p


def _check_attention(fmt: str, device: torch.device) -> tuple[str, str]:
    """('' or what went wrong, the backend torch chose) for causal attention in ``fmt`` on a small problem.

    Forward and all three gradients are compared with float64 autograd through
    :func:`_attention_reference` on the same (rounded) inputs: the output entry by
    entry against its scale ``P @ |V|``, each gradient by its relative error."""
    kernel = _attention_kernel(fmt)
    try:
        _, (q, k, v, go) = _attention_operands(fmt, _ATTENTION_CHECK_SHAPE, device, 99)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(o, (q, k, v), go)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:
        return _failure(kernel, e), ""
    backend = _attention_backend(o)
    kernel = _attention_kernel(fmt, backend)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, p = _attention_reference(qd, kd, vd)
    refs = torch.autograd.grad(ref, (qd, kd, vd), go.double())
    ref, p = ref.detach(), p.detach()
    bad = _close(o.detach().double(), ref, p @ vd.detach().abs(), fmt)
    if bad:
        return f"{kernel} forward is wrong: {bad}", backend
    tol = 8 * _out_eps(fmt)
    for name, gr, rr in zip(("q", "k", "v"), grads, refs, strict=True):
        rel = float((gr.double() - rr).norm() / rr.norm().clamp_min(1e-30))
        if not math.isfinite(rel) or rel > tol:
            why = f"gradient of {name} relative error {rel:.3g}, allowed {tol:.3g}"
            return f"{kernel} backward is wrong: {why}", backend
    return "", backend


# ---------------------------------------------------------------- timing


def make_timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds one call of ``fn`` takes on ``device`` (CUDA is synchronised before and after)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def once(fn: Callable[[], object]) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    return once


_timer = make_timer


def _failure(kernel: str, e: Exception) -> str:
    first = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{kernel} raised {type(e).__name__}: {first}"


def _time_round_robin(
    calls: Mapping[str, Callable[[], object]], device: torch.device, repeats: int, failed: dict[str, str]
) -> tuple[dict[str, float], set[str], float]:
    """Median seconds per call for each entry (fp32 among them), the entries dropped as far
    slower, and the spread (slowest / fastest) of the fp32 runs: a large one means a busy machine.
    An entry whose call raises is left out and its error put in ``failed`` (fp32's is raised)."""
    once = _timer(device)
    samples: dict[str, list[float]] = {}
    for _ in range(2):  # two warm-up rounds (allocation, primitive creation), timed, interleaved
        for fmt, fn in calls.items():
            if fmt in failed:
                continue
            try:
                samples.setdefault(fmt, []).append(once(fn))
            except Exception as e:  # e.g. a shape rule the small check did not meet, or out of memory
                if fmt == "fp32":
                    raise
                failed[fmt] = _failure(fmt, e)
                samples.pop(fmt, None)
    calls = {f: c for f, c in calls.items() if f in samples}
    # Warm-ups only err slow, so compare their minima: one disturbed run cannot drop a format.
    ref = min(samples["fp32"])
    slow = {f for f, s in samples.items() if f != "fp32" and min(s) > _SLOW * ref}
    active = [f for f in calls if f not in slow]
    samples = {f: ([] if f in active else s) for f, s in samples.items()}
    for _ in range(repeats):
        for fmt in active:
            samples[fmt].append(once(calls[fmt]))
    ref_s = samples["fp32"]
    spread = max(ref_s) / min(ref_s)
    return {f: statistics.median(s) for f, s in samples.items()}, slow, spread


def _time_settled(
    calls: Mapping[str, Callable[[], object]], device: torch.device, repeats: int, failed: dict[str, str]
) -> tuple[dict[str, float], set[str], float]:
    """:func:`_time_round_robin`, once more if the fp32 runs were noisy; the steadier attempt is kept."""
    best = _time_round_robin(calls, device, repeats, failed)
    for _ in range(_ATTEMPTS - 1):
        if best[2] <= NOISY_SPREAD:
            break
        again = _time_round_robin({f: c for f, c in calls.items() if f not in failed}, device, repeats, failed)
        if again[2] < best[2]:
            best = again
    return best


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def run_gemm(device: torch.device, kind: str, formats: tuple[str, ...] = GEMM_FORMATS) -> dict[str, Measurement]:
    """Check, then time, each format's GEMM kernel on ``device``; fp32 is always measured as reference."""
    formats = ("fp32", *(f for f in formats if f != "fp32"))
    errors = {f: _check_gemm(f, device) for f in formats}
    shapes = gemm_shapes(device.type, kind)
    repeats = _REPEATS[kind]
    ratios: dict[str, list[float]] = {f: [] for f in formats}
    flops: dict[str, list[float]] = {f: [] for f in formats}
    dropped: set[str] = set()
    spreads: list[float] = []
    for i, (m, k, n) in enumerate(shapes):
        g = _gen(device, 7 + i)
        a = torch.randn(m, k, device=device, generator=g)
        b = torch.randn(k, n, device=device, generator=g)
        calls = {}
        for f in formats:
            if f == "fp32" or (not errors[f] and f not in dropped):
                calls[f] = _gemm_operands(f, a, b)[0]
        failed: dict[str, str] = {}
        med, slow, spread = _time_settled(calls, device, repeats, failed)
        for f, why in failed.items():
            errors[f] = f"{gemm_kernel_name(f)} failed on shape {(m, k, n)}: {why.split(' ', 1)[1]}"
            ratios[f].clear()
            flops[f].clear()
        spreads.append(spread)
        dropped |= slow
        for f, t in med.items():
            ratios[f].append(med["fp32"] / t)
            flops[f].append(2.0 * m * k * n / t / 1e9)
        del a, b, calls
    out = {}
    for f in formats:
        r = ratios[f]
        out[f] = Measurement(
            format=f,
            kernel=gemm_kernel_name(f),
            ok=not errors[f],
            error=errors[f],
            speedup=_geomean(r) if r else None,
            shapes_measured=len(r),
            shapes_total=len(shapes),
            repeats=repeats,
            stopped_early=f in dropped,
            gflops=_geomean(flops[f]) if flops[f] else None,
            fp32_spread=max(spreads, default=None),
        )
    return out


def _run_one_shape(
    formats: tuple[str, ...],
    errors: dict[str, str],
    kernels: dict[str, str],
    calls: Mapping[str, Callable[[], object]],
    flops: float,
    device: torch.device,
    kind: str,
    shape: tuple[int, ...] | None,
) -> dict[str, Measurement]:
    """Time ``calls`` (fp32 and each format that passed its check) on one shape; a verdict per format.

    No calls (sweep="none"): nothing is timed and every speedup is None."""
    repeats = _REPEATS[kind]
    med: dict[str, float] = {}
    slow: set[str] = set()
    spread: float | None = None
    if calls:
        failed: dict[str, str] = {}
        med, slow, spread = _time_settled(calls, device, repeats, failed)
        for f, why in failed.items():
            errors[f] = f"{kernels[f]} failed on shape {shape}: {why.split(' ', 1)[1]}"
            med.pop(f, None)
    out = {}
    for f in formats:
        t = med.get(f)
        out[f] = Measurement(
            format=f,
            kernel=kernels[f],
            ok=not errors[f],
            error=errors[f],
            speedup=med["fp32"] / t if t else None,
            shapes_measured=1 if t else 0,
            shapes_total=1 if calls else 0,
            repeats=repeats,
            stopped_early=f in slow,
            gflops=flops / t / 1e9 if t else None,
            fp32_spread=spread,
        )
    return out


def run_conv(
    device: torch.device, kind: str, formats: tuple[str, ...] = CONV_FORMATS
) -> dict[str, Measurement]:
    """Check, then time forward+backward of a 3x3 conv2d in each format against fp32."""
    formats = ("fp32", *(f for f in formats if f != "fp32"))
    errors = {f: _check_conv(f, device) for f in formats}
    kernels = {f: CONV_KERNEL.format(_dtype_name(f)) for f in formats}
    shape = conv_shape(device.type, kind)
    nb, c, h, w = shape or (0, 0, 0, 0)
    conv_flops = 3 * 2.0 * nb * c * c * 9 * h * w  # forward, input gradient, weight gradient
    calls: dict[str, Callable[[], object]] = {}
    if shape is not None:
        calls = {f: _conv_operands(f, shape, device, 5)[0] for f in formats if f == "fp32" or not errors[f]}
    return _run_one_shape(formats, errors, kernels, calls, conv_flops, device, kind, shape)


def run_attention(
    device: torch.device, kind: str, formats: tuple[str, ...] | None = None
) -> dict[str, Measurement]:
    """Check, then time causal ``F.scaled_dot_product_attention`` forward+backward per format against fp32.

    ``formats`` defaults to :func:`attention_formats` of the device. The kernel
    name says which of torch's attention backends ran on the timed shape."""
    formats = attention_formats(device.type) if formats is None else formats
    formats = ("fp32", *(f for f in formats if f != "fp32"))
    checks = {f: _check_attention(f, device) for f in formats}
    errors = {f: e for f, (e, _) in checks.items()}
    backends = {f: b for f, (_, b) in checks.items()}
    shape = attention_shape(device.type, kind)
    nb, heads, seq, dim = shape or (0, 0, 0, 0)
    # QK^T and PV forward; dV, dP, dQ, dK backward: six (seq x seq x dim) matmuls, half of each masked away
    attn_flops = 6 * 2.0 * nb * heads * seq * seq * dim / 2
    calls: dict[str, Callable[[], object]] = {}
    if shape is not None:
        for f in formats:
            if f != "fp32" and errors[f]:
                continue
            call, (q, k, v, _) = _attention_operands(f, shape, device, 11)
            calls[f] = call
            try:  # the backend torch picks can depend on the shape: name the one that is timed
                backends[f] = _attention_backend(F.scaled_dot_product_attention(q, k, v, is_causal=True))
            except Exception:  # the timed runs meet the same failure and record it
                pass
    kernels = {f: _attention_kernel(f, backends[f]) for f in formats}
    return _run_one_shape(formats, errors, kernels, calls, attn_flops, device, kind, shape)


def run(device: torch.device, kind: str) -> SweepResult:
    """The whole sweep for one device: GEMM, conv and attention. ``kind="none"`` checks but does not time."""
    if kind not in SWEEP_KINDS:
        raise ValueError(f"unknown sweep kind {kind!r}")
    with torch.no_grad():
        gemm = run_gemm(device, kind)
    with torch.enable_grad():
        conv = run_conv(device, kind)
        attention = run_attention(device, kind)
    return SweepResult(gemm=gemm, conv=conv, kind=kind, attention=attention)
