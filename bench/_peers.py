"""Is a benchmarked variant training what it claims to train? Checks shared by the benches.

A comparison is only as good as its setup. A library that swaps a module's
parameters (torchao's ``quantize_`` on its tensor-subclass path does) after
the optimizer was built leaves the optimizer holding the old tensors: the
model then never trains, and the bench reports a loss that says nothing
about that library. :func:`check_setup` runs a variant's first optimizer
step and checks that every trainable parameter of the model is in the
optimizer and that each one changed; :func:`count_ops` counts the aten ops a
step really ran (e.g. ``aten::_int_mm``, the int8 GEMM), whoever called them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

INT8_GEMM = "aten::_int_mm"


class SetupError(RuntimeError):
    """A benchmarked variant is set up so that it does not train what it claims to."""


@dataclass(frozen=True)
class SetupCheck:
    """What :func:`check_setup` found for one variant."""

    variant: str
    trainable: int
    missing: tuple[str, ...]
    """Trainable parameters of the model that no optimizer param group holds."""
    unchanged: tuple[str, ...]
    """Trainable parameters whose values the first optimizer step left as they were."""

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unchanged

    def summary(self) -> str:
        n = self.trainable
        head = "ok" if self.ok else "FAILED"
        return (f"{head}: {n - len(self.missing)}/{n} trainable tensors in the optimizer, "
                f"{n - len(self.unchanged)}/{n} changed by step 1")

    def raise_if_failed(self) -> None:
        if self.ok:
            return
        parts = [f"variant {self.variant!r} is set up wrong ({self.summary()})."]
        if self.missing:
            parts.append(f"Not in the optimizer: {_names(self.missing)}. Build the optimizer after every "
                         "transform that replaces parameters (for torchao, call quantize_ before creating "
                         "the optimizer), or pass it the model's current parameters.")
        if self.unchanged:
            parts.append(f"Unchanged by the first optimizer step: {_names(self.unchanged)}. Check that these "
                         "tensors get gradients and that the step was not skipped.")
        raise SetupError(" ".join(parts))


def _names(names: tuple[str, ...], shown: int = 6) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's trainable parameters (shared ones once), as ``named_parameters`` yields them."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def missing_from(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """Names of the model's trainable parameters that are not, as objects, in the optimizer's groups."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return tuple(n for n, p in trainable(model) if id(p) not in held)


def check_setup(variant: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                first_step: Callable[[], object]) -> SetupCheck:
    """Run ``first_step`` (one whole training step, optimizer step included) and check the setup.

    The parameters are read from the model after ``first_step`` as well as
    before, so a transform applied lazily inside the step is seen too.
    """
    before = {n: p.detach().clone() for n, p in trainable(model)}
    first_step()
    after = dict(trainable(model))
    unchanged = tuple(n for n, p in after.items()
                      if n in before and torch.equal(before[n], p.detach()))
    return SetupCheck(variant, len(after), missing_from(model, optimizer), unchanged)


def count_ops(step: Callable[[], object], names: Iterable[str] = (INT8_GEMM,)) -> dict[str, int]:
    """How many times each named aten op ran during ``step`` (torch profiler; compiled code included)."""
    from torch.profiler import ProfilerActivity, profile

    wanted = set(names)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts = Counter(e.name for e in prof.events() if e.name in wanted)
    return {n: counts.get(n, 0) for n in wanted}
