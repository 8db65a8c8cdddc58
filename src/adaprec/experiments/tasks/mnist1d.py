"""mnist1d-cnn: the MNIST-1D benchmark (Greydanus), generated locally, and a 1-D CNN.

The data comes from ``mnist1d.data.make_dataset`` with the package's default
arguments (4000 train, 1000 test signals of length 40); nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn

from adaprec.errors import TaskError
from adaprec.experiments.tasks.base import Task, classification_task

BATCH = 100


class MNIST1DCNN(nn.Module):
    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.fc = nn.Linear(channels * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x.unsqueeze(1)))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate MNIST-1D with its default arguments: (x_train, y_train, x_test, y_test)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise TaskError("task mnist1d-cnn needs the mnist1d package: pip install mnist1d") from None
    d = make_dataset(get_dataset_args())
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(d["x"]), torch.tensor(d["y"]).long(), f(d["x_test"]), torch.tensor(d["y_test"]).long()


def make_task() -> Task:
    xtr, ytr, xte, yte = load()
    return classification_task("mnist1d-cnn", MNIST1DCNN, (xtr, ytr, xte, yte), lr=3e-3, batch=BATCH,
                               default_steps=1000, shape=(40,), samples=len(xtr) + len(xte))
