"""A user's model called once on example inputs: how the inputs are passed and what to backpropagate."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

__all__ = ["split_inputs", "loss_of"]


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A tensor -> model(x); a tuple or list -> model(*inputs); a dict -> model(**inputs)."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _tensors(out: Any) -> Iterable[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, Mapping):
        for v in out.values():
            yield from _tensors(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from _tensors(v)


def loss_of(out: Any, loss_fn: Callable[[Any], Any] | None) -> Any:
    """The scalar to run backward from: ``loss_fn(out)``, else the output's ``loss``, else the sum of its outputs."""
    if loss_fn is not None:
        return loss_fn(out)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        return loss
    parts = [t.float().sum() for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
    return sum(parts[1:], parts[0]) if parts else None
