"""The controller's options: one frozen, validated value, checked once where it is made."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import nn

from adaprec.engine.execution import Backend
from adaprec.errors import UsageError
from adaprec.plan import ModulePrecision

__all__ = ["ControllerConfig", "Phase"]


class Phase(Enum):
    """Where a training step is: the protocol's little state machine (forward, backward, step)."""

    READY = "ready"  # before the forward pass (or after step())
    FORWARD = "forward"  # the forward pass ran inside ap.autocast()
    BACKWARD = "backward"  # ap.backward(loss) ran; step() is next


def _int_at_least(name: str, value: Any, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UsageError(f"{name} must be an int >= {low}{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class ControllerConfig:
    """Every option of :class:`~adaprec.AdaptivePrecision` but the model, optimizer and policy.

    Attributes:
        backend: ``"auto"`` (a format runs natively where the device probe
            found it native and faster than fp32, emulated elsewhere),
            ``"native"`` (natively wherever a kernel exists, even if slower) or
            ``"emulate"`` (every narrow format emulated in fp32: research mode).
        loss_scaling: ``None`` (on whenever the plan has an output gradient in
            a narrow format with no per-tensor scaling, e.g. fp16), ``True``
            or ``False``.
        monitor_every: sample numerical health every this many steps.
        energy_profile: device profile for the modeled energy (default ``"7nm"``).
        guard: wrap the policy in the guard (fallback on inf/NaN, overflow
            storms and loss spikes, with rollback of the bad step).
        shadow_every: every this many steps, when ``backward`` is given a
            ``recompute`` closure, recompute the gradient in fp32 and record
            its agreement with the low-precision one.
        seed: seed of the stochastic-rounding streams.
        module_filter: ``(module, fqn) -> bool``; False keeps a module fp32
            and out of every plan.
        pins: ``{fqn glob: preset or ModulePrecision}``; pinned modules keep
            that precision whatever the policy decides.
        quantize_embeddings: embeddings are pinned to fp32 unless True.
        total_steps, steps_per_epoch: tell schedule-based policies the run length.
        compile: fuse with ``torch.compile`` the emulation casts, and the packing and unpacking of
            narrow storage (saved tensors, optimizer moments): the same bits, seconds of one-off compile
            (cached on disk by inductor), several times faster per pass.
        hardware: ``"auto"`` probes the model's device (:func:`adaprec.hardware.probe`,
            cached) so policies choose only formats it runs natively and faster
            than fp32; a :class:`~adaprec.hardware.DeviceReport`; or None (no
            native narrow format: everything narrow is emulated).
        target: a device profile (e.g. ``"h100-sxm"``) to study instead of this
            device (research mode): policies may choose any format, formats this
            device lacks are emulated, and the ledger adds a figure labelled
            *simulated for* that target, kept apart from what ran.
        tune_allocator: on CPU, set glibc's mmap threshold once per process
            (:func:`adaprec.engine.allocator.tune_cpu_allocator`): raised (speed) where int8
            GEMMs run natively and fast (fresh pages for every large tensor cost more than
            such a GEMM, measured), else lowered to 1 MiB once the plan keeps saved tensors
            or optimizer state narrow (memory: what narrow storage saves goes back to the
            OS, at some step time for the page faults); an all-fp32 plan leaves glibc's
            defaults. Process-wide.
        distributed: under ``torch.distributed`` (``None``, the default: whenever a
            process group of 2+ ranks is initialised), every statistic the policy and
            the guard read is exchanged between ranks in one collective per step, so
            every rank takes the same decision; the plan each step ran under is checked
            to be the same on every rank; the ledger sums over ranks. ``True`` requires a
            process group; ``False`` lets each rank decide from its own statistics (no
            collective; plans may then diverge: for experiments only). The model may be
            wrapped in DistributedDataParallel (names stay the user's: ``fc1``, not
            ``module.fc1``) or sharded with ``fully_shard`` (FSDP2). See docs/distributed.md.
        rollback: keep a copy of the weights and optimizer state from before each update, so the
            guard can undo a step it sees a loss spike after (off by default: the copy costs as much
            memory as the weights and optimizer state; ``ap.report()`` prints its size). Without it a
            spike is skipped and the offending modules widened; inf/NaN steps need no copy (they are
            skipped before the optimizer applies them).
        count_bytes: count the bytes every op of a step moves (a dispatch-level count on some steps,
            replayed on the rest; :mod:`adaprec.energy.traffic_book`), so the ledger prices every byte;
            off, it prices the GEMMs' operands only (a lower bound, labelled so).
    """

    backend: str = "auto"
    loss_scaling: bool | None = None
    monitor_every: int = 10
    energy_profile: str = "7nm"
    guard: bool = True
    shadow_every: int | None = None
    seed: int = 0
    module_filter: Callable[[nn.Module, str], bool] | None = None
    pins: Mapping[str, str | ModulePrecision] = field(default_factory=dict)
    quantize_embeddings: bool = False
    total_steps: int | None = None
    steps_per_epoch: int | None = None
    compile: bool = False
    hardware: Any = "auto"
    target: str | None = None
    tune_allocator: bool = True
    distributed: bool | None = None
    rollback: bool = False
    count_bytes: bool = True

    def __post_init__(self) -> None:
        _int_at_least("monitor_every", self.monitor_every, 1)
        _int_at_least("shadow_every", self.shadow_every, 0, optional=True)
        _int_at_least("total_steps", self.total_steps, 1, optional=True)
        _int_at_least("steps_per_epoch", self.steps_per_epoch, 1, optional=True)
        if self.backend not in tuple(Backend):
            raise UsageError(f"backend must be 'auto', 'native' or 'emulate', got {self.backend!r}")
        if self.distributed not in (None, True, False):
            raise UsageError(f"distributed must be None (auto), True or False, got {self.distributed!r}")
        for name in ("rollback", "count_bytes", "guard", "quantize_embeddings", "compile", "tune_allocator"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.loss_scaling not in (None, True, False):
            raise UsageError(f"loss_scaling must be None (auto), True or False, got {self.loss_scaling!r}")
        if self.module_filter is not None and not callable(self.module_filter):
            raise UsageError("module_filter must be a callable (module, fqn) -> bool")
        if not isinstance(self.pins, Mapping):
            raise UsageError(f"pins must map fqn globs to presets or ModulePrecision, got {type(self.pins).__name__}")
        object.__setattr__(self, "pins", dict(self.pins))
        object.__setattr__(self, "backend", Backend(self.backend).value)

    @property
    def run_length(self) -> tuple[int | None, int | None]:
        """(total steps, steps per epoch): what schedule-based policies are told."""
        return self.total_steps, self.steps_per_epoch
