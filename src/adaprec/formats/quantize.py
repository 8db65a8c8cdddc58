"""Round float32 values to the values of a narrower format (emulation).

The result stays a float32 tensor that holds exactly the representable
values of the target format, so any PyTorch op can consume it. Float formats
are rounded on the integer bit pattern of float32: within one binade the
float32 codes are evenly spaced, so rounding the low ``23 - mbits`` bits
(more below the target's smallest normal) is exact rounding, and a carry
into the exponent is exactly the step to the next binade. Only values below
half the smallest subnormal need a separate rule.

The same function body runs eagerly or fused by ``torch.compile``
(:func:`compiled`); both give identical bits because every step is integer
arithmetic or an exact power-of-two scaling.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch

from adaprec.errors import RoundingError
from adaprec.formats.registry import Format, get

__all__ = ["quantize", "compiled", "ROUNDING_MODES"]

ROUNDING_MODES = ("nearest", "stochastic")

_MASK32 = 0xFFFFFFFF
_use_compiled: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "adaprec_compiled_quantize", default=False
)


@contextlib.contextmanager
def compiled(enabled: bool = True) -> Iterator[None]:
    """Within this block, :func:`quantize` runs as one fused ``torch.compile`` kernel.

    The first call per format costs a compile (seconds); results are
    bit-identical to the eager path.
    """
    token = _use_compiled.set(enabled)
    try:
        yield
    finally:
        _use_compiled.reset(token)


def _hash32(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Counter-based hash of (element index, seed) to 32 random bits.

    int64 arithmetic masked to 32 bits after each multiply: the multipliers
    are below 2^31, so no product leaves int64 and the bits are the same on
    every machine, eager or compiled.
    """
    h = (index * 0x27D4EB2D + (seed & _MASK32) * 0x165667B1 + 0x3C6EF372) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _MASK32
    h = h ^ (h >> 12)
    h = (h * 0x297A2D39) & _MASK32
    h = h ^ (h >> 15)
    return h


def _pow2(e: int) -> float:
    return float(2.0**e)


def _scale_exact(x: torch.Tensor, e: int) -> torch.Tensor:
    """x * 2^e without overflowing the float32 constant (split in two steps)."""
    if abs(e) <= 126:
        return x * _pow2(e)
    half = e // 2
    return (x * _pow2(half)) * _pow2(e - half)


def _quantize_float(
    x: torch.Tensor,
    mbits: int,
    emin: int,
    max_finite: float,
    overflow: str,
    stochastic: bool,
    seed: int,
) -> torch.Tensor:
    """Core of float rounding on a contiguous float32 tensor (compile-friendly)."""
    bits = x.view(torch.int32)
    sign = bits & -0x80000000
    mag = bits & 0x7FFFFFFF
    exp_field = torch.clamp(mag >> 23, min=1)
    emin_field = emin + 127
    extra = torch.clamp(emin_field - exp_field, min=0)
    shift = (23 - mbits) + extra
    small = shift > 23  # below half the smallest subnormal's spacing boundary
    shift_c = torch.clamp(shift, max=23)
    one = torch.ones_like(mag)
    if stochastic:
        index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape)
        r64 = _hash32(index, seed)
        rnd = (r64 & ((one.to(torch.int64) << shift_c) - 1)).to(torch.int32)
        mag_r = ((mag + rnd) >> shift_c) << shift_c
        # tiny values: up to the smallest subnormal with probability |x| / min_sub
        u = (r64 >> 8).to(torch.float32) * (2.0**-24)
        ratio = _scale_exact(torch.abs(x), mbits - emin)
        tiny_up = u < ratio
    else:
        half = (one << (shift_c - 1)) - 1
        lsb = (mag >> shift_c) & 1
        mag_r = ((mag + half + lsb) >> shift_c) << shift_c
        # exactly half the smallest subnormal ties to even (zero)
        ratio = _scale_exact(torch.abs(x), mbits - emin)
        tiny_up = ratio > 0.5
    min_sub_bits = torch.tensor(
        _pow2(emin - mbits), dtype=torch.float32, device=x.device
    ).view(torch.int32)
    mag_r = torch.where(small, torch.where(tiny_up, min_sub_bits, 0), mag_r)
    q = (mag_r | sign).view(torch.float32)
    over = torch.abs(q) > max_finite
    if overflow == "saturate":
        repl = torch.copysign(torch.full_like(q, max_finite), x)
    elif overflow == "inf":
        repl = torch.copysign(torch.full_like(q, float("inf")), x)
    else:  # "nan"
        repl = torch.full_like(q, float("nan"))
    q = torch.where(over, repl, q)
    return torch.where(torch.isnan(x), x, q)


def _quantize_int(
    x: torch.Tensor, scale: float, qmax: int, stochastic: bool, seed: int
) -> torch.Tensor:
    y = x / scale
    if stochastic:
        index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape)
        u = (_hash32(index, seed) >> 8).to(torch.float32) * (2.0**-24)
        y = torch.floor(y + u)
    else:
        y = torch.round(y)  # half to even
    q = torch.clamp(y, -qmax, qmax) * scale
    return torch.where(torch.isnan(x), x, q)


@functools.lru_cache(maxsize=None)
def _compiled_float():  # pragma: no cover - exercised by the compile test and bench
    return torch.compile(_quantize_float, dynamic=False)


@functools.lru_cache(maxsize=None)
def _compiled_int():  # pragma: no cover
    return torch.compile(_quantize_int, dynamic=False)


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
            output on every run and machine. ``None`` draws one from torch's
            global generator (so ``torch.manual_seed`` makes it reproducible).
        saturate: what happens to finite values beyond the largest finite
            value. ``None`` follows the format: formats with inf overflow to
            inf (as IEEE and torch casts do), formats without inf (E4M3FN,
            fp6, fp4, intN) saturate to the largest value. ``True`` always
            saturates (inf becomes the largest value too); ``False`` gives
            inf where the format has it and NaN where it does not.

    NaN stays NaN. Fixed-point formats round ``x / scale`` to integers in
    ``[-qmax, qmax]``.
    """
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
    else:
        seed = 0
    x32 = x.detach().to(torch.float32).contiguous()
    use_compiled = _use_compiled.get()
    if f.kind == "int":
        fn = _compiled_int() if use_compiled else _quantize_int
        return fn(x32, f.scale, f.qmax, stochastic, seed)
    if f.mbits >= 23 and f.ebits >= 8:
        return x32.clone()  # fp32 holds itself
    if saturate is None:
        overflow = "inf" if f.has_inf else "saturate"
    elif saturate:
        overflow = "saturate"
    else:
        overflow = "inf" if f.has_inf else "nan"
    fn = _compiled_float() if use_compiled else _quantize_float
    return fn(x32, f.mbits, f.emin, f.max_finite, overflow, stochastic, seed)
