"""A user task for examples/user-task.yaml: the digits data with a plain MLP."""

from dataclasses import replace

import torch
from torch import nn

from adaprec.experiments.tasks import Task, get_task
from adaprec.experiments.tasks.base import seeded


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def make_task() -> Task:
    digits = get_task("digits-cnn")
    return replace(
        digits,
        name="digits-mlp",
        make_model=lambda seed: seeded(_mlp, seed),
        make_optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
    )
