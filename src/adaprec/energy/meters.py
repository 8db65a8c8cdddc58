"""Energy meters: cumulative joules from the hardware counters a machine has.

One small interface, three readers: Intel RAPL through sysfs, NVIDIA GPUs
through NVML (``pip install nvidia-ml-py``), and Zeus when it is installed.
A machine without any gives ``None`` and the reason; a missing meter never
reads as 0 J.

Counters update coarsely (NVML every 20-100 ms, RAPL about every 1 ms but
noisy at short scales), so attribute energy over windows of at least about a
second with :class:`MeasurementWindow`, not per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Meter", "RaplMeter", "NvmlMeter", "ZeusMeter", "detect_meter", "MeasurementWindow"]


class Meter:
    """Cumulative energy since the meter's first reading, in joules."""

    name = "meter"

    def available(self) -> tuple[bool, str]:
        """(usable here?, why or why not)."""
        raise NotImplementedError

    def read_j(self) -> float:
        """Joules since the first call (the first call returns 0.0)."""
        raise NotImplementedError

    @property
    def domains(self) -> list[str]:
        """Names of what is summed (e.g. ``package-0``, ``dram``, ``gpu0``)."""
        return []


class RaplMeter(Meter):
    """Intel/AMD RAPL counters in ``/sys/class/powercap``.

    Sums the package zones (``intel-rapl:N``) and the DRAM sub-zones, which
    packages do not include; skips core/uncore sub-zones (inside a package)
    and ``psys`` (overlaps the packages). Counters wrap at
    ``max_energy_range_uj``; each read adds the wrapped difference.
    """

    name = "rapl"

    def __init__(self, root: str | Path = "/sys/class/powercap") -> None:
        self.root = Path(root)
        self._last: dict[Path, int] = {}
        self._total_uj = 0

    def _zones(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        zones = []
        for z in sorted(self.root.glob("intel-rapl:*")):
            parts = z.name.split(":")
            label = _read_text(z / "name")
            if len(parts) == 2 and label != "psys":
                zones.append(z)
            elif len(parts) == 3 and label == "dram":
                zones.append(z)
        return zones

    @property
    def domains(self) -> list[str]:
        return [_read_text(z / "name") or z.name for z in self._zones()]

    def available(self) -> tuple[bool, str]:
        if not self.root.is_dir():
            return False, f"no RAPL: {self.root} does not exist (not Linux, a VM, or no powercap driver)"
        zones = self._zones()
        if not zones:
            return False, f"no RAPL: no intel-rapl:* zones under {self.root}"
        try:
            for z in zones:
                int((z / "energy_uj").read_text())
        except PermissionError:
            return False, f"RAPL counters under {self.root} are readable by root only; run as root or chmod o+r energy_uj"
        except (OSError, ValueError) as e:
            return False, f"RAPL counter unreadable: {e}"
        return True, f"RAPL zones {', '.join(self.domains)}"

    def read_j(self) -> float:
        for z in self._zones():
            now = int((z / "energy_uj").read_text())
            last = self._last.get(z)
            if last is not None:
                if now >= last:
                    self._total_uj += now - last
                else:  # wrapped past max_energy_range_uj
                    self._total_uj += int((z / "max_energy_range_uj").read_text()) - last + now
            self._last[z] = now
        return self._total_uj * 1e-6


class NvmlMeter(Meter):
    """Total energy of NVIDIA GPUs since driver load, via NVML (mJ counter, Volta or newer)."""

    name = "nvml"

    def __init__(self, indices: list[int] | None = None) -> None:
        self.indices = indices
        self._handles: list[Any] | None = None
        self._base_mj: float | None = None
        self._nvml: Any = None

    def _init(self) -> list[Any]:
        if self._handles is None:
            import pynvml

            pynvml.nvmlInit()
            idx = self.indices if self.indices is not None else range(pynvml.nvmlDeviceGetCount())
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in idx]
            self._nvml = pynvml
        return self._handles

    @property
    def domains(self) -> list[str]:
        return [f"gpu{i}" for i in (self.indices or range(len(self._handles or [])))]

    def available(self) -> tuple[bool, str]:
        try:
            import pynvml  # noqa: F401
        except ImportError:
            return False, "NVML not importable; pip install nvidia-ml-py"
        try:
            handles = self._init()
            if not handles:
                return False, "NVML found no GPU"
            for h in handles:
                self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)
        except Exception as e:  # NVMLError subclasses: no driver, not supported, ...
            return False, f"NVML energy counter unavailable: {e}"
        return True, f"NVML total energy of {len(handles)} GPU(s)"

    def read_j(self) -> float:
        handles = self._init()
        mj = float(sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in handles))
        if self._base_mj is None:
            self._base_mj = mj
        return (mj - self._base_mj) * 1e-3


