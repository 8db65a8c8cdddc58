"""The Task contract and the in-memory loader every built-in task shares.

A task is everything the runner needs to train and judge one model, as
plain factories, so every policy and seed starts from the same data and the
same seeded initial weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

__all__ = ["Task", "TensorLoader", "seeded", "stratified_split"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Task:
    """One experiment task: real data held in memory, a model, how to train and judge it.

    Attributes:
        name: registry name (or the ``module:function`` entry point).
        make_model: ``seed -> nn.Module``; the same seed gives the same weights.
        make_optimizer: ``model -> optimizer`` over the model's parameters.
        train_loader: ``seed -> iterable of (x, y)`` batches for one epoch;
            the seed fixes the shuffle, so the runner can replay any epoch.
        evaluate: ``model -> {metric: value}`` on the fixed held-out split,
            in fp32 master weights, without touching any RNG.
        metric: the headline key of ``evaluate``'s dict.
        higher_is_better: direction of ``metric``.
        loss_fn: ``(model output, y) -> scalar loss``.
        steps_per_epoch: batches per epoch of ``train_loader``.
        default_steps: steps that train to a meaningful metric in well under a minute on a CPU.
        info: facts about the data (sizes, classes), for docs and tests.
    """

    name: str
    make_model: Callable[[int], nn.Module]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    train_loader: Callable[[int], Iterable[Batch]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    metric: str
    higher_is_better: bool
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    steps_per_epoch: int
    default_steps: int
    info: dict[str, object] = field(default_factory=dict)


class TensorLoader:
    """Shuffled fixed-size batches of in-memory tensors; one pass is one epoch.

    The last incomplete batch is dropped so every step has the same shape
    (and the same cost in the energy ledger).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(self.x), generator=g)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module under ``seed`` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def stratified_split(y: torch.Tensor, test_per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed train/test indices with ``test_per_class`` samples of each class held out."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


@torch.no_grad()
def classification_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """Accuracy and mean cross-entropy on a held-out split, in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        loss += float(nn.functional.cross_entropy(out, y[i : i + batch_size], reduction="sum"))
        correct += int((out.argmax(-1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return {"accuracy": correct / len(x), "val_loss": loss / len(x)}


def classification_task(name: str, build: Callable[[], nn.Module], split: tuple[torch.Tensor, ...], *, lr: float,
                        batch: int, default_steps: int, shape: tuple[int, ...], samples: int) -> Task:
    """A 10-class classification task on tensors already split (x_train, y_train, x_test, y_test):
    Adam at ``lr``, cross-entropy, accuracy on the held-out split."""
    xtr, ytr, xte, yte = split
    return Task(
        name=name,
        make_model=partial(seeded, build),
        make_optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=lr),
        train_loader=lambda seed: TensorLoader(xtr, ytr, batch, seed),
        evaluate=lambda m: classification_eval(m, xte, yte),
        metric="accuracy",
        higher_is_better=True,
        loss_fn=nn.functional.cross_entropy,
        steps_per_epoch=len(xtr) // batch,
        default_steps=default_steps,
        info={"samples": samples, "train": len(xtr), "test": len(xte), "classes": 10, "shape": shape},
    )
