"""Quantization health of one tensor, measured cheaply.

The pure helpers (:func:`sqnr_db`, :func:`overflow_frac`,
:func:`underflow_frac`, :func:`amax`) answer one question each and return a
float. :func:`measure` is what the monitor runs on sampled steps: it casts a
strided sample of the tensor to the current format and to every candidate
format, under the scaling that format would be used with, and returns all
the sums in one tensor so the whole observation costs a single host sync
(at snapshot time), or none at all while statistics are only accumulated.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adaprec.formats import Format, get, quantize, quantize_each
from adaprec.monitor.snapshot import TensorStats
from adaprec.plan import TensorRecipe

__all__ = [
    "DEFAULT_CANDIDATES",
    "FIXED_POINT_CANDIDATES",
    "MAX_SAMPLE",
    "sqnr_db",
    "overflow_frac",
    "underflow_frac",
    "amax",
    "pow2_scale",
    "candidate_scaling",
    "sample",
    "measure",
    "Pending",
    "prepare",
    "finish",
    "stats_from_sums",
    "evaluate",
]

# Float ladder measured by default, narrowest first.
DEFAULT_CANDIDATES: tuple[str, ...] = ("fp4_e2m1", "fp6_e3m2", "fp8_e5m2", "fp8_e4m3", "fp16", "bf16", "fp32")
# Fixed-point rungs the CPT / FracTrain / MuPPET policies use.
FIXED_POINT_CANDIDATES: tuple[str, ...] = ("int4", "int6", "int8", "int12", "int14", "int16")
MAX_SAMPLE = 4096
# Per (format) slot in the sums vector: squared error, overflow count, underflow count.
_PER_FORMAT = 3
# Leading slots: element count, nonzero count, signal power.
_HEAD = 3


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    return 10.0 * math.log10(signal / noise)


def sqnr_db(x: torch.Tensor, q: torch.Tensor) -> float:
    """10*log10(sum x^2 / sum (x-q)^2) in dB; ``inf`` when ``q`` equals ``x`` exactly."""
    with torch.no_grad():
        x64 = x.detach().to(torch.float64)
        sig = float(x64.square().sum())
        err = float((x64 - q.detach().to(torch.float64)).square().sum())
    return _db(sig, err)


def amax(x: torch.Tensor) -> float:
    """Largest finite magnitude in ``x`` (0 for an empty or all-nonfinite tensor)."""
    return float(_amax_t(x))


_AMAX_PIECE = 1 << 20  # elements per piece: the fp32 temporaries of a large activation stay at 4 MiB


def _amax_t(x: torch.Tensor) -> torch.Tensor:
    """Largest finite magnitude as a 0-dim fp32 tensor (no host sync); a large tensor a piece at a time, so a
    monitored step does not hold an fp32 copy of its widest activation (32 MiB for a bf16 FFN hidden state)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    flat = x.detach().reshape(-1)
    if flat.numel() <= _AMAX_PIECE:
        return _amax_piece(flat)
    return torch.stack([_amax_piece(p) for p in flat.split(_AMAX_PIECE)]).amax()


def _amax_piece(a: torch.Tensor) -> torch.Tensor:
    a = a.abs().to(torch.float32)  # a fresh tensor: safe to clean in place
    return torch.nan_to_num_(a, nan=0.0, posinf=0.0).amax()


def pow2_scale(amax_: torch.Tensor | float, fmt: str | Format) -> torch.Tensor:
    """The power-of-two scale 2^floor(log2(max_finite / amax)) that fits ``amax`` into ``fmt``.

    A power of two, so scaling itself adds no rounding error. 1 where amax is
    0 or not finite. Works elementwise (per-block amax).
    """
    return _pow2_fit(torch.as_tensor(amax_, dtype=torch.float64), get(fmt).max_finite).to(torch.float32)


def _pow2_fit(a: torch.Tensor, max_finite: float | torch.Tensor) -> torch.Tensor:
    """float64 2^floor(log2(max_finite / a)), clamped to 2^+-126; 1 where ``a`` is 0 or not finite."""
    ok = torch.isfinite(a) & (a > 0)
    e = torch.floor(torch.log2(max_finite / torch.where(ok, a, torch.ones_like(a)))).clamp(-126, 126)
    return torch.where(ok, torch.exp2(e), torch.ones_like(e))


def overflow_frac(x: torch.Tensor, fmt: str | Format, scale: float | torch.Tensor = 1.0) -> float:
    """Fraction of elements whose magnitude (times ``scale``) exceeds the format's largest finite value.

    These are the values a saturating cast clips (or an IEEE cast turns to inf).
    """
    f = get(fmt)
    if x.numel() == 0:
        return 0.0
    with torch.no_grad():
        y = x.detach().to(torch.float32) * scale
        return float((y.abs() > f.max_finite).sum()) / x.numel()


