"""A plain training loop over a Task, for tests that train for real."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import adaprec
from adaprec.experiments.tasks import get_task
from adaprec.hardware import DeviceReport, FormatSupport


def fake_report(fast: tuple[str, ...] = ("int8", "bf16"), conv_fast: tuple[str, ...] = ("bf16",),
                attention_fast: tuple[str, ...] = ()) -> DeviceReport:
    """A device report whose fast formats are fixed, so tests do not depend on the CPU they run on.

    Every format named runs through a real kernel on any x86 or Arm CPU (``torch._int_mm``,
    bf16 matmul), only slower on a CPU without the units; the speedups are made up (3x).
    """
    def table(names: tuple[str, ...], slow_native: tuple[str, ...] = ()) -> dict[str, FormatSupport]:
        out = {"fp32": FormatSupport("fp32", True, "torch.mm(float32)", 1.0, "reference")}
        for f in slow_native:  # runs on its units, but no faster than fp32 (as bf16 attention on some CPUs)
            out[f] = FormatSupport(f, True, "test", 1.0, "fixed by the test: native, not faster")
        for f in names:
            out[f] = FormatSupport(f, True, "test", 3.0, "fixed by the test")
        return out

    kwargs = dict(
        device="cpu", name="test CPU", torch_version=torch.__version__, threads=torch.get_num_threads(),
        capability="test", flags=(), formats=table(fast), conv=table(conv_fast), sweep="none",
    )
    try:
        return DeviceReport(**kwargs, attention=table(attention_fast, slow_native=("bf16",)))
    except TypeError:  # a report without the attention op class
        return DeviceReport(**kwargs)


FAST_INT8_BF16 = fake_report()


def train_random(ap: adaprec.AdaptivePrecision, model: nn.Module, opt: torch.optim.Optimizer, steps: int,
                 rows: int, seed: int = 0, features: int = 64, classes: int = 4) -> None:
    """``steps`` steps of cross-entropy on random batches (``rows`` x ``features``), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(rows, features, generator=g), torch.randint(0, classes, (rows,), generator=g)
        opt.zero_grad(set_to_none=True)
        with ap.autocast():
            loss = F.cross_entropy(model(x), y)
        ap.backward(loss)
        ap.step()


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
    if ap_kwargs.get("backend") != "emulate":
        ap_kwargs.setdefault("hardware", FAST_INT8_BF16)
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


def state_diff(a, b, path: str = "") -> list[str]:
    """Where two nested states differ (paths), for assertion messages."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return [] if same_state(a, b) else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in state_diff(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in state_diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {str(a)[:80]} != {str(b)[:80]}"]


def _untimed(state: dict) -> dict:
    """The state without measured wall times (two runs never take the same time)."""
    rows = state["energy"]["rows"]  # columns: one list per field
    columns = dict(rows["columns"], wall_s=[None] * len(rows["columns"]["wall_s"]))
    return dict(state, energy=dict(state["energy"], rows=dict(rows, columns=columns)))


def assert_resumed_exactly(a: adaprec.AdaptivePrecision, b: adaprec.AdaptivePrecision,
                           model_a: torch.nn.Module, model_b: torch.nn.Module) -> None:
    """A resumed run ``b`` ended exactly where the uninterrupted run ``a`` did: adaprec state and weights."""
    assert b.plan == a.plan
    assert b.loss_scaler.state_dict() == a.loss_scaler.state_dict()
    assert b.timeline == a.timeline
    sa, sb = _untimed(a.state_dict()), _untimed(b.state_dict())
    assert same_state(sb, sa), state_diff(sb, sa)[:10]
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)


class TinyAttention(nn.Module):
    """Causal self-attention through F.scaled_dot_product_attention, between two Linears."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))