class ZeusMeter(Meter):
    """Zeus (``zeus.monitor.ZeusMonitor``) when installed; optional, not a dependency."""

    name = "zeus"
    _WINDOW = "adaprec"

    def __init__(self, **monitor_kwargs: Any) -> None:
        self.monitor_kwargs = monitor_kwargs
        self._monitor: Any = None
        self._total = 0.0

    def available(self) -> tuple[bool, str]:
        try:
            from zeus.monitor import ZeusMonitor  # noqa: F401
        except ImportError:
            return False, "zeus not installed (optional: pip install zeus)"
        try:
            self._start()
        except Exception as e:
            return False, f"zeus cannot measure here: {e}"
        return True, "zeus monitor"

    def _start(self) -> None:
        if self._monitor is None:
            from zeus.monitor import ZeusMonitor

            self._monitor = ZeusMonitor(**self.monitor_kwargs)
            self._monitor.begin_window(self._WINDOW)

    def read_j(self) -> float:
        if self._monitor is None:
            self._start()
            return 0.0
        m = self._monitor.end_window(self._WINDOW)
        self._total += float(m.total_energy)
        self._monitor.begin_window(self._WINDOW)
        return self._total


def detect_meter(candidates: list[Meter] | None = None) -> tuple[Meter | None, str]:
    """The first meter that works here (NVML, Zeus, RAPL), or None and every reason why not."""
    reasons = []
    for m in candidates if candidates is not None else [NvmlMeter(), ZeusMeter(), RaplMeter()]:
        ok, why = m.available()
        if ok:
            return m, why
        reasons.append(f"{m.name}: {why}")
    return None, "no energy meter on this machine (" + "; ".join(reasons) + ")"


class MeasurementWindow:
    """Turns a cumulative meter into per-step joules over windows of ``min_seconds`` or more.

    Call :meth:`step_done` after each step; when the window is long enough
    it reads the meter, shares the energy among the window's steps in
    proportion to their wall time, starts the next window, and returns
    ``[(step, joules), ...]`` (else ``None``). :meth:`flush` closes a partial
    window at the end.
    """

    def __init__(
        self, meter: Meter, min_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.meter = meter
        self.min_seconds = float(min_seconds)
        self.clock = clock
        self.total_j = 0.0
        self.windows = 0
        self._t0: float | None = None
        self._e0 = 0.0
        self._steps: list[tuple[int, float]] = []

    def start(self) -> None:
        """Begin a window now: call before the first measured step."""
        self._t0, self._e0 = self.clock(), self.meter.read_j()
        self._steps = []

    def step_done(self, step: int) -> list[tuple[int, float]] | None:
        """Mark ``step`` finished; returns the closed window's attribution, if one closed.

        Without a prior :meth:`start`, the first call only starts the window:
        that step began before the meter was read and stays unmeasured.
        """
        t0 = self._t0
        if t0 is None:
            self.start()
            return None
        self._steps.append((int(step), self.clock()))
        if self._steps[-1][1] - t0 >= self.min_seconds:
            return self._close()
        return None

    def flush(self) -> list[tuple[int, float]] | None:
        """Close the open window even if short (its figures are noisier)."""
        return self._close() if self._t0 is not None and self._steps else None

    def _close(self) -> list[tuple[int, float]]:
        e1 = self.meter.read_j()
        t_prev = self._t0 if self._t0 is not None else self._steps[0][1]
        energy = e1 - self._e0
        span = self._steps[-1][1] - t_prev
        out = []
        for step, t in self._steps:
            share = (t - t_prev) / span if span > 0 else 1.0 / len(self._steps)
            out.append((step, energy * share))
            t_prev = t
        self.total_j += energy
        self.windows += 1
        self._t0, self._e0, self._steps = self._steps[-1][1], e1, []
        return out

    def state_dict(self) -> dict[str, Any]:
        """Totals only: counter baselines belong to this process and restart on resume."""
        return {"min_seconds": self.min_seconds, "total_j": self.total_j, "windows": self.windows}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.min_seconds = float(d["min_seconds"])
        self.total_j = float(d["total_j"])
        self.windows = int(d["windows"])
        self._t0, self._steps = None, []


def _read_text(p: Path) -> str:
    try:
        return p.read_text().strip()
    except OSError:
        return ""
