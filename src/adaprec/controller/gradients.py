"""The gradient check: unscale, look for inf/NaN, name the modules, and say what the step's health is.

One fused kernel per device unscales every gradient and flags inf/NaN (as
``torch.amp.GradScaler`` does); nothing syncs with the host until the flag
is read once, in :meth:`GradientCheck.unscale`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaprec.distributed import local
from adaprec.errors import UsageError

__all__ = ["GradientCheck", "StepHealth", "LocalView", "unscale_grads", "param_owners"]


def unscale_grads(grads: Sequence[torch.Tensor], scale: float) -> bool:
    """Divide ``grads`` by ``scale`` in place, one fused kernel per device; True when one holds inf/NaN."""
    if not grads:
        return False
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    found = False
    for dev, gs in by_device.items():
        flag = torch.zeros(1, device=dev)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, flag, _inverse(1.0 / scale, dev))
        found = bool(flag.item() > 0) or found  # one host sync per device
    return found


def _inverse(value: float, device: torch.device) -> torch.Tensor:
    """A 0-d tensor of ``value`` on ``device``, kept for the common 1/scale values (1.0 on every step of a
    run without loss scaling): building it costs more than the check on a small model."""
    key = (value, device)
    t = _INVERSES.get(key)
    if t is None:
        if len(_INVERSES) > 64:
            _INVERSES.clear()
        t = _INVERSES[key] = torch.tensor(value, device=device)
    return t


_INVERSES: dict[tuple[float, torch.device], torch.Tensor] = {}


@dataclass(frozen=True)
class StepHealth:
    """What the guard and the policy read of one step, the same on every rank."""

    nonfinite: bool  # inf/NaN somewhere: gradients, the loss or a cast (any rank)
    loss: float  # the loss (mean over ranks)
    cast_faults: tuple[tuple[str, str], ...] = ()  # (module, role) whose tensor held inf/NaN before its cast
    overflowed: tuple[str, ...] = ()  # the modules to blame, gradients first

    @property
    def cause(self) -> str:
        """Where inf/NaN came from: ``loss``, ``cast``, ``gradients``, or "" on a healthy step."""
        if not self.nonfinite:
            return ""
        return "loss" if not math.isfinite(self.loss) else ("cast" if self.cast_faults else "gradients")

    def skip_reason(self) -> str:
        """Why a step with inf/NaN was skipped, naming the place."""
        if not math.isfinite(self.loss):  # the forward pass already failed: the casts backward only met its NaN
            return f"skipped: inf/NaN in the loss ({self.loss}), from the forward pass"
        if self.cast_faults:
            where = ", ".join(f"{r} of {m or '<root>'}" for m, r in self.cast_faults)
            return f"skipped: inf/NaN in the {where} before its cast"
        return "skipped: inf/NaN in gradients" + (f" of {', '.join(self.overflowed)}" if self.overflowed else "")


@dataclass(frozen=True)
class LocalView:
    """This rank's raw view of the step, before ranks agree on it."""

    nonfinite: bool  # this rank's gradients held inf/NaN
    loss: float
    cast_faults: tuple[tuple[str, str], ...]
    named: tuple[str, ...] | None  # the overflowing modules, if unscale_() named them already
    sampled: bool  # the monitor measures this step

    @property
    def bad(self) -> bool:
        return self.nonfinite or not math.isfinite(self.loss) or bool(self.cast_faults)


class GradientCheck:
    """Unscales the gradients of the controller's optimizer and finds the modules whose gradients overflowed.

    ``params``: the optimizer's parameters (their gradients are checked); ``owners`` (module fqn -> its own
    (name, parameter) pairs) is set once discovery is over.
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.owners: Mapping[str, list[tuple[str, nn.Parameter]]] = {}
        self.others_unscaled: set[int] = set()  # optimizers (other than the controller's) unscaled this step
        self.unscaled_ids: set[int] = set()  # their parameters

    def new_step(self) -> None:
        self.others_unscaled, self.unscaled_ids = set(), set()

    def unscale_other(self, optimizer: Any, scale: float) -> bool:
        """Unscale another optimizer's gradients once per step (its parameters outside ours); True on inf/NaN."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"unscale_(optimizer) takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if id(optimizer) in self.others_unscaled:
            return False
        self.others_unscaled.add(id(optimizer))
        mine = {id(p) for p in self.params}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.unscaled_ids.update(id(p) for p in params)
        grads = [local(p.grad) for p in params if p.grad is not None and id(p) not in mine]
        return unscale_grads(grads, scale) if scale != 1.0 else False

    def grads(self) -> list[torch.Tensor]:
        return [local(p.grad) for p in self.params if p.grad is not None]

    def unscale(self, scale: float) -> bool:
        """Unscale every gradient by ``scale``; True when one holds inf/NaN (one host sync)."""
        return unscale_grads(self.grads(), scale)

    def overflowed(self) -> tuple[str, ...]:
        """The modules with an inf/NaN gradient (read before clipping spreads NaN everywhere)."""
        return tuple(m for m, params in self.owners.items()
                     if any(p.grad is not None and not torch.isfinite(local(p.grad)).all() for _, p in params))

    def weight_grads(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Per module, the gradient of its weight (what the monitor reads: norm, diversity)."""
        for m, params in self.owners.items():
            for pname, p in params:
                if pname.endswith("weight") and p.grad is not None:
                    yield m, p.grad
                    break

    def blame(self, view: LocalView) -> tuple[str, ...]:
        """This rank's modules to blame for a bad step: overflowing gradients, then failed casts."""
        grads = (view.named if view.named is not None else self.overflowed()) if view.nonfinite else ()
        return tuple(dict.fromkeys(grads + tuple(m for m, _ in view.cast_faults)))


def param_owners(model: nn.Module, modules: Sequence[str]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Module fqn -> its own parameters (direct and nested, by name prefix; the longest module name wins)."""
    owners: dict[str, list[tuple[str, nn.Parameter]]] = {m: [] for m in modules}
    by_len = sorted(modules, key=len, reverse=True)
    for pname, p in model.named_parameters():
        for m in by_len:
            if m == "" or pname.startswith(m + "."):
                owners[m].append((pname, p))
                break
    return owners
