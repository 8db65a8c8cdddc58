"""Count every GEMM and byte of a model's steps without changing its numerics.

The engine's op recognition with an all-fp32 plan: for users who want the
ledger's counting alone, and for tests that check it against
``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from adaprec.energy.counting import StepCost
from adaprec.engine.engine import PrecisionEngine

__all__ = ["MacCounter"]


class MacCounter:
    """Records, per module and per step, every GEMM the model runs (fp32, as it is).

    Usage::

        with MacCounter(model) as counter:
            loss = model(x).sum(); loss.backward()
        cost = counter.pop_step_cost()   # StepCost; the tally restarts

    Backward GEMMs are recorded at forward time for the operands that need a
    gradient and join the tally at :meth:`pop_step_cost` (or
    :meth:`commit_backward`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.engine = PrecisionEngine(model, backend="emulate")
        self._ctx: Any = None

    def attach(self) -> MacCounter:
        if self._ctx is None:
            self._ctx = self.engine.activate()
            self._ctx.__enter__()
        return self

    def detach(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def close(self) -> None:
        self.detach()
        self.engine.remove()

    def __enter__(self) -> MacCounter:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def commit_backward(self) -> None:
        self.engine.commit_backward()

    def pop_step_cost(self) -> StepCost:
        self.engine.commit_backward()
        return self.engine.pop_step_cost()
