"""Operand casts for native GEMMs: int8 codes with power-of-two scales, and 16-bit copies.

The gain of an int8 or bf16 GEMM lives or dies in these passes, so each
operand is cast once, in as few passes over memory as eager PyTorch allows
(amax by two allocation-free reductions, then scale, round, clamp in place
on a reused scratch buffer, then one narrowing copy), and reused: a weight's
copy is cached until the optimizer changes it (its ``_version``), and the
forward's copies of the activation are what the backward GEMMs read.

Scales are powers of two (as everywhere in adaprec), so scaling adds no
rounding error and an int8 code times its scale is exactly representable in
bf16: a GEMM that mixes an int8 operand with a bf16 one dequantizes into
bf16 without error. Stochastic rounding adds uniform noise from a seeded
table (:class:`NoiseTable`) at an offset drawn per call: one extra pass,
reproducible bit for bit, unbiased in expectation over offsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from adaprec.energy.traffic import uncounted

__all__ = ["Int8Operand", "quantize_int8", "NoiseTable", "Scratch", "pow2_int8_scale", "INT8_QMAX"]

INT8_QMAX = 127.0
_M127 = 127.0 / 128.0  # 127 = (127/128) * 2^7


def _pow2_scale_float(amax: float) -> float:
    """Largest power of two s with amax * s <= 127 (1 for 0 or non-finite)."""
    if not (amax > 0.0) or not math.isfinite(amax):
        return 1.0
    m, e = math.frexp(amax)
    k = 7 - e - (1 if m > _M127 else 0)
    return math.ldexp(1.0, max(-126, min(126, k)))


def pow2_int8_scale(amax: torch.Tensor) -> torch.Tensor:
    """Elementwise: the largest power of two s with amax * s <= 127 (1 where amax is 0 or not finite)."""
    ok = torch.isfinite(amax) & (amax > 0)
    m, e = torch.frexp(torch.where(ok, amax, torch.ones_like(amax)))
    k = (7 - e - (m > _M127).to(e.dtype)).clamp(-126, 126)
    return torch.where(ok, torch.ldexp(torch.ones_like(amax), k), torch.ones_like(amax))


class Scratch:
    """One reusable buffer per device and dtype: temporaries (cast scratch, int32 GEMM results) never hit the allocator.

    Fresh multi-megabyte allocations on CPU are returned to the OS and page-faulted back
    on every step; that cost more than the int8 GEMM itself in measurements.
    """

    def __init__(self) -> None:
        self._buf: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, shape: torch.Size | tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        key = (device, dtype)
        buf = self._buf.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buf[key] = torch.empty(max(n, 1 << 16), dtype=dtype, device=device)
        return buf[:n].view(shape)

    def clear(self) -> None:
        self._buf.clear()

    def nbytes(self) -> int:
        """The bytes the buffers hold (they grow to the largest temporary asked for, and stay)."""
        return sum(b.untyped_storage().nbytes() for b in self._buf.values())


class NoiseTable:
    """Uniform [0, 1) noise for stochastic rounding: a seeded table read at a per-call offset.

    The table is built in fixed chunks, each from its own seeded generator,
    so growing it never changes what was already there: a run and its resume
    read the same noise for the same (seed, offset). It holds at most
    ``SPAN + MAX_OFFSET`` values (8 MiB): a tensor longer than ``SPAN`` reads
    it span by span, span ``j`` from offset ``offset + j * STRIDE``. Before,
    it grew to the largest tensor rounded (36 MiB for the bench GPT's 8 Mi
    element gradients) and stayed; every element still draws a uniform value
    at a per-step offset, so the rounding stays unbiased.
    """

    CHUNK = 1 << 20
    MAX_OFFSET = 1 << 20
    SPAN = 1 << 20
    STRIDE = 524_287  # 2^19 - 1: successive spans of one tensor start at unrelated offsets

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _chunk(self, i: int, device: torch.device) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + i) & 0x7FFFFFFFFFFFFFFF)
        return torch.rand(self.CHUNK, generator=g).to(device)

    def nbytes(self) -> int:
        """The bytes the tables hold (at most ``SPAN + MAX_OFFSET`` values per device)."""
        return sum(t.untyped_storage().nbytes() for t in self._tables.values())

    def _table(self, n: int, device: torch.device) -> torch.Tensor:
        need = min(n, self.SPAN) + self.MAX_OFFSET
        t = self._tables.get(device)
        if t is None or t.numel() < need:
            have = 0 if t is None else t.numel() // self.CHUNK
            chunks = [t] if t is not None else []
            with uncounted():  # built once, by whichever step first needs it: no step's traffic
                chunks += [self._chunk(i, device) for i in range(have, -(-need // self.CHUNK))]
                t = self._tables[device] = torch.cat(chunks)
        return t

    def get(self, n: int, offset: int | torch.Tensor, device: torch.device) -> torch.Tensor:
        """``n`` values from ``offset`` (an int, or a 0-d integer tensor as a compiled graph passes it): a view
        of the table up to ``SPAN`` values from an int offset, else a gather (which a compiled graph fuses)."""
        t = self._table(n, device)
        if isinstance(offset, torch.Tensor) or n > self.SPAN:
            idx = torch.arange(n, device=device)
            off = offset.to(device) if isinstance(offset, torch.Tensor) else offset
            return t[idx % self.SPAN + (off + (idx // self.SPAN) * self.STRIDE) % self.MAX_OFFSET]
        off = offset % self.MAX_OFFSET
        return t[off:off + n]

    def add_(self, y: torch.Tensor, offset: int) -> torch.Tensor:
        """``y += get(y.numel(), offset)`` in place, span by span: no temporary the size of ``y``."""
        n = y.numel()
        if n <= self.SPAN:
            return y.add_(self.get(n, offset, y.device).view(y.shape))
        t, flat = self._table(n, y.device), y.view(-1)
        for j, i in enumerate(range(0, n, self.SPAN)):
            k = min(self.SPAN, n - i)
            off = (offset + j * self.STRIDE) % self.MAX_OFFSET
            flat[i:i + k].add_(t[off:off + k])
        return y


@dataclass
class Int8Operand:
    """int8 codes and the factor that turns them back into values (codes * inv_scale).

    ``inv_scale`` is a Python float (per tensor) or a float32 tensor that
    broadcasts against the codes (per row or per column).
    """

    codes: torch.Tensor
    inv_scale: Any
    amax: float | torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if isinstance(self.inv_scale, float):
            return self.codes.to(dtype).mul_(self.inv_scale)
        return self.codes.to(dtype).mul_(self.inv_scale.to(dtype))


def _amax_of(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    if dim is None:
        return torch.maximum(x.amax(), x.amin().neg())
    return torch.maximum(x.amax(dim=dim, keepdim=True), x.amin(dim=dim, keepdim=True).neg())


def quantize_int8(
    x: torch.Tensor,
    dim: int | None,
    stochastic: bool,
    scratch: Scratch,
    noise: NoiseTable | None = None,
    offset: int = 0,
) -> Int8Operand:
    """int8 codes of a 2-D ``x`` with a power-of-two scale per tensor (``dim=None``) or per slice.

    ``dim``: the dimension reduced for the amax, i.e. the GEMM's contraction
    dimension (1: a scale per row, 0: a scale per column). Rounding is to
    nearest even, or stochastic with noise from ``noise`` at ``offset``.
    Non-finite values are not hidden: the amax says so (the engine reports it).
    """
    amax_t = _amax_of(x, dim)
    if torch.compiler.is_compiling():  # traced: functional ops the compiler fuses into one pass, no host sync
        st = pow2_int8_scale(amax_t.float())
        y = torch.mul(x, st)
        if stochastic:
            assert noise is not None
            y = (y + noise.get(y.numel(), offset, y.device).view(y.shape)).floor()
        else:
            y = y.round()
        return Int8Operand(y.clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8), 1.0 / st, amax_t)
    on_cpu = x.device.type == "cpu"
    if dim is None and on_cpu:
        amax = float(amax_t)
        s: Any = _pow2_scale_float(amax)
        inv: Any = 1.0 / s
    else:
        amax = amax_t
        st = pow2_int8_scale(amax_t.float())
        s, inv = st, 1.0 / st
    y = scratch.get(x.shape, x.device)
    torch.mul(x, s, out=y)
    if stochastic:
        assert noise is not None
        noise.add_(y, offset).floor_()
    else:
        y.round_()
    y.clamp_(-INT8_QMAX, INT8_QMAX)
    return Int8Operand(y.to(torch.int8), inv, amax)
