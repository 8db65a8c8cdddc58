"""The optimizer-state role of a plan, as it runs today: the moments rounded to the plan's format in place.

Emulated: the values are rounded but stay in fp32 storage, so no byte is
saved (the ledger must price them as fp32).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from adaprec.distributed import local
from adaprec.formats import get, quantize
from adaprec.plan import PrecisionPlan

__all__ = ["round_optimizer_state"]


def round_optimizer_state(optimizer: torch.optim.Optimizer, plan: PrecisionPlan,
                          owners: Mapping[str, list[tuple[str, nn.Parameter]]]) -> None:
    """Round every floating state tensor of each module's parameters to the plan's optimizer-state format."""
    for m, params in owners.items():
        fmt = plan.get(m).optimizer_state
        if fmt == "fp32":
            continue
        f = get(fmt)
        for _, p in params:
            for v in optimizer.state.get(p, {}).values():
                v = local(v)  # FSDP2: this rank's shard of the state
                if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0:
                    v.copy_(quantize(v, f, "nearest", saturate=True))
