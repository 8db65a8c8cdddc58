"""Steps that run nothing narrow need the engine only for their count: counted once, replayed after.

Why: a step whose every module computes in fp32 and that takes no
statistics is plain PyTorch; sending each of its ops through a Python
torch-function mode (and probing its backward GEMMs) only to count them made
an fp32 plan 1.1-1.4x slower than plain PyTorch on small models (measured).
Its GEMMs are those of the last counted step with the same plan, gradient
mode and input shapes, taken at the model's first forward call: that cost is
replayed, and the mode stays off. A step is counted again when one of those
changes, on every sampled step (the monitor's observers need the mode), and
every ``recount_every`` replays; a recount that differs is kept and logged as
drift. The model's later calls in a replayed step are checked against those
of the counted step (their input shapes); a call it did not make is counted
on top, and the key is counted afresh next time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

from adaprec.energy.counting import StepCost

__all__ = ["StepReplay"]


class StepReplay:
    """The counted cost of each key (plan, grad mode, input shapes), replayed while the key holds."""

    def __init__(self, recount_every: int = 200, max_keys: int = 16) -> None:
        self.recount_every, self.max_keys = recount_every, max_keys
        self._costs: OrderedDict[Hashable, list[Any]] = OrderedDict()  # key -> [cost, replays, call signatures]
        self.counted = self.replayed = 0
        self.drifts: list[tuple[int, int]] = []  # (MACs replayed, MACs counted) where a recount differed

    def lookup(self, key: Hashable) -> tuple[StepCost, list[str]] | None:
        """A copy of ``key``'s counted cost to replay, and the input signatures of the model's calls in that
        step; None when this step must be counted."""
        hit = self._costs.get(key)
        if hit is None or (self.recount_every and hit[1] >= self.recount_every):
            return None
        hit[1] += 1
        self._costs.move_to_end(key)
        self.replayed += 1
        return hit[0].copy(), list(hit[2])

    def store(self, key: Hashable, cost: StepCost, calls: list[str]) -> None:
        """A counted step's cost (copied: the caller goes on adding to its own) and its model calls' signatures."""
        self.counted += 1
        old = self._costs.get(key)
        if old is not None and old[0].macs != cost.macs:
            self.drifts.append((old[0].macs, cost.macs))
        self._costs[key] = [cost.copy(), 0, list(calls)]
        self._costs.move_to_end(key)
        while len(self._costs) > self.max_keys:
            self._costs.popitem(last=False)

    def forget(self, key: Hashable) -> None:
        """A replayed step did not run as its count: count the key afresh next time."""
        self._costs.pop(key, None)

    def summary(self) -> Mapping[str, Any]:
        return {"counted": self.counted, "replayed": self.replayed, "drifts": list(self.drifts)}
