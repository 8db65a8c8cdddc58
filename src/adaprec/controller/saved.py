"""The plan's ``saved`` role: what autograd keeps of each module's ops, stored in the module's storage format.

The module an op runs in is the innermost module of the model running it
(:class:`adaprec.engine.saved.SavedTensorStorage` tracks them); its format
is that of the nearest module of the plan at or above it, and for modules
no plan module contains (norms, activations and the residual stream of a
block whose GEMMs are its children) the widest ``saved`` format among the
plan's unpinned modules: every kept tensor is stored at least as wide as
the most careful module asked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from adaprec.engine.saved import SavedTensorStorage
from adaprec.engine.saved_bytes import SavedBytes
from adaprec.formats import width_key
from adaprec.formats.storage import storage_format
from adaprec.plan import PrecisionPlan

__all__ = ["SavedByPlan"]


class SavedByPlan:
    """Stores each saved tensor as the plan in force says; a no-op while every module's ``saved`` is fp32."""

    def __init__(self, model: nn.Module) -> None:
        self.storage = SavedTensorStorage(self._format_for, model=model, roles=False)
        self._plan: PrecisionPlan | None = None
        self._specs: dict[str, str] = {}
        self._default = "fp32"
        self._names: dict[str | None, str] = {}

    def use(self, plan: PrecisionPlan) -> None:
        """The plan in force from the next forward pass on."""
        if plan is self._plan:
            return
        self._plan = plan
        self._specs = {m: mp.saved for m, mp in plan.modules.items()}
        free = [mp.saved for m, mp in plan.modules.items() if m not in plan.pinned]
        self._default = max(free, key=lambda s: width_key(storage_format(s).base)) if free else "fp32"
        self._names = {}

    @property
    def active(self) -> bool:
        """Whether any saved tensor would be stored narrower than it is."""
        return any(s != "fp32" for s in self._specs.values())

    def _format_for(self, module: str | None, role: str | None, tensor: torch.Tensor) -> str:
        hit = self._names.get(module)
        if hit is None:
            name = module
            while name is not None and name not in self._specs:
                name = name.rpartition(".")[0] if name else None
            hit = self._names[module] = self._specs[name] if name is not None else self._default
        return hit

    @contextlib.contextmanager
    def forward(self, enabled: bool = True) -> Iterator[None]:
        """A training forward pass: its saved tensors packed per the plan (nothing installed when all are fp32)."""
        if not (enabled and self.active and torch.is_grad_enabled()):
            yield
            return
        with self.storage:
            yield

    def stats(self) -> SavedBytes:
        """Bytes autograd kept for backward in the latest pass, by module, role and format, before and after."""
        return self.storage.stats()

    def state_dict(self) -> dict[str, Any]:
        return self.storage.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.storage.load_state_dict(state)
