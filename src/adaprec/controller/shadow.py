"""The shadow audit: on some steps, recompute the gradient in fp32 and measure how far the narrow one was.

Per module it keeps four sums (a.b, a.a, b.b and |a-b|^2 of the narrow
gradient ``a`` and the fp32 one ``b``): sums add over FSDP shards and travel
in the step's one collective, and the cosine and relative error follow from
them the same way on one rank or many.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from adaprec.distributed import local

__all__ = ["ShadowAudit"]


class ShadowAudit:
    """Every ``every`` steps, when ``backward`` is given a ``recompute`` closure: the fp32 gradient's agreement."""

    def __init__(self, every: int | None, params: Sequence[nn.Parameter]) -> None:
        self.every = every
        self.params = list(params)
        self.results: dict[int, dict[str, tuple[float, float]]] = {}  # step -> module -> (cosine, relative error)

    def due(self, step: int, recompute: Callable[[], torch.Tensor] | None) -> bool:
        return recompute is not None and bool(self.every) and step % self.every == 0  # type: ignore[operator]

    def measure(self, recompute: Callable[[], torch.Tensor], scale: float,
                owners: Mapping[str, list[tuple[str, nn.Parameter]]]) -> dict[str, torch.Tensor]:
        """Recompute the gradient in fp32 (the narrow one is put back after): per module, the four sums."""
        low = {id(p): local(p.grad).detach().clone() / scale for p in self.params if p.grad is not None}
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            recompute().backward()
            sums: dict[str, torch.Tensor] = {}
            for m, params in owners.items():
                pairs = [(low[id(p)], local(p.grad)) for _, p in params if id(p) in low and p.grad is not None]
                if not pairs:
                    continue
                a = torch.cat([x.flatten() for x, _ in pairs]).double()
                b = torch.cat([y.flatten() for _, y in pairs]).double()
                sums[m] = torch.stack([a @ b, a @ a, b @ b, (a - b).square().sum()])
            return sums
        finally:
            for p, g in zip(self.params, saved, strict=True):
                p.grad = g

    def record(self, step: int, sums: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, float]]:
        """The audit of ``step`` from its sums (added over ranks where sharded): module -> (cosine, rel. error)."""
        audit = {}
        for m, (ab, aa, bb, dd) in sums.items():
            cos = float(ab) / max(math.sqrt(float(aa)) * math.sqrt(float(bb)), 1e-8)
            audit[m] = (cos, math.sqrt(float(dd)) / max(math.sqrt(float(bb)), 1e-30))
        self.results[step] = audit
        return audit