def underflow_frac(x: torch.Tensor, fmt: str | Format, scale: float | torch.Tensor = 1.0) -> float:
    """Fraction of the nonzero elements that round to zero in ``fmt`` (after ``scale``)."""
    with torch.no_grad():
        y = x.detach().to(torch.float32) * scale
        nz = y != 0
        n = int(nz.sum())
        if n == 0:
            return 0.0
        q = quantize(y, fmt, rounding="nearest", saturate=True)
        return float(((q == 0) & nz).sum()) / n


def candidate_scaling(fmt: str | Format, current_scaling: str = "none") -> str:
    """The scaling a tensor in ``fmt`` is measured (and should be run) with.

    16 bits and wider have the range to run unscaled; narrower formats and
    fixed point need a scale, so they keep the tensor's own scaling when it
    has one (``tensor``, ``delayed``, ``block``) and get ``tensor`` otherwise.
    """
    f = get(fmt)
    if f.kind == "float" and f.bits >= 16:
        return "none"
    return current_scaling if current_scaling in ("tensor", "delayed", "block", "row") else "tensor"


def sample(x: torch.Tensor, max_elems: int = MAX_SAMPLE) -> torch.Tensor:
    """At most ``max_elems`` elements of ``x`` picked by a fixed stride (deterministic, no RNG)."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if n <= max_elems:
        return flat
    stride = -(-n // max_elems)
    return flat[::stride]


def _sample_blocks(x: torch.Tensor, block_size: int, max_elems: int) -> torch.Tensor:
    """Whole blocks along the last dimension (zero padded), a strided subset of them."""
    last = x.shape[-1] if x.dim() else 1
    x2 = x.detach().reshape(-1, last)
    pad = (-last) % block_size
    if pad:
        x2 = F.pad(x2, (0, pad))
    blocks = x2.reshape(-1, block_size)
    max_blocks = max(1, max_elems // block_size)
    if blocks.shape[0] > max_blocks:
        blocks = blocks[:: -(-blocks.shape[0] // max_blocks)]
    return blocks


def _quantize_block(blocks: torch.Tensor, f: Format, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized blocks, overflow mask) under per-block power-of-two scales.

    Uses the MX quantizer of ``adaprec.formats.scaling`` when it exists (E8M0
    scale 2^(floor(log2 amax) - emax), values beyond the element range
    saturate); before it exists, a per-block 2^floor(log2(max/amax)) scale,
    which never overflows.
    """
    bamax = _amax_t_rows(blocks)
    try:
        from adaprec.formats.scaling import quantize_mx  # written beside formats; optional here
    except ImportError:
        quantize_mx = None
    if quantize_mx is not None and f.kind == "float":
        q = quantize_mx(blocks, f.name, block_size=block_size, rounding="nearest")
        safe = torch.where(bamax > 0, bamax, torch.ones_like(bamax))
        s = torch.exp2(torch.floor(torch.log2(safe)) - f.emax)
        over = (blocks.abs() / s) > f.max_finite
        return q, over
    s = pow2_scale(bamax, f)
    q = quantize(blocks * s, f, rounding="nearest", saturate=True) / s
    return q, torch.zeros_like(blocks, dtype=torch.bool)


