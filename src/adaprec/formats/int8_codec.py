"""int8 block / row codes packed and unpacked in C: one pass over memory each way, no fp32 temporaries.

Why: the eager pack of a saved activation in ``int8/block256`` makes several full-size passes (amax, divide,
round, clamp, cast), the unpack two more; on bench_memory's activation-heavy GPT with every saved tensor in
int8 (``storage="narrow"``), packing and unpacking took 700 of a 1,976 ms step (AMX Xeon, 2 threads), so the
narrow storage made the step slower than plain fp32. ``int8_codec.c`` does each direction in one pass, with
the eager rule's arithmetic (bit for bit the same codes, scales and values: tested against
:func:`adaprec.formats.storage.pack`), split between ``torch.get_num_threads()`` threads for large tensors.

Takes fp32 or bf16 CPU tensors (:func:`applies`); :mod:`adaprec.formats.storage` calls it for signed int8
codes with linear mapping and block or row scales. A tensor with a non-finite value, and every other case,
keeps the eager path. Knows nothing of storage formats (storage imports it, not the other way round).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from adaprec import ckernel

__all__ = ["available", "applies", "encode", "decode"]

_SOURCE = Path(__file__).with_name("int8_codec.c")
_TINY = torch.finfo(torch.float32).tiny
_DTYPES = (torch.float32, torch.bfloat16)
_MIN_SHARE = 1 << 18  # elements a thread is given at least: below it a hand-off costs more than it saves


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    lib, why = ckernel.load(_SOURCE, "the int8 codec kernel")
    if lib is None:
        return None, f"{why}: the eager pack is kept"
    i64, vp, f, i = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.adaprec_int8_encode.restype = i
    lib.adaprec_int8_encode.argtypes = [vp, i, i64, i64, i64, i64, vp, vp, f, f, f]
    lib.adaprec_int8_decode.restype = None
    lib.adaprec_int8_decode.argtypes = [vp, vp, i64, i64, i64, i64, vp, i, i]
    return lib, ""


def available() -> tuple[bool, str]:
    """Whether the kernel runs here, and why not (builds it on the first call: under a second)."""
    return ckernel.available(_library)


def applies(x: torch.Tensor) -> bool:
    """Whether the kernel takes ``x``: an fp32 or bf16 CPU tensor with at least one dimension and one value.
    Which formats it serves is :mod:`adaprec.formats.storage`'s call (signed int8, linear, block or row)."""
    return x.device.type == "cpu" and x.dtype in _DTYPES and x.numel() > 0 and x.dim() > 0 and available()[0]


def encode(x: torch.Tensor, group: int, max_code: float, cap: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Codes (``groups * group`` int8, the last group padded with zeros) and fp32 scales of ``x`` in groups of
    ``group`` consecutive elements; None where a value is not finite (the eager path's general rule)."""
    lib = _library()[0]
    assert lib is not None and applies(x)
    src = x.detach().contiguous()
    n = src.numel()
    groups = -(-n // group)
    codes = torch.empty(groups * group, dtype=torch.int8)
    scales = torch.empty(groups, dtype=torch.float32)
    bf16 = int(src.dtype == torch.bfloat16)
    results = ckernel.split(lambda g0, g1: lib.adaprec_int8_encode(
        src.data_ptr(), bf16, n, group, g0, g1, codes.data_ptr(), scales.data_ptr(), max_code, cap, _TINY),
        groups, n, _MIN_SHARE)
    return None if any(results) else (codes, scales)


def decode(codes: torch.Tensor, scales: torch.Tensor, shape: torch.Size, dtype: torch.dtype, group: int,
           nan_code: int) -> torch.Tensor:
    """The values of ``codes`` (groups of ``group``, one scale each) as a ``dtype`` tensor of ``shape``; NaN
    for the NaN code."""
    lib = _library()[0]
    assert lib is not None
    out = torch.empty(shape, dtype=dtype)
    codes, scales = codes.contiguous(), scales.contiguous()
    ckernel.split(lambda g0, g1: lib.adaprec_int8_decode(
        codes.data_ptr(), scales.data_ptr(), out.numel(), group, g0, g1, out.data_ptr(),
        int(dtype == torch.bfloat16), nan_code), scales.numel(), out.numel(), _MIN_SHARE)
    return out
