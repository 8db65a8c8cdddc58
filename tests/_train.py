"""A plain training loop over a Task, for tests that train for real."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import adaprec
from adaprec.experiments.tasks import get_task


@dataclass
class Trained:
    model: torch.nn.Module
    ap: adaprec.AdaptivePrecision
    metrics: dict[str, float]
    results: list


def train(
    task_name: str,
    policy,
    steps: int,
    seed: int = 0,
    before_step: Callable[[int, torch.nn.Module], None] | None = None,
    **ap_kwargs,
) -> Trained:
    task = get_task(task_name)
    model = task.make_model(seed)
    opt = task.make_optimizer(model)
    ap = adaprec.AdaptivePrecision(
        model, opt, policy, seed=seed, total_steps=steps, steps_per_epoch=task.steps_per_epoch, **ap_kwargs
    )
    results = []
    epoch = 0
    while len(results) < steps:
        for x, y in task.train_loader(seed * 1000 + epoch):
            if before_step is not None:
                before_step(len(results), model)
            opt.zero_grad(set_to_none=True)
            with ap.autocast():
                loss = task.loss_fn(model(x), y)
            ap.backward(loss)
            results.append(ap.step())
            if len(results) == steps:
                break
        else:
            ap.end_epoch()
        epoch += 1
    return Trained(model, ap, task.evaluate(model), results)


def same_state(a, b) -> bool:
    """Deep equality of nested state (dicts, lists, tensors), tensors bit for bit and of the same dtype."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def assert_resumed_exactly(a: adaprec.AdaptivePrecision, b: adaprec.AdaptivePrecision,
                           model_a: torch.nn.Module, model_b: torch.nn.Module) -> None:
    """A resumed run ``b`` ended exactly where the uninterrupted run ``a`` did: adaprec state and weights."""
    assert b.plan == a.plan
    assert b.loss_scaler.state_dict() == a.loss_scaler.state_dict()
    assert b.timeline == a.timeline
    assert same_state(b.state_dict(), a.state_dict())
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
