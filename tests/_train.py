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
