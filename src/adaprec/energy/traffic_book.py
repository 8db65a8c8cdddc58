"""Count a step's bytes on some steps, replay the count on the rest.

A dispatch-mode count (:class:`adaprec.energy.traffic.TrafficCounter`) costs
Python time on every op, so it must not run on every step. A
:class:`TrafficBook` counts the steps of each key (the plan, the input
signature, anything else that decides which ops run) until two counts agree,
replays that count for later steps of the key, and counts again from time to
time to catch drift. Every step says whether its bytes were counted or
replayed.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaprec.energy.counting import CountingError
from adaprec.energy.op_rules import dtype_label
from adaprec.energy.traffic import StepTraffic, TrafficCounter
from adaprec.errors import CheckpointError

__all__ = ["TrafficBook", "Measurement", "input_signature"]


def input_signature(*inputs: Any) -> str:
    """A short string of the shapes and dtypes of ``inputs`` (tensors, nested lists/tuples/dicts, plain values)."""

    def sig(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"{dtype_label(x.dtype)}{list(x.shape)}@{x.device.type}"
        if isinstance(x, Mapping):
            return "{" + ",".join(f"{k}:{sig(v)}" for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))) + "}"
        if isinstance(x, (list, tuple)):
            return "(" + ",".join(sig(v) for v in x) + ")"
        return type(x).__name__

    return ";".join(sig(x) for x in inputs)


@dataclass
class Measurement:
    """What :meth:`TrafficBook.measure` gives back: the step's traffic once the block has run, and how it was had."""

    key: str
    step: int
    source: str  # "counted" | "replayed"
    traffic: StepTraffic | None = None


