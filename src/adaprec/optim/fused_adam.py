"""A fused Adam/AdamW step over 8-bit moments on CPU: one pass over memory instead of some thirty.

Why: adaprec's eager narrow update (unpack a chunk, run torch's update ops, pack it again) makes about
thirty tensor passes per chunk; measured on an AMX Xeon, 22 M parameters in 1-4 M-element tensors took
254 ms per step with int8 moments against 68 ms for torch's own AdamW on fp32 moments, so keeping the
moments in a quarter of the bytes cost step time. This module runs the same update block by block in C
(``fused_adam.c``): decode a block's codes, update the moments and the parameter in fp32, encode the block
again. It reads and writes 15 bytes per parameter where fp32 Adam moves 28.

The C file is built on first use with the system C compiler and cached (:mod:`adaprec.ckernel`). Where no
compiler works, :func:`available` says why and adaprec keeps the eager update.

Only the format pair adaprec's ``"int8"`` optimizer state uses (int8 block codes of sqrt(m), fp8 E4M3 block
codes of sqrt(v), fp32 scales) and fp32 parameters and gradients on CPU take this path
(:func:`applies`); every other case keeps the eager update. The result is not bit-identical to the eager
path (torch's vectorised kernels may fuse a multiply-add where C rounds twice); it is deterministic, so a
resumed run repeats an uninterrupted one bit for bit on the same path.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from adaprec import ckernel
from adaprec.formats.storage import PackedTensor, StorageFormat, _scale_cap

__all__ = ["available", "applies", "takes_formats", "covers", "AUTO_MIN_NUMEL", "adam_step_int8_", "to_e4m3", "MAX_BLOCK"]

MAX_BLOCK = 4096  # as in fused_adam.c: a block's moments live on the stack
_MIN_SHARE = 1 << 16  # elements: the least a thread is given
# the fewest elements for which the kernel beats torch's own per-tensor AdamW step (measured on an AMX Xeon, one
# step: 65 Ki elements 0.28 ms fused against 0.20 ms torch; 200 k 0.77 against 0.47; 1 Mi 1.6 against 4.3):
# below it the call's fixed cost (ctypes, the state's bookkeeping, a thread hand-off) outweighs the single pass
AUTO_MIN_NUMEL = 1 << 20
_SOURCE = Path(__file__).with_name("fused_adam.c")
_TINY = torch.finfo(torch.float32).tiny


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why not): built once per source, compiler and CPU (adaprec.ckernel)."""
    lib, why = ckernel.load(_SOURCE, "the fused 8-bit Adam kernel")
    if lib is None:
        return None, f"{why}: the eager update is kept"
    f, i64, vp = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p
    lib.adaprec_adam_int8_blocks.restype = ctypes.c_int
    lib.adaprec_adam_int8_blocks.argtypes = [vp] * 6 + [i64] * 4 + [f] * 8 + [ctypes.c_int] + [f] * 3
    lib.adaprec_to_e4m3.restype = None
    lib.adaprec_to_e4m3.argtypes = [vp, vp, i64]
    return lib, ""


def available() -> tuple[bool, str]:
    """Whether the fused kernel runs here, and why not (builds it on the first call: about a second)."""
    return ckernel.available(_library)


def _is(fmt: StorageFormat, base: str) -> bool:
    return fmt.base == base and fmt.granularity == "block" and fmt.mapping == "sqrt"


def takes_formats(first: StorageFormat, second: StorageFormat) -> bool:
    """Whether the kernel updates moments kept in this pair of formats."""
    return (_is(first, "int8") and _is(second, "fp8_e4m3") and first.block_size == second.block_size
            and (first.block_size or 0) <= MAX_BLOCK)


def applies(p: torch.Tensor, first: StorageFormat, second: StorageFormat) -> bool:
    """Whether this parameter's update can take the fused path (formats, dtype, layout and device)."""
    return (takes_formats(first, second) and p.device.type == "cpu" and p.dtype == torch.float32
            and p.grad is not None and p.grad.dtype == torch.float32 and not p.grad.is_sparse and available()[0])


def covers(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every narrowable parameter of ``optimizer`` would take the fused path: Adam or AdamW without
    AMSGrad, capturable or differentiable, over fp32 CPU parameters, and the kernel builds here. What
    ``storage="auto"`` asks before it keeps the moments narrow (in formats
    :func:`adaprec.optim.narrow_state.fused_takes` accepts). An optimizer built with ``fused=True`` is not
    covered: torch's own fused fp32 step is faster than this kernel (measured on an AMX Xeon: 53 ms
    against 85 ms for 67 M parameters), and a plan never makes a step slower."""
    if not isinstance(optimizer, torch.optim.Adam):
        return False
    for group in optimizer.param_groups:
        if any(group.get(k) for k in ("amsgrad", "capturable", "differentiable", "fused")):
            return False
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in group["params"]):
            return False
    return available()[0]


def adam_step_int8_(
    p: torch.Tensor, grad: torch.Tensor, m: PackedTensor, v: PackedTensor, *, step: float, lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool, maximize: bool,
) -> None:
    """One Adam/AdamW update of ``p`` in place, its moments' codes and scales updated in place.

    ``p`` and ``grad``: contiguous fp32 CPU tensors. ``step``: the step count after this update (1 on the
    first call), as in :func:`adaprec.optim.narrow_state.adam_update_`. The caller checks :func:`applies`.
    """
    lib, why = _library()
    if lib is None:
        raise RuntimeError(why)
    block = int(m.fmt.block_size or 0)
    n = p.numel()
    blocks = -(-n // block)
    assert p.is_contiguous() and grad.is_contiguous() and m.scales is not None and v.scales is not None
    assert m.codes.numel() >= n and v.codes.numel() >= n and grad.numel() == n
    decay = 1.0 - lr * weight_decay if (weight_decay != 0 and decoupled) else 1.0
    l2 = weight_decay if (weight_decay != 0 and not decoupled) else 0.0
    bc2_sqrt = (1 - beta2**step) ** 0.5
    step_size = lr / (1 - beta1**step)
    m_cap, v_cap = _scale_cap(float(m.fmt.max_code), True), _scale_cap(float(v.fmt.max_code), True)
    args = [p.data_ptr(), grad.data_ptr(), m.codes.data_ptr(), m.scales.data_ptr(), v.codes.data_ptr(),
            v.scales.data_ptr(), n, block]
    tail = [decay, l2, 1.0 - beta1, beta2, 1.0 - beta2, bc2_sqrt, eps, -step_size, int(maximize), m_cap, v_cap,
            _TINY]
    bad = max(ckernel.split(lambda a, b: lib.adaprec_adam_int8_blocks(*args, a, b, *tail), blocks, n, _MIN_SHARE))
    if bad:
        raise RuntimeError(f"the fused 8-bit Adam kernel refused block size {block} (at most {MAX_BLOCK})")


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """The kernel's fp32 -> fp8 E4M3 cast (for tests against torch's cast)."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(why)
    x = x.detach().float().contiguous()
    out = torch.empty(x.shape, dtype=torch.uint8)
    lib.adaprec_to_e4m3(x.data_ptr(), out.data_ptr(), x.numel())
    return out.view(torch.float8_e4m3fn)
