"""digits-cnn: scikit-learn's 8x8 handwritten digits (1797 images) and a small CNN.

The fastest real task: it reaches >= 95 % test accuracy in fp32 within a
few hundred steps and a few seconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from adaprec.experiments.tasks.base import Task, classification_task, stratified_split

BATCH = 64


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def load() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 images as (N, 1, 8, 8) floats in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.long)


def make_task() -> Task:
    x, y = load()
    tr, te = stratified_split(y, test_per_class=36)  # 360 test images, fixed
    return classification_task("digits-cnn", DigitsCNN, (x[tr], y[tr], x[te], y[te]), lr=3e-3, batch=BATCH,
                               default_steps=300, shape=(1, 8, 8), samples=len(x))
