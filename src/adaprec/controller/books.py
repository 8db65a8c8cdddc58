"""The books: one path for what a step cost, its measured wall time and the energy meter's window.

Every step is priced in the ledger before its ranks agree on it (the row
travels in the step's collective), and its wall time is filled in when the
step ends; on one process that is the same path with nothing to send.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from adaprec.energy import EnergyLedger, MeasurementWindow, detect_meter
from adaprec.energy.counting import StepCost
from adaprec.plan import PrecisionPlan

__all__ = ["Books"]


class Books:
    """The ledger of steps, the wall clock and the meter, kept together.

    ``sync_cuda``: wait for the GPU before reading the clock (its kernels run ahead of Python).
    """

    def __init__(self, energy: EnergyLedger, sync_cuda: bool) -> None:
        self.energy = energy
        self.meter, self.meter_reason = detect_meter()
        self._window = MeasurementWindow(self.meter) if self.meter is not None else None
        self._sync_cuda = sync_cuda
        self._t0: float | None = None
        self.inference_macs: dict[str, int] = {}  # MACs of evaluation passes, by executed format

    def start(self) -> bool:
        """The step's clock starts now, unless it runs already (a retried forward). True when it started."""
        if self._t0 is not None:
            return False
        self._t0 = time.perf_counter()
        return True

    def forward_done(self, step: int) -> None:
        """A training forward ran: the meter's window opens with the first step."""
        if self._window is not None and step == 0:
            self._window.start()

    def cancel(self) -> None:
        """The step was abandoned (or was an evaluation pass): its clock stops uncounted."""
        self._t0 = None

    def price(self, step: int, plan: PrecisionPlan, cost: StepCost) -> dict[str, Any]:
        """Record the step's cost now (the wall time follows in :meth:`close`); returns the ledger row."""
        return self.energy.record(step, plan, cost, measured_reason=self.meter_reason if self._window is None else None)

    def close(self, step: int) -> float | None:
        """The step ended: its wall time into its row, and the meter's window advanced. Returns the wall time."""
        wall = None
        if self._t0 is not None:
            if self._sync_cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - self._t0
            self._t0 = None
        self.energy.set_wall(step, wall)
        if self._window is not None:
            closed = self._window.step_done(step)
            if closed:
                self.energy.attribute_measured(closed, self.meter.name)
        return wall

    def flush(self) -> None:
        """Close a partial measurement window so the last steps get measured figures too."""
        if self._window is not None:
            closed = self._window.flush()
            if closed:
                self.energy.attribute_measured(closed, self.meter.name)

    def count_inference(self, cost: StepCost) -> None:
        for fmt, n in cost.macs_by_format().items():
            self.inference_macs[fmt] = self.inference_macs.get(fmt, 0) + n
