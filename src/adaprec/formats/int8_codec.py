"""int8 block / row codes packed and unpacked in C: one pass over memory each way, no fp32 temporaries.

Why: the eager pack of a saved activation in ``int8/block256`` makes several full-size passes (amax, divide,
round, clamp, cast), the unpack two more; on bench_memory's activation-heavy GPT with every saved tensor in
int8 (``storage="narrow"``), packing and unpacking took 700 of a 1,976 ms step (AMX Xeon, 2 threads), so the
narrow storage made the step slower than plain fp32. ``int8_codec.c`` does each direction in one pass, with
the eager rule's arithmetic (bit for bit the same codes, scales and values: tested against
:func:`adaprec.formats.storage.pack`), split between ``torch.get_num_threads()`` threads for large tensors.

Takes contiguous fp32 or bf16 CPU tensors in a signed int8 format with linear mapping and block or row
scales (:func:`applies`); a tensor with a non-finite value, and every other case, keeps the eager path.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from adaprec import ckernel
from adaprec.formats.storage import PackedTensor, StorageFormat, _scale_cap

__all__ = ["available", "applies", "encode", "decode"]

_SOURCE = Path(__file__).with_name("int8_codec.c")
_TINY = torch.finfo(torch.float32).tiny
_DTYPES = (torch.float32, torch.bfloat16)
_MIN_SHARE = 1 << 18  # elements a thread is given at least: below it a hand-off costs more than it saves
_lock = threading.Lock()


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
    with _lock:
        lib, why = _library()
    return lib is not None, why


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adaprec-int8")


def _takes(fmt: StorageFormat) -> bool:
    return fmt.base == "int8" and fmt.mapping == "linear" and fmt.granularity in ("block", "row")


def applies(x: torch.Tensor, fmt: StorageFormat) -> bool:
    """Whether :func:`encode` takes ``x`` in ``fmt`` (it may still decline a tensor with a non-finite value)."""
    return (_takes(fmt) and x.device.type == "cpu" and x.dtype in _DTYPES and x.numel() > 0 and x.dim() > 0
            and available()[0])


def _group(shape: torch.Size, fmt: StorageFormat) -> int:
    return int(shape[-1]) if fmt.granularity == "row" else int(fmt.block_size or 1)


def _run(call, groups: int, group: int) -> list:
    """``call(g0, g1)`` over the groups, in shares for the threads torch uses (the caller runs the first)."""
    workers = max(1, min(torch.get_num_threads(), groups * group // _MIN_SHARE))
    if workers == 1:
        return [call(0, groups)]
    cuts = [groups * k // workers for k in range(workers + 1)]
    futures = [_pool(workers).submit(call, cuts[k], cuts[k + 1]) for k in range(1, workers)]
    return [call(cuts[0], cuts[1])] + [f.result() for f in futures]


def encode(x: torch.Tensor, fmt: StorageFormat) -> PackedTensor | None:
    """``pack(x, fmt)`` in one pass, or None where a value is not finite (the eager path's general rule)."""
    lib = _library()[0]
    assert lib is not None and applies(x, fmt)
    src = x.detach().contiguous()
    n, group = src.numel(), _group(src.shape, fmt)
    groups = -(-n // group)
    codes = torch.empty(groups * group, dtype=torch.int8)
    scales = torch.empty(groups, dtype=torch.float32)
    cap = _scale_cap(float(fmt.max_code), False)
    bf16 = int(src.dtype == torch.bfloat16)
    results = _run(lambda g0, g1: lib.adaprec_int8_encode(
        src.data_ptr(), bf16, n, group, g0, g1, codes.data_ptr(), scales.data_ptr(), float(fmt.max_code), cap,
        _TINY), groups, group)
    if any(results):
        return None
    if fmt.granularity == "row":
        codes = codes.view(groups, group)
    return PackedTensor(fmt, codes, scales, x.shape, x.dtype)


def decode(p: PackedTensor) -> torch.Tensor:
    """``unpack(p)`` in one pass, for a packed tensor :func:`encode` could have made."""
    lib = _library()[0]
    assert lib is not None and p.scales is not None
    n = p.numel()
    group = _group(p.shape, p.fmt)
    out = torch.empty(p.shape, dtype=p.dtype)
    codes, scales = p.codes.contiguous(), p.scales.contiguous()
    _run(lambda g0, g1: lib.adaprec_int8_decode(
        codes.data_ptr(), scales.data_ptr(), n, group, g0, g1, out.data_ptr(), int(p.dtype == torch.bfloat16),
        int(p.fmt.nan_code)), scales.numel(), group)
    return out
