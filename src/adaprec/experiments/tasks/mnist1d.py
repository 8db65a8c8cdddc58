"""mnist1d-cnn: the MNIST-1D benchmark (Greydanus), generated locally, and a 1-D CNN.

The data comes from ``mnist1d.data.make_dataset`` with the package's default
arguments (4000 train, 1000 test signals of length 40); nothing is downloaded.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from adaprec.errors import TaskError
from adaprec.experiments.tasks.base import Task, TensorLoader, classification_eval, seeded

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
    return Task(
        name="mnist1d-cnn",
        make_model=partial(seeded, MNIST1DCNN),
        make_optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
        train_loader=lambda seed: TensorLoader(xtr, ytr, BATCH, seed),
        evaluate=lambda m: classification_eval(m, xte, yte),
        metric="accuracy",
        higher_is_better=True,
        loss_fn=nn.functional.cross_entropy,
        steps_per_epoch=len(xtr) // BATCH,
        default_steps=1000,
        info={"samples": len(xtr) + len(xte), "train": len(xtr), "test": len(xte), "classes": 10, "shape": (40,)},
    )
