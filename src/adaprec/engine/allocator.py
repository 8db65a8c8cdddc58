"""glibc's mmap threshold, set once per process: for speed (large tensors reused in place) or memory.

glibc serves allocations above its mmap threshold (128 KiB, adjusted upward
as blocks are freed) with fresh ``mmap`` pages and returns them to the OS on
free, so a training step that allocates the same multi-megabyte tensors
every step page-faults them in again every step. Measured on this project's
CPU: an int8 Linear (2048x384x1536) forward+backward took 23.4 ms with glibc's
defaults and 15.3 ms with the threshold raised; an fp32 Linear was unchanged
(38 ms): narrow GEMMs are fast enough for the page faults to dominate. This
is what PyTorch's CPU performance guide gets from jemalloc or tcmalloc.

The change is process-wide (it helps plain PyTorch too) and costs resident
memory: freed blocks stay in the process for reuse. The ``memory`` setting
does the opposite: every tensor of 1 MiB or more gets pages of its own and
gives them back when freed, so the resident set follows the live tensors
(measured on the activation-heavy bench GPT with saved tensors in 8 bits:
RSS peak 1.13x plain fp32 under glibc's defaults, 0.66x with a fixed 1 MiB
threshold, while its live tensors were 0.43x): what narrow storage saves
reaches the OS instead of staying in the heap.

Between the two, ``balanced`` (for a CPU tuned for speed whose plan then
keeps something narrow): tensors of 4 MiB or more on pages of their own, the
smaller ones reused from the heap, which is trimmed above 64 MiB free.
Measured on a Zen 4 CPU with fast int8 GEMMs (bench_memory's
activation-heavy GPT, bf16 and int8 saved tensors, adaprec default): RSS
peak 1,338 MiB under ``speed`` (1.16x plain fp32's 1,152), 895 MiB
``balanced``, 858 MiB ``memory``; encoder LM step 108-120 ms ``speed``,
125 ms ``balanced``, 176 ms ``memory`` (plain fp32 151-171 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune_cpu_allocator", "allocator_tuned", "allocator_mode", "libc", "trim_heap"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling on 64-bit
_state: dict[str, object] = {"tuned": False, "mode": None, "why": "not asked"}


_MODES = {
    # large tensors served from the heap and kept there when freed (no page faults per step)
    "speed": (_MAX_MMAP_THRESHOLD, 1 << 30, "glibc mmap threshold 32 MiB, trim threshold 1 GiB"),
    # tensors of 4 MiB or more on pages of their own, smaller ones reused from the heap
    "balanced": (4 << 20, 64 << 20, "glibc mmap threshold 4 MiB, trim threshold 64 MiB"),
    # tensors of 1 MiB or more on pages of their own, returned when freed (resident set ~ live tensors)
    "memory": (1 << 20, 16 << 20, "glibc mmap threshold 1 MiB, trim threshold 16 MiB"),
}


def libc() -> ctypes.CDLL:
    """The C library (glibc's mallopt and malloc_trim live there); OSError where it cannot be loaded."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def tune_cpu_allocator(mode: str = "speed") -> tuple[bool, str]:
    """Set glibc's mmap and trim thresholds for ``mode`` (``"speed"``, ``"balanced"`` or ``"memory"``).

    Once per process, except towards a mode that keeps less (speed -> balanced -> memory: a plan that
    starts keeping data narrow gives its saving back to the OS); any other later call changes nothing.
    Returns (done, what happened).
    """
    if mode not in _MODES:
        raise ValueError(f"allocator mode {mode!r}: use one of {', '.join(_MODES)}")
    order = list(_MODES)
    if _state["tuned"] and order.index(mode) <= order.index(str(_state["mode"])):
        return True, str(_state["why"])
    if not sys.platform.startswith("linux"):
        _state["why"] = f"not tuned: {sys.platform} has no glibc mallopt"
        return False, str(_state["why"])
    mmap_threshold, trim_threshold, what = _MODES[mode]
    try:
        c = libc()
        ok = c.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok = ok and c.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    except (OSError, AttributeError) as e:
        _state["why"] = f"not tuned: mallopt unavailable ({e})"
        return False, str(_state["why"])
    _state["tuned"] = ok
    _state["mode"] = mode if ok else None
    if ok and mode != "speed":
        # what earlier steps freed under the old threshold stays in the heap, held between live small blocks
        # (measured on the bench GPT: 475 MiB of a 844 MiB resting RSS), until trimmed once
        trim_heap()
    _state["why"] = f"{what} (for {mode}; adaprec.engine.tune_cpu_allocator)" if ok else "not tuned: mallopt refused the values"
    return ok, str(_state["why"])


def trim_heap() -> bool:
    """glibc's ``malloc_trim(0)``: hand the heap's free pages back to the OS. False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim with
        return False
    return True


def allocator_tuned() -> bool:
    return bool(_state["tuned"])


def allocator_mode() -> str | None:
    """The mode in force (``None``: glibc's defaults)."""
    return _state["mode"] if _state["tuned"] else None
