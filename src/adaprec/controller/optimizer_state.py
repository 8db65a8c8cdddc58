"""The plan's optimizer-state role, stored for real: moments kept in the bytes their format takes.

Adam, AdamW and SGD-with-momentum state goes through
:class:`adaprec.optim.NarrowOptimizerState` (fused dequantize, update,
requantize; small tensors and embeddings stay fp32). Any other optimizer
keeps its own fp32 state; a plan that asks for narrow state there is told
why once, and the ledger counts the fp32 bytes that are really held.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from adaprec.distributed import stable_hash
from adaprec.errors import OptimizerStateError
from adaprec.optim import DEFAULT_MIN_NUMEL, NarrowOptimizerState
from adaprec.plan import PrecisionPlan

__all__ = ["OptimizerStates"]


class OptimizerStates:
    """Steps ``optimizer`` with its state kept as the plan says (``optimizer_state`` per module)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        self.optimizer = optimizer
        self.reason: str | None = None  # why narrow state is not available for this optimizer
        try:
            self.narrow: NarrowOptimizerState | None = NarrowOptimizerState(optimizer, model=model)
        except OptimizerStateError as e:
            self.narrow, self.reason = None, str(e)
        self._mine = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self._key: tuple | None = None
        self.key = "fp32"  # names the formats in force (what decides the update's ops)

    def apply(self, plan: PrecisionPlan, owners: Mapping[str, list[tuple[str, nn.Parameter]]],
              min_numel: int | None = None) -> dict[str, str]:
        """Keep each module's parameters' state in the plan's format (converted now if it changed).

        ``min_numel``: parameters with fewer elements keep fp32 moments (None: the optimizer state's own
        floor). Returns parameter name -> the format held (small tensors and embeddings stay fp32).
        """
        wanted = {name: (p, plan.get(m).optimizer_state) for m, params in owners.items()
                  for name, p in params if id(p) in self._mine}
        floor = DEFAULT_MIN_NUMEL if min_numel is None else int(min_numel)
        key = (("min_numel", str(floor)), *sorted((n, spec) for n, (_, spec) in wanted.items()))
        if key == self._key:
            return {}
        self._key = key
        self.key = f"{stable_hash([list(k) for k in key]):x}"
        narrow_asked = any(spec != "fp32" for _, spec in wanted.values())
        if self.narrow is None:
            if narrow_asked:
                self._warn(f"the plan keeps optimizer state narrow, but {self.reason}: it stays fp32")
            return {n: "fp32" for n in wanted}
        self.narrow.min_numel = floor
        try:
            held = self.narrow.set_formats({p: spec for p, spec in wanted.values()})
        except OptimizerStateError as e:
            self._warn(f"the plan's optimizer-state formats cannot be kept ({e}): the state stays as it was")
            return {}
        return {n: held.get(p, "fp32") for n, (p, _) in wanted.items()}

    def step(self) -> Any:
        """The optimizer's step, narrow moments updated in place (dequantize, update, requantize)."""
        return self.narrow.step() if self.narrow is not None else self.optimizer.step()

    def nbytes(self) -> dict[str, int]:
        """Bytes the optimizer's state really occupies, by storage format."""
        if self.narrow is not None:
            return self.narrow.nbytes()
        out: dict[str, int] = {}
        for state in self.optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    out["fp32"] = out.get("fp32", 0) + v.numel() * v.element_size()
        return out

    def state_dict(self) -> dict[str, Any] | None:
        return self.narrow.state_dict() if self.narrow is not None else None

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is not None and self.narrow is not None:
            self.narrow.load_state_dict(state)
            self._key = None

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(f"adaprec: {message}", stacklevel=4)
