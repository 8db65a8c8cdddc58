"""The bytes each training step moves, op by op: counted on some steps, replayed on the rest.

A window opens when the model's forward starts inside ``ap.autocast()`` (its
inputs are seen there: they are part of the key) and closes when the step is
priced, before the optimizer runs. The dispatch mode that counts is on only
inside adaprec's own calls (the forward and loss inside ``ap.autocast()``,
``ap.backward()``): never between them, so a loop that stops half-way leaves
no mode behind, and the loop's own ops between the calls (gradient clipping,
logging) are not in the count. The optimizer's update (and adaprec's
rollback copy) is measured in a window of its own and priced with the next
step, as ranks must agree on a step's figures before its update runs; the
last update of a run is therefore not in the ledger. A forward that
``torch.compile`` runs is not counted (a dispatch mode cannot run inside a
compiled graph): such a step is priced by its GEMMs' operands, labelled so. See
:class:`adaprec.energy.traffic_book.TrafficBook` for counting and replaying.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from adaprec.distributed import stable_hash
from adaprec.energy.traffic import StepTraffic
from adaprec.energy.traffic_book import Measurement, TrafficBook, input_signature
from adaprec.engine.hooks import WeakHook
from adaprec.plan import PrecisionPlan

__all__ = ["StepBytes"]


class StepBytes:
    """Measures each step's bytes for the ledger (``enabled=False``: the ledger keeps its GEMM-operand model)."""

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self.enabled = enabled
        self.book = TrafficBook(model)
        self._prefix: str | None = None  # armed: the next forward of the model opens the step's window
        self._step = 0
        self._open: Measurement | None = None
        self._update: StepTraffic | None = None  # the last optimizer update's bytes, priced with the next step
        self._plan_keys: dict[int, tuple[PrecisionPlan, str]] = {}
        self._hook = model.register_forward_pre_hook(WeakHook(self._started), with_kwargs=True) if enabled else None

    def _plan_key(self, plan: PrecisionPlan) -> str:
        hit = self._plan_keys.get(id(plan))
        if hit is None or hit[0] is not plan:
            hit = self._plan_keys[id(plan)] = (plan, f"{stable_hash(plan.to_dict()):x}")
        return hit[1]

    def arm(self, step: int, plan: PrecisionPlan, sampling: bool) -> None:
        """A training forward begins: its window opens with the model's first forward call."""
        if not self.enabled:
            return
        if self._open is not None:  # a step the loop left half-way (no ap.step()): dropped
            self.abandon()
        self._prefix, self._step = f"{self._plan_key(plan)}|{'sampled' if sampling else 'plain'}", step

    @property
    def _counting(self) -> bool:
        return self._open is not None and self._open.source == "counted"

    def _resume(self) -> bool:
        """Put the counting mode back on for the open step; True when this call did."""
        if self._counting and not self.book.counter.active:
            self.book.counter.__enter__()
            return True
        return False

    def pause(self) -> None:
        """Take the counting mode off until adaprec's next call (the loop's own code runs uncounted)."""
        if self._counting and self.book.counter.active:
            self.book.counter.__exit__(None, None, None)

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Ops inside count toward the open step (adaprec's own calls: backward)."""
        resumed = self._resume()
        try:
            yield
        finally:
            if resumed:
                self.pause()

    def _started(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._prefix is None:
            return
        if torch.compiler.is_compiling():  # a compiled forward: a dispatch mode cannot run in it; priced by GEMMs
            self._prefix = None
            return
        key, self._prefix = f"{self._prefix}|{input_signature(args, kwargs)}", None
        self._open = self.book.start(key, self._step, running=module)

    def close(self) -> tuple[StepTraffic | None, str]:
        """The step's forward and backward bytes, with the previous update's: (traffic or None, source)."""
        self._prefix = None
        self._resume()  # the book ends a counted step with the mode on
        m, self._open = self._open, None
        if m is None:
            return None, ""
        traffic = self.book.stop(m).plus(self._update)
        return traffic, m.source

    def abandon(self) -> None:
        """The step was abandoned (backward raised, or it was an evaluation pass): its window is dropped."""
        self._prefix = None
        if self._open is not None:
            self._resume()
            self.book.abort(self._open)
            self._open = None

    @contextlib.contextmanager
    def update(self, key: str, step: int) -> Iterator[None]:
        """Measure the optimizer's update (and adaprec's copies around it) for the next step's row."""
        if not self.enabled:
            yield
            return
        with self.book.measure(f"update|{key}", step) as m:
            yield
        self._update = m.traffic

    def skipped(self) -> None:
        """No update ran this step: the next row carries none."""
        self._update = None

    def summary(self) -> dict[str, Any]:
        return self.book.summary()

    def state_dict(self) -> dict[str, Any]:
        return {"book": self.book.state_dict(), "update": None if self._update is None else self._update.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is None:
            return
        self.book.load_state_dict(state["book"])
        self._update = None if state.get("update") is None else StepTraffic.from_dict(state["update"])

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