class TrafficBook:
    """Counts a step's bytes on the first step of each key, replays the count for later steps of that key.

    A key is a string naming whatever decides which ops a step runs: the
    plan's signature and the input signature (:func:`input_signature`) at
    least, plus e.g. whether monitors sample on this step. A key's steps are
    counted until two counts in a row agree (within ``tolerance``, relative
    bytes; the very first step of a run also creates the optimizer's state,
    which later steps do not), then replayed. Every ``recount_every``
    replays, a step is counted again; a recount that differs from the
    confirmed count replaces it and is logged as drift.

    Usage::

        book = TrafficBook(model)
        for step, (x, y) in enumerate(loader):
            key = f"{plan_signature}|{input_signature(x, y)}"
            with book.measure(key, step) as m:
                loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
            m.traffic.apply_to(step_cost, m.source)   # then ledger.record(step, plan, step_cost)

    Args:
        model: the model whose modules the bytes are attributed to.
        recount_every: replays of a key between two counts of it (0: never recount).
        max_keys: counts kept (least recently used dropped first).
        tolerance: relative difference in bytes a recount may show without being logged as drift.
    """

    def __init__(self, model: nn.Module, recount_every: int = 500, max_keys: int = 64, tolerance: float = 1e-6) -> None:
        if recount_every < 0 or max_keys < 1:
            raise CountingError(f"TrafficBook(recount_every={recount_every}, max_keys={max_keys}): "
                                "recount_every must be >= 0 and max_keys >= 1")
        self.counter = TrafficCounter(model)
        self.recount_every = int(recount_every)
        self.max_keys = int(max_keys)
        self.tolerance = float(tolerance)
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.counted = 0
        self.replayed = 0
        self.drifts: list[dict[str, Any]] = []
        self.counted_steps: list[int] = []  # the last steps that were counted (bounded)
        self._open: Measurement | None = None

    def must_count(self, key: str) -> bool:
        """Whether the next step of ``key`` is counted (new key, or time to recount) rather than replayed."""
        e = self._entries.get(key)
        return e is None or not e["confirmed"] or (self.recount_every > 0 and e["replays"] >= self.recount_every)

    @contextlib.contextmanager
    def measure(self, key: str, step: int) -> Iterator[Measurement]:
        """Run a training step inside; afterwards ``measurement.traffic`` is its count, counted or replayed.

        Replayed steps run with nothing added; their traffic is the stored count itself (shared: read it,
        do not change it). A block that raises leaves the book as it was.
        """
        m = self.start(key, step)
        try:
            yield m
        except BaseException:
            self.abort(m)
            raise
        self.stop(m)

    def start(self, key: str, step: int, running: nn.Module | None = None) -> Measurement:
        """Begin a step (for loops whose step is not one block: call :meth:`stop` after the optimizer step).

        ``running``: a module of the model whose forward is already under way
        (``start`` called from its forward pre-hook, where the step's inputs
        are first seen): its ops are attributed to it.
        """
        if not isinstance(key, str):
            raise CountingError(f"a traffic key must be a string, got {type(key).__name__}; build one with "
                                "input_signature() and the plan's signature")
        if self._open is not None:
            raise CountingError(f"step {self._open.step} is still being measured: stop() it before starting another")
        m = Measurement(key, int(step), "counted" if self.must_count(key) else "replayed")
        if m.source == "counted":
            self.counter.pop()
            self.counter.__enter__()
            if running is not None:
                self.counter.running(running)
        self._open = m
        return m

    def stop(self, m: Measurement, keep: bool = True) -> StepTraffic:
        """End the step begun by :meth:`start`: its traffic (also in ``m.traffic``), counted or replayed.

        ``keep=False``: a counted step that is not typical of its key (its
        update was skipped, it rolled back) is returned but not stored.
        """
        if self._open is not m:
            raise CountingError("stop() of a measurement that is not the open one; call start() first")
        self._open = None
        if m.source == "replayed":
            e = self._entries[m.key]
            e["replays"] += 1
            self._entries.move_to_end(m.key)
            self.replayed += 1
            m.traffic = e["traffic"]
            return m.traffic
        self.counter.__exit__(None, None, None)
        m.traffic = self.counter.pop()
        if keep:
            self._store(m.key, m.step, m.traffic)
        else:
            self.counted += 1
            self._log_counted(m.step)
        return m.traffic

    def abort(self, m: Measurement) -> None:
        """Drop the step begun by :meth:`start` (it raised, or was abandoned): nothing is stored or counted."""
        if self._open is m:
            self._open = None
            if m.source == "counted":
                self.counter.__exit__(None, None, None)
                self.counter.pop()

    def _store(self, key: str, step: int, traffic: StepTraffic) -> None:
        old = self._entries.get(key)
        agree = False
        if old is not None:
            before = old["traffic"].bytes
            after = traffic.bytes
            agree = abs(after - before) <= self.tolerance * max(before, 1)
            if not agree and old["confirmed"]:
                self.drifts.append({"key": key, "step": step, "bytes_before": before, "bytes_after": after})
                del self.drifts[:-100]
        self._entries[key] = {"traffic": traffic, "counted_at": step, "replays": 0,
                              "confirmed": agree}
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)
        self.counted += 1
        self._log_counted(step)

    def _log_counted(self, step: int) -> None:
        self.counted_steps.append(step)
        del self.counted_steps[:-1000]

    def replay(self, key: str) -> StepTraffic | None:
        """The stored count of ``key`` (shared: read it, do not change it), or None."""
        e = self._entries.get(key)
        return None if e is None else e["traffic"]

    def keys(self) -> list[str]:
        return list(self._entries)

    def summary(self) -> dict[str, Any]:
        """How many steps were counted and replayed, which were counted, and any drift a recount found."""
        return {"counted": self.counted, "replayed": self.replayed, "keys": len(self._entries),
                "counted_steps": list(self.counted_steps), "drifts": [dict(d) for d in self.drifts],
                "recount_every": self.recount_every}

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "version": 1, "recount_every": self.recount_every, "max_keys": self.max_keys, "tolerance": self.tolerance,
            "entries": [[k, {"traffic": e["traffic"].to_dict(), "counted_at": e["counted_at"], "replays": e["replays"],
                             "confirmed": e["confirmed"]}] for k, e in self._entries.items()],
            "counted": self.counted, "replayed": self.replayed, "drifts": [dict(d) for d in self.drifts],
            "counted_steps": list(self.counted_steps),
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        missing = [k for k in ("version", "entries", "counted", "replayed") if k not in d]
        if missing:
            raise CheckpointError(f"traffic book state is missing keys {missing}; was it written by TrafficBook.state_dict()?")
        entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        for k, e in d["entries"]:
            entries[str(k)] = {"traffic": StepTraffic.from_dict(e["traffic"]), "counted_at": int(e["counted_at"]), "replays": int(e["replays"]),
                               "confirmed": bool(e.get("confirmed", False))}
        self._entries = entries
        self.recount_every = int(d.get("recount_every", self.recount_every))
        self.max_keys = int(d.get("max_keys", self.max_keys))
        self.tolerance = float(d.get("tolerance", self.tolerance))
        self.counted, self.replayed = int(d["counted"]), int(d["replayed"])
        self.drifts = [dict(x) for x in d.get("drifts", [])]
        self.counted_steps = [int(s) for s in d.get("counted_steps", [])]
