"""One interface for what every rank must agree on before a decision: a local and a multi-rank implementation.

The controller asks its reducer the same three things whether it runs on
one process or under ``torch.distributed``: the device report policies
choose from, the step's health (flags, loss, faults, the modules to blame,
and on sampled steps the monitor's statistics and the shadow audit), and
where the step's ledger row and wall time go. :class:`LocalReducer` answers
from this process; :class:`RankReducer` runs the step's one collective
(:class:`adaprec.distributed.RankSync`), so every rank decides the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from adaprec.controller.gradients import GradientCheck, LocalView, StepHealth
from adaprec.controller.shadow import ShadowAudit
from adaprec.distributed import DistributedError, Packer, RankSync, World, is_sharded, world
from adaprec.energy import EnergyLedger
from adaprec.hardware import DeviceReport
from adaprec.monitor import HealthMonitor
from adaprec.plan import PrecisionPlan

__all__ = ["Reducer", "LocalReducer", "RankReducer", "make_reducer"]


class Reducer(Protocol):
    """What every rank must agree on before a decision, and where the step's figures go."""

    world_size: int
    rank: int

    def share_report(self, probe: Callable[[], DeviceReport | None]) -> DeviceReport | None: ...

    def reduce(self, step: int, plan: PrecisionPlan, view: LocalView, row: Mapping[str, Any],
               sites: Mapping[str, Any], ledger: EnergyLedger, shadow: Mapping[str, torch.Tensor]) -> StepHealth: ...

    def step_timed(self, step: int, wall: float | None) -> None: ...


class LocalReducer:
    """This process alone: every figure is its own."""

    world_size = 1
    rank = 0

    def __init__(self, monitor: HealthMonitor, check: GradientCheck, shadow: ShadowAudit) -> None:
        self.monitor, self.check, self.shadow = monitor, check, shadow

    def share_report(self, probe: Callable[[], DeviceReport | None]) -> DeviceReport | None:
        """The device report every rank's policy chooses formats from."""
        return probe()

    def reduce(self, step: int, plan: PrecisionPlan, view: LocalView, row: Mapping[str, Any],
               sites: Mapping[str, Any], ledger: EnergyLedger, shadow: Mapping[str, torch.Tensor]) -> StepHealth:
        """The step's health as every rank sees it; statistics of a sampled step (and the shadow audit's
        sums, when one ran) go to the monitor."""
        health = StepHealth(view.bad, view.loss, view.cast_faults, self.check.blame(view) if view.bad else ())
        if view.sampled and not view.bad:
            for m, g in self.check.weight_grads():
                self.monitor.observe_grads(m, g)
        self._finish_shadow(step, {m: s.tolist() for m, s in shadow.items()})
        return health

    def step_timed(self, step: int, wall: float | None) -> None:
        """The step's wall time is known (a multi-rank reducer sends it with the next exchange)."""

    def _finish_shadow(self, step: int, sums: Mapping[str, Any]) -> None:
        if sums:
            self.monitor.observe_shadow(self.shadow.record(step, sums))



class RankReducer(LocalReducer):
    """Every rank's figures, reduced in one collective per step (two on a step with inf/NaN somewhere)."""

    def __init__(self, monitor: HealthMonitor, check: GradientCheck, shadow: ShadowAudit, world: World,
                 sharded: bool) -> None:
        super().__init__(monitor, check, shadow)
        self.sync = RankSync(world)
        self.world_size, self.rank = world.size, world.rank
        self.sharded = sharded
        self._prev_wall: float | None = None  # the last step's wall time, sent with the next exchange

    def share_report(self, probe: Callable[[], DeviceReport | None]) -> DeviceReport | None:
        # rank 0 probes (timings of ranks sharing a machine would differ) and tells the others
        mine = probe() if self.rank == 0 else None
        shared = self.sync.ex.broadcast_object(None if mine is None else mine.to_dict())
        return None if shared is None else DeviceReport.from_dict(shared)

    def reduce(self, step: int, plan: PrecisionPlan, view: LocalView, row: Mapping[str, Any],
               sites: Mapping[str, Any], ledger: EnergyLedger, shadow: Mapping[str, torch.Tensor]) -> StepHealth:
        packer = self._pack(shadow) if view.sampled else None
        red = self.sync.exchange(
            step, sites=sites, plan=plan, sampled=view.sampled, loss=view.loss, nonfinite=view.nonfinite,
            faults=len(view.cast_faults), energy=EnergyLedger.world_vector(row), prev_wall=self._prev_wall,
            payload=packer,
        )
        ledger.set_world(step, red.energy)
        if self._prev_wall is not None:
            ledger.set_world_wall(step - 1, red.prev_wall)
        self._prev_wall = None
        bad = red.nonfinite or not math.isfinite(red.loss) or red.faults > 0
        if packer is not None:
            self.monitor.unpack(red.payload, grads_ok=not bad)
            self._finish_shadow(step, {m: red.payload[f"s|{m}"] for m in shadow})
        if not bad:
            return StepHealth(False, red.loss)
        return self._blame_all(view, red.nonfinite, red.loss, sites)

    def _pack(self, shadow: Mapping[str, torch.Tensor]) -> Packer:
        packer = Packer()
        for m, g in self.check.weight_grads():
            self.monitor.stage_grads(m, g, sharded=is_sharded(g))
        self.monitor.pack(packer)
        for m in sorted(shadow):
            packer.add(f"s|{m}", shadow[m], "sum" if self.sharded else "max")
        return packer

    def _blame_all(self, view: LocalView, nonfinite: bool, loss: float, sites: Mapping[str, Any]) -> StepHealth:
        """Every rank's modules to blame and cast faults (a second, small exchange), so every rank names the same."""
        mine = self.check.blame(LocalView(view.nonfinite, view.loss, (), view.named, view.sampled))
        items = self.sync.union([("grad", m, "") for m in mine] + [("cast", m, r) for m, r in view.cast_faults])
        faults = tuple(sorted((m, r) for kind, m, r in items if kind == "cast"))
        over = tuple(m for m, site in sites.items() if site.covered and ("grad", m, "") in items)
        return StepHealth(True, loss, faults, tuple(dict.fromkeys(over + tuple(m for m, _ in faults))))

    def step_timed(self, step: int, wall: float | None) -> None:
        self._prev_wall = wall


def make_reducer(distributed: bool | None, model: nn.Module, sharded: bool, monitor: HealthMonitor,
                 check: GradientCheck, shadow: ShadowAudit) -> LocalReducer:
    """The rank reducer under a process group of 2+ ranks (unless ``distributed=False``), else the local one."""
    device = next((p.device for p in model.parameters()), None)
    w = world(device=device) if distributed is not False else None
    if distributed is True and (w is None or w.size < 2):
        raise DistributedError(
            "distributed=True needs an initialised torch.distributed process group of 2 or more ranks: "
            "launch with torchrun (or adaprec run --nproc N) and call torch.distributed.init_process_group() "
            "before building AdaptivePrecision"
        )
    if w is not None and w.size > 1:
        return RankReducer(monitor, check, shadow, w, sharded)
    return LocalReducer(monitor, check, shadow)
