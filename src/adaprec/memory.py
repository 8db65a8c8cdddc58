"""Peak memory of a stretch of training, measured, with the method named.

>>> peak = PeakMemory()            # CUDA if the model is there, else this process
>>> peak.reset()                   # after warm-up: the steady state starts here
>>> for batch in batches: train_step(batch)
>>> print(peak.read())             # "1,234.5 MiB (process VmHWM since reset)"

Why a class of its own: the figure depends on how it was taken, and a
reader must see which. On CUDA it is ``torch.cuda.max_memory_allocated``
(tensors only, reset by ``reset_peak_memory_stats``). On Linux it is the
process high-water mark ``VmHWM``, reset by writing ``5`` to
``/proc/self/clear_refs`` (everything the process touched: tensors, the
allocator's cache, Python, libraries). Where the high-water mark cannot be
reset, ``ru_maxrss`` (the peak since the process started) is labelled so;
where nothing can be read, the reading says n/a with the reason. Measuring
never raises: no run fails because memory cannot be measured.
"""

from __future__ import annotations

import gc
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adaprec.engine.allocator import trim_heap

__all__ = ["MemoryReading", "PeakMemory", "live_tensor_peak", "release_free_memory"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MIB = 2**20


@dataclass(frozen=True)
class MemoryReading:
    """One peak: ``peak_bytes`` (None when not measurable), how it was taken, and why not when not."""

    peak_bytes: int | None
    method: str
    reason: str = ""

    @property
    def measured(self) -> bool:
        return self.peak_bytes is not None

    @property
    def mib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / _MIB

    def __str__(self) -> str:
        if self.peak_bytes is None:
            return f"n/a ({self.reason})"
        return f"{self.peak_bytes / _MIB:,.1f} MiB ({self.method})"

    def to_dict(self) -> dict[str, object]:
        return {"peak_bytes": self.peak_bytes, "method": self.method, "reason": self.reason}


def release_free_memory() -> bool:
    """Return the heap that freed objects left behind to the OS (``gc`` then glibc's ``malloc_trim``).

    Why: runs that share a process (the runner's policies and seeds) would otherwise each read a peak that
    includes the heap an earlier run freed but glibc kept. True where the trim ran (Linux with glibc).
    """
    gc.collect()
    return trim_heap()


def _vm_hwm_bytes() -> int | None:
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


class PeakMemory:
    """Measures the peak memory between :meth:`reset` and :meth:`read` on ``device``.

    ``device``: a CUDA device measures that device's allocated tensors; anything
    else (the default, CPU) measures this process's resident memory.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._resettable: bool | None = None

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "cuda max_memory_allocated"
        if self._resettable is None:
            return "process VmHWM since start (not reset)"
        if self._resettable is False:
            return "process ru_maxrss since start (VmHWM not resettable here)"
        return "process VmHWM since reset"

    def reset(self) -> None:
        """Start a new peak here (after warm-up, to read the steady state)."""
        if self.device.type == "cuda":
            if torch.cuda.is_available():
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            _CLEAR_REFS.write_text("5")
            self._resettable = _vm_hwm_bytes() is not None
        except OSError:
            self._resettable = False

    def read(self) -> MemoryReading:
        """The peak since the last :meth:`reset` (since the start where no reset is possible)."""
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                return MemoryReading(None, self.method, "CUDA is not available in this process")
            torch.cuda.synchronize(self.device)
            return MemoryReading(int(torch.cuda.max_memory_allocated(self.device)), self.method)
        if self._resettable is not False:
            hwm = _vm_hwm_bytes()
            if hwm is not None:
                return MemoryReading(hwm, self.method)
        if not sys.platform.startswith(("linux", "darwin")):
            return MemoryReading(None, "none", f"no peak-memory counter on {sys.platform}")
        import resource  # POSIX only

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":  # bytes there, kilobytes on Linux
            return MemoryReading(peak, "process ru_maxrss since start (no VmHWM on this OS)")
        return MemoryReading(peak * 1024, "process ru_maxrss since start (VmHWM not resettable here)")


def live_tensor_peak(step: Callable[[], object]) -> MemoryReading:
    """Peak of live tensor bytes while ``step()`` runs, above what was live when it started (CPU or CUDA).

    Counted from the allocator's events (``torch.profiler`` with ``profile_memory=True``): tensors only,
    whatever the allocator keeps or the OS maps. What the step needs, as ``max_memory_allocated`` says on
    CUDA; beside :class:`PeakMemory`'s process figure, which also counts the allocator's cache and
    libraries. Slower while it runs (the profiler): measure one steady step, not all of them.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    try:
        with profile(activities=activities, profile_memory=True) as prof:
            step()
        events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except (RuntimeError, AttributeError) as e:  # a torch whose profiler cannot count allocations
        return MemoryReading(None, "live tensors (allocator events)", f"not measurable: {e}")
    cur = peak = 0
    for _, n in mem:
        cur += n
        peak = max(peak, cur)
    return MemoryReading(peak, "live tensors during the step (allocator events, torch.profiler)")
