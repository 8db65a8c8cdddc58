"""Fit a device profile to a meter: GEMM and bandwidth sweeps, then least squares.

Each workload runs repeatedly for at least ``min_seconds`` (meters update
coarsely) between two meter readings. The measured joules of all workloads
are fitted as

    E = sum over formats  pJ_per_MAC[f] x MACs[f] + pJ_per_byte x bytes + idle_W x seconds

so static power is separated from the energy of work. The result can be
written as an ``energy_table`` profile (each MAC's energy stored as ``mult``
with ``add = 0``, since a meter cannot tell the two apart).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from adaprec.energy.meters import Meter
from adaprec.errors import AdaprecError
from adaprec.formats import get

__all__ = ["Workload", "Calibration", "CalibrationError", "gemm_workloads", "bandwidth_workloads", "calibrate"]


class CalibrationError(AdaprecError, RuntimeError):
    """Calibration cannot run or cannot be solved (no meter, too few workloads)."""


@dataclass(frozen=True)
class Workload:
    """One repeatable piece of work with known counts per run."""

    name: str
    fn: Callable[[], object]
    macs: dict[str, int] = field(default_factory=dict)  # format name -> MACs per run
    bytes: float = 0.0


@dataclass(frozen=True)
class Calibration:
    """Fitted coefficients and how well they fit."""

    pj_per_mac: dict[str, float]
    pj_per_byte: float
    idle_w: float
    residual_rel: float
    samples: int

    def to_toml(self, path: str | Path, name: str, device: str, meter: str) -> Path:
        """Write an ``energy_table`` profile that :func:`load_profile` accepts."""
        lines = [
            f'name = "{name}"',
            'kind = "energy_table"',
            f'description = "calibrated on {device} with meter {meter}"',
            f"uncertainty = {max(0.3, min(0.5, self.residual_rel * 3)):.3g}",
            f'sources = ["adaprec.energy.calibrate: {self.samples} workloads on {device}, meter {meter}; '
            f'MAC energy stored as mult (add = 0); idle power {self.idle_w:.4g} W excluded"]',
            "",
            "[ops]",
            *(f"{f} = {{ mult = {pj:.6g}, add = 0.0 }}" for f, pj in self.pj_per_mac.items()),
            "",
            "[memory]",
            'traffic_level = "measured"',
            "access_bits = 8",
            "",
            "[memory.levels]",
            f"measured = [{self.pj_per_byte:.6g}, {self.pj_per_byte:.6g}]",
            "",
        ]
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("\n".join(lines))
        tmp.replace(p)  # atomic: a reader never sees half a profile
        return p


def gemm_workloads(
    device: str | torch.device = "cpu", formats: Iterable[str] = ("fp32", "bf16"), sizes: Sequence[int] = (256, 512)
) -> list[Workload]:
    """Square matmuls in each format that has a torch dtype."""
    out = []
    for f in formats:
        dtype = get(f).torch_dtype
        if dtype is None or not dtype.is_floating_point or dtype.itemsize < 2:
            raise CalibrationError(f"format {f!r} has no torch dtype to run a matmul in; calibrate fp32/bf16/fp16")
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            out.append(Workload(f"mm_{f}_{n}", partial(torch.matmul, a, b), {get(f).name: n**3}, 3.0 * n * n * dtype.itemsize))
    return out


def bandwidth_workloads(device: str | torch.device = "cpu", sizes_mb: Sequence[int] = (16, 64)) -> list[Workload]:
    """Copies of large buffers: bytes moved, no MACs."""
    out = []
    for mb in sizes_mb:
        src = torch.empty(mb * 2**20 // 4, device=device)
        dst = torch.empty_like(src)
        out.append(Workload(f"copy_{mb}MB", partial(dst.copy_, src), {}, 2.0 * src.numel() * 4))
    return out


def calibrate(
    meter: Meter,
    device: str | torch.device = "cpu",
    formats: Iterable[str] = ("fp32", "bf16"),
    *,
    workloads: Sequence[Workload] | None = None,
    min_seconds: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sync: Callable[[], None] | None = None,
) -> Calibration:
    """Run the sweeps under ``meter`` and least-squares fit the coefficients."""
    ok, why = meter.available()
    if not ok:
        raise CalibrationError(f"cannot calibrate without a working meter: {why}")
    formats = [get(f).name for f in formats]
    if workloads is None:
        workloads = gemm_workloads(device, formats) + bandwidth_workloads(device)
    if sync is None and torch.device(device).type == "cuda":
        sync = torch.cuda.synchronize
    fmts = sorted({f for w in workloads for f in w.macs})
    unknowns = len(fmts) + 2
    if len(workloads) < unknowns:
        raise CalibrationError(f"{len(workloads)} workloads cannot determine {unknowns} coefficients; add workloads")
    rows, energy = [], []
    for w in workloads:
        t0, e0, reps = clock(), meter.read_j(), 0
        while True:
            w.fn()
            reps += 1
            if sync is not None:
                sync()
            if clock() - t0 >= min_seconds:
                break
        t1, e1 = clock(), meter.read_j()
        rows.append([w.macs.get(f, 0) * reps * 1e-12 for f in fmts] + [w.bytes * reps * 1e-12, t1 - t0])
        energy.append(e1 - e0)
    A = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(energy, dtype=torch.float64)
    scale = A.abs().amax(dim=0).clamp_min(1e-30)  # column scaling for conditioning
    sol = torch.linalg.lstsq(A / scale, y.unsqueeze(1), driver="gelsd").solution.squeeze(1) / scale
    resid = (A @ sol - y).norm() / y.norm().clamp_min(1e-30)
    coef = sol.tolist()
    return Calibration(
        pj_per_mac=dict(zip(fmts, coef[: len(fmts)], strict=True)),
        pj_per_byte=coef[len(fmts)],
        idle_w=coef[len(fmts) + 1],
        residual_rel=float(resid),
        samples=len(workloads),
    )