def _amax_t_rows(blocks: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(blocks.abs(), nan=0.0, posinf=0.0).amax(dim=-1, keepdim=True)


@functools.lru_cache(maxsize=256)
def _rows_params(names: tuple[str, ...], scalings: tuple[str, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Largest finite value (float64) and whether the tensor scale applies, per format row."""
    maxf = torch.tensor([get(n).max_finite for n in names], dtype=torch.float64, device=device)
    scaled = torch.tensor([s in ("tensor", "delayed", "row") for s in scalings], device=device)
    return maxf, scaled


def _many_formats(
    xs: torch.Tensor, amax_: torch.Tensor, names: tuple[str, ...], scalings: tuple[str, ...]
) -> torch.Tensor:
    """``[rows, 3]``: squared error, overflow count, underflow count of casting sample row ``xs[r]`` to ``names[r]``.

    All rows in one batch of kernels (:func:`quantize_each`). Under
    ``tensor``/``delayed``/``row`` scaling the sample is first multiplied by
    the power-of-two scale that fits its whole tensor's amax (``amax_[r]``)
    into the format (row is at least as fine as tensor: a safe lower bound),
    and the error is measured back in the tensor's own units.
    """
    maxf, scaled = _rows_params(names, scalings, xs.device)
    a = amax_.to(torch.float64)
    ok = torch.isfinite(a) & (a > 0)
    s64 = torch.where(scaled, _pow2_fit(a, maxf), torch.ones_like(maxf))
    y = xs * s64.to(torch.float32).unsqueeze(1)
    over = (y.abs() > maxf.unsqueeze(1)).sum(1)
    q = quantize_each(y, names)
    # zeros of y are zeros of the sample (padding included): counted once per sample, not per row
    under = (q == 0).sum(1) - (y == 0).sum(1)
    # y - q is exact in float32; squaring it relative to the row's power-of-two amax keeps float32's
    # range (an error under 1e-19 of the amax squares to zero, far below any SQNR that matters)
    ya = torch.exp2(torch.floor(torch.log2(torch.where(ok, a * s64, torch.ones_like(a)))))
    d = (y - q) * (1.0 / ya).to(torch.float32).unsqueeze(1)
    err = (d * d).sum(1).to(torch.float64) * (ya / s64).square()
    return torch.stack([err, over.to(torch.float64), under.to(torch.float64)], dim=1)


def _is_block(name: str, scaling: str) -> bool:
    f = get(name)
    return scaling == "block" and not (f.kind == "float" and f.bits >= 16)


@dataclass
class Pending:
    """One tensor's sample, kept until the step's samples are measured together (:func:`finish`)."""

    xs: torch.Tensor  # finite float32 sample, a copy (the tensor itself may change in place)
    amax: torch.Tensor  # 0-dim, over the whole tensor
    formats: tuple[str, ...]
    scalings: tuple[str, ...]
    block_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # format index -> [err, over, under]


def prepare(
    x: torch.Tensor, recipe: TensorRecipe, formats: Sequence[str], max_elems: int = MAX_SAMPLE
) -> Pending:
    """Take what the statistics need from ``x`` now: its amax and a strided sample (a few kernels).

    Formats under MX block scaling are measured here on whole blocks, since
    a strided sample would cut the blocks apart.
    """
    with torch.no_grad():
        formats = tuple(formats)
        scalings = tuple(
            recipe.scaling if name == recipe.format else candidate_scaling(name, recipe.scaling)
            for name in formats
        )
        # a copy with nonfinite values zeroed (they are the guard's business, not a format's)
        xs = torch.nan_to_num(sample(x, max_elems).to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
        pending = Pending(xs, _amax_t(x), formats, scalings)
        blocky = [i for i, (n, sc) in enumerate(zip(formats, scalings, strict=True)) if _is_block(n, sc)]
        if blocky:
            blocks = _sample_blocks(x, recipe.block_size, max_elems).to(torch.float32)  # sample, then widen
            blocks = torch.where(torch.isfinite(blocks), blocks, torch.zeros_like(blocks))
            signal = xs.to(torch.float64).square().sum()
            ratio = xs.numel() / max(1, blocks.numel())
            b64 = blocks.to(torch.float64)
            bsig = b64.square().sum()
            for i in blocky:
                # block figures come from whole blocks; counts rescaled to the strided sample's size,
                # the error taken relative to the block signal and expressed on the sample's signal
                q, over = _quantize_block(blocks, get(formats[i]), recipe.block_size)
                berr = (b64 - q.to(torch.float64)).square().sum()
                err = torch.where(bsig > 0, berr / bsig * signal, berr)
                under = ((q == 0) & (blocks != 0)).sum().to(torch.float64) * ratio
                pending.block_rows[i] = torch.stack([err, over.sum().to(torch.float64) * ratio, under])
        return pending


@functools.lru_cache(maxsize=64)
def _layout(
    shape: tuple[tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]], ...],
) -> tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...], tuple[tuple[int, int], ...], tuple[int, ...]]:
    """Where each observation's numbers live once the step's samples are measured in one batch.

    ``shape`` holds per observation (formats, scalings, block format indices).
    Returns the observation of each batched row, its format and scaling, the
    (offset, length) of each observation's sums in the flat result, and the
    gather index that builds that flat result from ``[heads | batched rows | block rows |
    zeros]`` (formats that hold float32 exactly read the zeros instead of being measured).
    """
    row_obs: list[int] = []
    row_names: list[str] = []
    row_scalings: list[str] = []
    n_obs = len(shape)
    for i, (names, scalings, blocky) in enumerate(shape):
        for j, (n, sc) in enumerate(zip(names, scalings, strict=True)):
            if j not in blocky and not get(n).holds_float32:
                row_obs.append(i)
                row_names.append(n)
                row_scalings.append(sc)
    n_rows = len(row_obs)
    gather: list[int] = []
    spans: list[tuple[int, int]] = []
    row = 0
    block = 0
    n_blocks = sum(len(b) for _, _, b in shape)
    zeros = 3 * (n_obs + n_rows + n_blocks)
    for i, (names, _, blocky) in enumerate(shape):
        start = len(gather)
        gather += [3 * i, 3 * i + 1, 3 * i + 2]
        for j in range(len(names)):
            if j not in blocky and get(names[j]).holds_float32:
                base = zeros
            elif j in blocky:
                base = 3 * (n_obs + n_rows + block)
                block += 1
            else:
                base = 3 * (n_obs + row)
                row += 1
            gather += [base, base + 1, base + 2]
        spans.append((start, len(gather) - start))
    return tuple(row_obs), tuple(row_names), tuple(row_scalings), tuple(spans), tuple(gather)


def finish(pending: Sequence[Pending]) -> list[torch.Tensor]:
    """The raw sums of every observation, measured in one batch of kernels (no host sync).

    One observation's sums are ``[n, nonzero, signal, (err, overflow,
    underflow) per format]`` in float64; see :func:`measure`. Batching the
    whole step's samples is what keeps monitoring cheap: the cost is a few
    dozen kernels per sampled step, not a few dozen per tensor and format.
    """
    if not pending:
        return []
    with torch.no_grad():
        dev = pending[0].xs.device
        shape = tuple((p.formats, p.scalings, tuple(sorted(p.block_rows))) for p in pending)
        row_obs, names, scalings, spans, gather = _layout(shape)
        # zero padding adds nothing to any sum: zeros are not counted as nonzero, never overflow or underflow
        xs = torch.nn.utils.rnn.pad_sequence([p.xs for p in pending], batch_first=True)
        counts = torch.tensor([float(p.xs.numel()) for p in pending], dtype=torch.float64, device=dev)
        heads = torch.stack(
            [counts, (xs != 0).sum(1).to(torch.float64), xs.to(torch.float64).square().sum(1)], dim=1
        )
        parts = [heads.reshape(-1)]
        if names:
            obs = torch.tensor(row_obs, dtype=torch.int64, device=dev)
            amaxes = torch.stack([p.amax.to(torch.float32).reshape(()) for p in pending])
            parts.append(_many_formats(xs[obs], amaxes[obs], names, scalings).reshape(-1))
        parts += [p.block_rows[j] for p in pending for j in sorted(p.block_rows)]
        parts.append(torch.zeros(3, dtype=torch.float64, device=dev))
        flat = torch.cat(parts)[torch.tensor(gather, dtype=torch.int64, device=dev)]
        return [flat[off : off + n] for off, n in spans]


def measure(
    x: torch.Tensor,
    recipe: TensorRecipe,
    formats: Sequence[str],
    max_elems: int = MAX_SAMPLE,
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Raw sums for casting ``x`` to each of ``formats``; no host sync.

    Returns ``(amax, sums, scalings)``: ``amax`` a 0-dim tensor over the whole
    tensor (the value per-tensor scaling uses); ``sums`` a float64 vector
    ``[n, nonzero, signal, (err, overflow, underflow) per format]``;
    ``scalings[i]`` the scaling ``formats[i]`` was measured under (the
    recipe's own for its format, :func:`candidate_scaling` for the others).
    Sums from several tensors (or ranks) add up; :func:`stats_from_sums`
    turns them into :class:`TensorStats`. The monitor batches many tensors
    through :func:`prepare` and :func:`finish` instead.
    """
    p = prepare(x, recipe, formats, max_elems)
    return p.amax, finish([p])[0], p.scalings


def stats_from_sums(
    formats: Sequence[str],
    scalings: Sequence[str],
    current: str,
    amax_: float,
    sums: Sequence[float],
) -> TensorStats:
    """Turn the (possibly summed over tensors and ranks) raw sums into :class:`TensorStats`."""
    n, nonzero, signal = sums[0], sums[1], sums[2]
    sq, ov, un = {}, {}, {}
    for i, name in enumerate(formats):
        err, over, under = sums[_HEAD + _PER_FORMAT * i : _HEAD + _PER_FORMAT * (i + 1)]
        sq[name] = _db(signal, err)
        ov[name] = over / n if n else 0.0
        un[name] = under / nonzero if nonzero else 0.0
    return TensorStats(
        amax=float(amax_),
        sqnr_db=sq,
        overflow_frac=ov,
        underflow_frac=un,
        scaling=dict(zip(formats, scalings, strict=True)),
        current=current,
        numel=int(n),
    )


def formats_for(recipe: TensorRecipe, candidates: Sequence[str]) -> tuple[str, ...]:
    """The current format first, then the candidates (canonical names, no repeats)."""
    out = [recipe.format]
    for c in candidates:
        name = get(c).name
        if name not in out:
            out.append(name)
    return tuple(out)


def evaluate(
    x: torch.Tensor,
    recipe: TensorRecipe,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    max_elems: int = MAX_SAMPLE,
) -> TensorStats:
    """Measure ``x`` under its recipe and every candidate format (one host sync)."""
    formats = formats_for(recipe, candidates)
    a, sums, scalings = measure(x, recipe, formats, max_elems)
    vals = torch.cat([a.to(torch.float64).reshape(1), sums]).tolist()
    return stats_from_sums(formats, scalings, recipe.format, vals[0], vals[1:])
