"""The step tally: every GEMM the engine runs, recorded with the format it executed in.

This is the engine's public seam for whoever needs to see what ran: the
controller pops one :class:`~adaprec.energy.counting.StepCost` per training
step, ``explain`` lists each recognised call through :attr:`StepTally.on_record`,
and graphs compiled by ``torch.compile`` record through the same
:meth:`StepTally.record` (:mod:`adaprec.engine.traced`). Nobody reaches into
the engine's private state to observe it.

A call's backward GEMMs are recorded when they run, not when the forward
pass could predict them: the engine asks for ``probes`` (operand position ->
the GEMM computing that operand's gradient) and records them from autograd;
without probes they wait in ``pending`` until :meth:`StepTally.commit_backward`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from adaprec.energy.counting import GemmCost, ModuleCost, StepCost
from adaprec.engine.execution import Exec, gemm_name
from adaprec.engine.ops import OpCall
from adaprec.plan import FP32, ModulePrecision

__all__ = ["StepTally", "call_cost", "Recorder"]

# (module, call, how it executed, the plan's precision for it or None) -> None
Recorder = Callable[[str, OpCall, Exec, ModulePrecision | None], None]


def _forward_and_backward(call: OpCall, ex: Exec) -> tuple[list[GemmCost], list[tuple[int, GemmCost]]]:
    """The call's forward GEMMs, and its backward ones as (operand position, GEMM)."""
    fwd_fmt, fwd_native = ex.formats["forward"]
    forward, backward = [], []
    for g in call.gemms:
        forward.append(GemmCost("forward", g.macs, g.a_role, g.b_role, g.label, fwd_fmt, fwd_native))
        for pos, (role, other, has) in enumerate(((g.a_role, g.b_role, g.grad_a), (g.b_role, g.a_role, g.grad_b))):
            if has:
                name = gemm_name(role)
                fmt, native = ex.formats[name]
                backward.append((pos, GemmCost(name, g.macs, "grad_output", other, g.label, fmt, native)))
    return forward, backward


def _add_traffic(mc: ModuleCost, call: OpCall, ex: Exec, mp: ModulePrecision | None) -> None:
    for role, n in call.elements.items():
        rec = mp.recipe(role) if mp is not None else FP32
        mc.add_traffic(role, n, ex.storage.get(role, "fp32"), rec.format, rec.scaling, rec.block_size)
    if call.trainable:
        gw = mp.grad_weight if mp is not None else FP32
        mc.add_traffic("grad_weight", call.trainable, "fp32", gw.format, gw.scaling, gw.block_size)
        opt = mp.optimizer_state if mp is not None else "fp32"
        mc.add_traffic("optimizer_state", call.trainable, "fp32", opt)


def call_cost(call: OpCall, ex: Exec, mp: ModulePrecision | None, kind: str, covered: bool = True,
              reason: str = "") -> ModuleCost:
    """What one call costs run as ``ex`` under ``mp``: its forward and backward GEMMs and its traffic (pure)."""
    mc = ModuleCost(kind, covered=covered, reason=reason)
    forward, backward = _forward_and_backward(call, ex)
    mc.gemms.extend(forward)
    mc.gemms.extend(g for _, g in backward)
    _add_traffic(mc, call, ex, mp)
    return mc


class StepTally:
    """The GEMMs and traffic of the step in progress, module by module.

    Args:
        site_of: module name -> its site (``kind``, ``covered``, ``reason``), or None.
    """

    def __init__(self, site_of: Callable[[str], Any]) -> None:
        self.site_of = site_of
        self.cost = StepCost()
        self.pending: list[tuple[str, GemmCost]] = []
        self.counting = True  # False: calls run but are left out of the step's cost
        self.on_record: list[Recorder] = []  # observers of every recorded call

    def entry(self, name: str) -> ModuleCost:
        """The step's cost entry of module ``name`` (made on first use)."""
        mc = self.cost.modules.get(name)
        if mc is None:
            site = self.site_of(name)
            mc = self.cost.modules[name] = ModuleCost(
                site.kind if site else "unknown", covered=site.covered if site else False,
                reason=site.reason if site else "",
            )
        return mc

    def record(self, name: str, call: OpCall, ex: Exec, mp: ModulePrecision | None,
               backward: dict[int, GemmCost] | bool = True) -> None:
        """Record a call's forward GEMMs and traffic now, and its backward GEMMs as ``backward`` says.

        ``backward``: a dict to fill (operand position -> GEMM; the engine records each when its probe
        fires), True (pending until :meth:`commit_backward`), or False (no backward will run).
        """
        mc = self.entry(name)
        forward, back = _forward_and_backward(call, ex)
        mc.gemms.extend(forward)
        for pos, cost in back:
            if isinstance(backward, dict):
                backward[pos] = cost
            elif backward:
                self.pending.append((name, cost))
        _add_traffic(mc, call, ex, mp)
        for hook in self.on_record:
            hook(name, call, ex, mp)

    def add(self, name: str, costs: list[GemmCost]) -> None:
        """GEMMs seen running (a backward probe fired): into the step's cost, unless not counting."""
        if self.counting:
            self.entry(name).gemms.extend(costs)

    def commit_backward(self) -> None:
        """The backward pass ran: the GEMMs waiting for it join the step's cost."""
        for name, g in self.pending:
            self.entry(name).gemms.append(g)
        self.pending.clear()

    def pop(self) -> StepCost:
        """Everything counted since the last pop; the tally starts again empty."""
        cost, self.cost = self.cost, StepCost()
        self.pending.clear()
        return cost

    @contextlib.contextmanager
    def apart(self) -> Iterator[StepCost]:
        """Count the calls inside on their own (evaluation passes): the step's tally is left as it was.

        Yields the cost the calls inside add up to, complete when the block exits.
        """
        saved = self.cost, self.pending
        self.cost, self.pending = StepCost(), []
        counted = self.cost
        try:
            yield counted
        finally:
            self.cost, self.pending = saved
