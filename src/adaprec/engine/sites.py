"""Which module an op belongs to: parameter owners and a stack of running modules.

An op that multiplies a parameter belongs to the module owning that
parameter (the innermost running one when several share it, as tied
embeddings do); an op on activations only (attention's products, an
``einsum`` of two activations) belongs to the innermost running module.
The stack is kept by forward hooks: on every module during discovery (the
first forward pass), then only on the modules that need it (sites without a
parameter of their own, owners of shared parameters, and the root), so a
steady-state step pays for a handful of hooks, not one per module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Site", "SiteMap", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside ``torch.compile``'s and DDP's wrappers, so names carry no ``_orig_mod.`` or
    ``module.`` prefix: plans, timelines and reports name the modules as the user does, and a timeline
    recorded on a wrapped model replays on the bare one."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


@dataclass
class Site:
    """A module that runs GEMMs: the op kinds seen, and whether the plan covers it (and if not, why)."""

    name: str
    kinds: set[str] = field(default_factory=set)
    has_weight_op: bool = False
    covered: bool = True
    reason: str = ""

    @property
    def kind(self) -> str:
        if not self.kinds:
            return "unknown"
        order = ("linear", "conv", "attention", "mha", "matmul", "einsum", "embedding", "rnn")
        ks = sorted(self.kinds, key=lambda k: order.index(k) if k in order else len(order))
        return ks[0] if len(ks) == 1 else "+".join(ks)


class SiteMap:
    """Parameter ownership and the running-module stack of one model."""

    def __init__(self, model: nn.Module) -> None:
        model = unwrap(model)
        self.model = model
        self.names: dict[int, str] = {}
        self.modules: dict[str, nn.Module] = {}
        owners: dict[int, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            if name in self.modules:
                continue
            self.modules[name] = module
            self.names.setdefault(id(module), name)
            for p in module._parameters.values():
                if p is not None:
                    lst = owners.setdefault(id(p), [])
                    if name not in lst:
                        lst.append(name)
        self.owners = owners
        self.stack: list[str] = []
        self._hooks: list[Any] = []
        self._hooked: set[str] = set()

    # --- attribution --------------------------------------------------------------
    def owner(self, weight: torch.Tensor | None) -> str | None:
        """The module an op belongs to (None: no module of this model is running it)."""
        if weight is not None:
            names = self.owners.get(id(weight))
            if names:
                if len(names) == 1:
                    return names[0]
                for running in reversed(self.stack):
                    if running in names:
                        return running
                return names[0]
        return self.stack[-1] if self.stack else None

    def shared_owners(self) -> set[str]:
        return {n for names in self.owners.values() if len(names) > 1 for n in names}

    # --- the stack ----------------------------------------------------------------
    def _push(self, name: str) -> Callable[..., None]:
        stack = self.stack

        def hook(module: nn.Module, args: Any) -> None:
            stack.append(name)

        return hook

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack:
            self.stack.pop()

    def hook(self, names: set[str] | None = None) -> None:
        """Keep the stack on ``names`` (None: every module). Replaces the hooks there were."""
        self.unhook()
        wanted = set(self.modules) if names is None else set(names) | {""}
        for name in wanted:
            module = self.modules.get(name)
            if module is None:
                continue
            self._hooks.append(module.register_forward_pre_hook(self._push(name)))
            self._hooks.append(module.register_forward_hook(self._pop, always_call=True))
        self._hooked = wanted

    def unhook(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._hooked = set()
        self.stack.clear()

    @property
    def hooked(self) -> set[str]:
        return set(self._hooked)
