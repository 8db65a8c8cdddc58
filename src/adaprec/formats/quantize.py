"""Round float32 values to the values of a narrower format (emulation).

The result stays a float32 tensor that holds exactly the representable
values of the target format, so any PyTorch op can consume it. Float formats
are rounded on the integer bit pattern of float32: within one binade the
float32 codes are evenly spaced, so rounding the low ``23 - mbits`` bits
(more below the target's smallest normal) is exact rounding, and a carry
into the exponent is exactly the step to the next binade. A tie goes to the
neighbour whose kept significand is even; the significand includes float32's
implicit leading 1, which is the kept bit when all 23 fraction bits are
dropped (the binade of the smallest subnormal, or any binade of an ExM0
format). Only values below the smallest subnormal need a separate rule: they
round to zero or to it (exactly half of it ties to zero).

The same function body runs eagerly or fused by ``torch.compile``
(:func:`compiled`); both give identical bits because every step is integer
arithmetic or an exact power-of-two scaling. The stochastic-rounding seed
enters as a tensor, so a new seed every step does not recompile.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import struct
from collections.abc import Callable, Iterator
from typing import Any

import torch

from adaprec.errors import RoundingError
from adaprec.formats.modes import ROUNDING_MODES
from adaprec.formats.registry import Format, get

__all__ = ["quantize", "quantize_each", "compiled", "ROUNDING_MODES"]


_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_use_compiled: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "adaprec_compiled_quantize", default=False
)


@contextlib.contextmanager
def compiled(enabled: bool = True) -> Iterator[None]:
    """Within this block, :func:`quantize` runs as one fused ``torch.compile`` kernel.

    The first call per format and rounding mode costs a compile (seconds);
    later calls with any shape or seed reuse it. Results are bit-identical
    to the eager path.
    """
    token = _use_compiled.set(enabled)
    try:
        yield
    finally:
        _use_compiled.reset(token)


def _seed_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit round keys from a seed (splitmix64 finaliser, pure Python)."""
    z = (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z & _MASK32, z >> 32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """One xorshift-multiply avalanche round on values in [0, 2^32) held as int64.

    Multipliers are odd and below 2^31, so no product leaves int64 and the
    bits are the same on every machine, eager or compiled.
    """
    # in place where possible: eagerly, each fresh 16M-element int64 temporary costs more than the math
    h ^= h >> 16
    h.mul_(0x21F0AAAD).bitwise_and_(_MASK32)
    h ^= h >> 15
    h.mul_(0x735A2D97).bitwise_and_(_MASK32)
    h ^= h >> 15
    return h


def _hash32(index: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Counter-based hash of (element index, seed keys) to 32 uniform random bits.

    The second key enters after a full mixing round, so streams of different
    seeds are not shifted copies of each other.
    """
    h = _mix32((index + keys[0]).bitwise_and_(_MASK32))
    h ^= keys[1]
    return _mix32(h)


def _random_bits(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device)
    return _hash32(index, keys)


def _pow2(e: int) -> float:
    return float(2.0**e)


def _round_float(
    x: torch.Tensor, keys: torch.Tensor, ip: torch.Tensor, fp: torch.Tensor, stochastic: bool
) -> torch.Tensor:
    """Round a flat float32 tensor to a float format (compile-friendly).

    The format arrives as tensors, so one compiled graph serves every format:
    ``ip`` = (23 - mbits, biased emin, bits of the smallest subnormal),
    ``fp`` = (two factors whose product is 1 / min_subnormal, max_finite,
    the value that replaces an overflow: max_finite, inf or NaN).
    """
    bits = x.view(torch.int32)
    sign = bits & -0x80000000
    mag = bits & 0x7FFFFFFF
    exp_field = torch.clamp(mag >> 23, min=1)
    shift = ip[0] + torch.clamp(ip[1] - exp_field, min=0)
    small = shift > 23  # below the smallest subnormal: rounds to 0 or min_sub
    shift_c = torch.clamp(shift, max=23)
    ratio = torch.abs(x) * fp[0] * fp[1]  # |x| / min_sub, exact (powers of two)
    if stochastic:
        r = _random_bits(x, keys)
        rnd = (r & ((1 << shift_c.to(torch.int64)) - 1)).to(torch.int32)
        # up with probability |x| / min_sub (24 random bits)
        tiny_up = (r >> 8).to(torch.float32) * (2.0**-24) < ratio
    else:
        # half an ulp minus one, plus the lowest kept bit of the significand: ties go to even. The
        # significand is the 23 fraction bits plus the implicit leading 1 of a normal float32 (a
        # float32 subnormal has none), so at shift 23 (the binade [min_sub, 2 min_sub), or every
        # binade of an ExM0 format) the kept bit is that implicit 1, never the exponent's lowest bit
        sig = (mag & 0x7FFFFF) | ((mag >= 0x800000).to(torch.int32) << 23)
        rnd = torch.clamp(((1 << shift_c) >> 1) - 1 + ((sig >> shift_c) & 1), min=0)
        tiny_up = ratio > 0.5  # exactly half of min_sub ties to even (zero)
    mag_r = ((mag + rnd) >> shift_c) << shift_c
    mag_r = torch.where(small, tiny_up.to(torch.int32) * ip[2], mag_r)
    q = (mag_r | sign).view(torch.float32)
    q = torch.where(torch.abs(q) > fp[2], torch.copysign(fp[3], x), q)
    return torch.where(torch.isnan(x), x, q)


def _round_int(x: torch.Tensor, keys: torch.Tensor, fp: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """Round a flat float32 tensor to fixed point; ``fp`` = (scale, qmax, saturate 1/0)."""
    y = x / fp[0]  # exact: scale is a power of two
    if stochastic:
        u = (_random_bits(x, keys) >> 8).to(torch.float32) * (2.0**-24)
        lo = torch.floor(y)
        y = lo + (u < (y - lo)).to(torch.float32)  # y - lo is exact
    else:
        y = torch.round(y)  # half to even
    over = torch.abs(y) > fp[1]
    q = torch.where(over & (fp[2] == 0), float("nan"), torch.clamp(y, -fp[1], fp[1]) * fp[0])
    return torch.where(torch.isnan(x), x, q)


@functools.cache
def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return torch.compile(fn, dynamic=True)


@functools.lru_cache(maxsize=256)
def _float_params(mbits: int, emin: int, max_finite: float, overflow: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    e = mbits - emin
    # the float32 bit pattern of the smallest subnormal, in plain Python (no tensor op: a cached call must not
    # make a process's first step run one op more than its later ones, which the ledger's byte count would see)
    min_sub_bits = struct.unpack("<i", struct.pack("<f", _pow2(emin - mbits)))[0]
    repl = {"saturate": max_finite, "inf": float("inf"), "nan": float("nan")}[overflow]
    return (23 - mbits, emin + 127, min_sub_bits), (_pow2(e // 2), _pow2(e - e // 2), max_finite, repl)


#: Eager nearest rounding to a format torch can cast to uses the cast (one fast
#: kernel). The tests prove cast and bit kernel agree on every float32 pattern
#: with this switch off and on.
NATIVE_FAST_PATH = True


def _native_cast(f: Format, stochastic: bool, saturate: bool | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A torch cast that gives exactly quantize()'s bits, or None where there is none."""
    if not NATIVE_FAST_PATH or stochastic or f.kind != "float" or f.torch_dtype is None:
        return None
    dtype, limit = f.torch_dtype, f.max_finite
    if f.has_inf:  # IEEE casts overflow to inf: exactly saturate=None/False; clamp for True
        if saturate:
            return lambda t: torch.clamp(t.to(dtype).to(torch.float32), -limit, limit)
        return lambda t: t.to(dtype).to(torch.float32)
    if saturate is False:  # torch's E4M3FN cast saturates; quantize gives NaN here
        return None
    return lambda t: t.to(dtype).to(torch.float32)


def _draw_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def quantize(
    x: torch.Tensor,
    fmt: str | Format,
    rounding: str = "nearest",
    seed: int | None = None,
    saturate: bool | None = None,
) -> torch.Tensor:
    """Return a float32 tensor of the values of ``x`` rounded to ``fmt``.

    Args:
        x: any floating tensor; it is read as float32.
        fmt: a format name (see ``adaprec.formats.names()``) or a :class:`Format`.
        rounding: ``"nearest"`` (round half to even) or ``"stochastic"``
            (round up with probability equal to the distance from the lower
            neighbour, in ulps: unbiased).
        seed: stochastic rounding seed. The same seed gives bit-identical
            output on every run and machine; element ``i`` of the flattened
            tensor always draws the same random bits for one seed. ``None``
            draws one from torch's global generator (so ``torch.manual_seed``
            makes it reproducible).
        saturate: what happens to finite values beyond the largest finite
            value. ``None`` follows the format: formats with inf overflow to
            inf (as IEEE and torch casts do), formats without inf (E4M3FN,
            fp6, fp4, intN) saturate to the largest value. ``True`` always
            saturates (inf becomes the largest value too); ``False`` gives
            inf where the format has it and NaN where it does not.

    NaN stays NaN. Fixed-point formats round ``x / scale`` to integers in
    ``[-qmax, qmax]``.

    Differentiable by the straight-through estimator: when ``x`` requires grad
    (and grad mode is on), the result has a ``grad_fn`` whose backward passes
    the gradient through unchanged (rounding is treated as the identity, as in
    quantization-aware training), cast back to ``x``'s dtype.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return _StraightThrough.apply(x, fmt, rounding, seed, saturate)
    return _quantize(x, fmt, rounding, seed, saturate)


class _StraightThrough(torch.autograd.Function):
    """Rounded forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(x, fmt, rounding, seed, saturate):  # type: ignore[override]
        return _quantize(x, fmt, rounding, seed, saturate)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.to(ctx.dtype), None, None, None, None


def _quantize(
    x: torch.Tensor,
    fmt: str | Format,
    rounding: str = "nearest",
    seed: int | None = None,
    saturate: bool | None = None,
) -> torch.Tensor:
    f = get(fmt)
    if rounding not in ROUNDING_MODES:
        raise RoundingError(
            f"unknown rounding mode {rounding!r}; use one of {', '.join(ROUNDING_MODES)}"
        )
    if not torch.is_floating_point(x):
        raise RoundingError(f"quantize needs a floating tensor, got dtype {x.dtype}")
    stochastic = rounding == "stochastic"
    if stochastic:
        if seed is None:
            seed = _draw_seed()
        elif not isinstance(seed, int) or isinstance(seed, bool):
            raise RoundingError(f"stochastic rounding seed must be an int, got {seed!r}")
        keys = torch.tensor(_seed_keys(seed), dtype=torch.int64, device=x.device)
    else:
        keys = torch.zeros(2, dtype=torch.int64, device=x.device)
    x32 = x.detach().to(torch.float32).contiguous()
    if f.holds_float32:
        return x32.clone()
    native = _native_cast(f, stochastic, saturate)
    if native is not None and not _use_compiled.get():
        return native(x32)
    if x32.numel() == 0:
        return x32.clone()
    dev = x32.device
    if f.kind == "int":
        fn: Callable[..., torch.Tensor] = _round_int
        sat = 0.0 if saturate is False else 1.0
        args: tuple = (torch.tensor([f.scale, float(f.qmax), sat], dtype=torch.float32, device=dev),)
    else:
        if saturate is None:
            overflow = "inf" if f.has_inf else "saturate"
        elif saturate:
            overflow = "saturate"
        else:
            overflow = "inf" if f.has_inf else "nan"
        ip, fp = _float_params(f.mbits, f.emin, f.max_finite, overflow)
        fn = _round_float
        args = (
            torch.tensor(ip, dtype=torch.int32, device=dev),
            torch.tensor(fp, dtype=torch.float32, device=dev),
        )
    if _use_compiled.get():
        fn = _compiled(fn)
    return fn(x32.view(-1), keys, *args, stochastic).view(x32.shape)


@functools.lru_cache(maxsize=64)
def _each_params(names: tuple[str, ...], device: torch.device, native: bool) -> tuple[Any, ...]:
    """How :func:`quantize_each` rounds each row: by a native cast (rows grouped per format), by the
    float bit kernel, or by the fixed-point kernel, with their parameters shaped ``[k, rows, 1]``."""
    fmts = [get(n) for n in names]
    wide = {i for i, f in enumerate(fmts) if f.holds_float32}
    casts: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]] = {}
    if native:
        for i, f in enumerate(fmts):
            cast = None if i in wide else _native_cast(f, False, True)
            if cast is not None:
                casts.setdefault(f.name, (cast, []))[1].append(i)
    cast_rows = {i for _, rows in casts.values() for i in rows}
    floats = [i for i, f in enumerate(fmts) if f.kind == "float" and i not in wide and i not in cast_rows]
    ints = [i for i, f in enumerate(fmts) if f.kind == "int"]
    ip, fp = [], []
    for i in floats:
        a, b = _float_params(fmts[i].mbits, fmts[i].emin, fmts[i].max_finite, "saturate")
        ip.append(a)
        fp.append(b)
    ifp = [(fmts[i].scale, float(fmts[i].qmax), 1.0) for i in ints]

    def idx(rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.int64, device=device)

    def cols(rows: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(rows, dtype=dtype, device=device).T.reshape(-1, len(rows), 1)

    native_groups = tuple((cast, idx(rows)) for cast, rows in casts.values())
    return (
        native_groups,
        idx(floats),
        cols(ip, torch.int32) if ip else torch.empty(0),
        cols(fp, torch.float32) if fp else torch.empty(0),
        idx(ints),
        cols(ifp, torch.float32) if ifp else torch.empty(0),
    )


def quantize_each(x: torch.Tensor, formats: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Round row ``i`` of ``x`` to ``formats[i]``, nearest-even and saturating, in one batch of ops.

    Bit-identical to ``quantize(x[i], formats[i], saturate=True)`` for every
    row, but a handful of kernels for all rows together instead of a dozen per
    format: the health monitor measures a tensor under many candidate formats
    at once this way. ``x`` is float32 with the formats along dimension 0.
    """
    names = tuple(get(n).name for n in formats)
    if x.dim() == 0 or x.shape[0] != len(names):
        raise RoundingError(
            f"quantize_each needs one row per format: got shape {tuple(x.shape)} for {len(names)} formats"
        )
    x32 = x.detach().to(torch.float32).reshape(len(names), -1)
    native_groups, floats, ip, fp, ints, ifp = _each_params(names, x32.device, NATIVE_FAST_PATH)
    out = x32.clone()  # fp32 rows hold themselves
    if x32.shape[1] == 0:
        return out.view(x.shape)
    for cast, rows in native_groups:  # one fast kernel per format torch can cast to (same bits)
        out[rows] = cast(x32[rows])
    keys = torch.zeros(2, dtype=torch.int64, device=x32.device)
    if floats.numel():
        out[floats] = _round_float(x32[floats], keys, ip, fp, False)
    if ints.numel():
        out[ints] = _round_int(x32[ints], keys, ifp, False)
    return out.view(x.shape)
