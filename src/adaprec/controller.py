"""AdaptivePrecision: the training-loop face that ties the parts together.

Protocol, one training step::

    ap = adaprec.AdaptivePrecision(model, optimizer, policy="error-budget")
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        with ap.autocast():                 # forward under the plan in force
            loss = loss_fn(model(x), y)
        ap.backward(loss)                   # loss scaling, gradient quantization
        result = ap.step()                  # unscale, inf/NaN check, guarded step,
                                            # monitors, policy, energy ledger
    print(ap.report())

``step()`` returns a :class:`StepResult` that says whether the optimizer
stepped and why not. Calling the methods out of order raises
:class:`~adaprec.errors.UsageError` instead of producing wrong numbers.

The model's parameters stay fp32 throughout: they are the master weights
the optimizer updates; only the compute sees narrower formats.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adaprec.distributed import (
    DistributedError,
    Packer,
    RankSync,
    alias_fsdp_params,
    fsdp_modules,
    is_sharded,
    local,
    world,
)
from adaprec.energy import EnergyLedger, MeasurementWindow, detect_meter
from adaprec.energy.counting import StepCost
from adaprec.engine import Capabilities, PrecisionEngine
from adaprec.engine.sites import unwrap
from adaprec.errors import CheckpointError, PlanError, UsageError
from adaprec.formats import get, quantize
from adaprec.formats.loss_scaling import DynamicLossScaler
from adaprec.monitor import HealthMonitor
from adaprec.plan import ModulePrecision, PlanChange, PrecisionPlan
from adaprec.policies import Policy, build, with_guard
from adaprec.timeline import Timeline

__all__ = ["AdaptivePrecision", "StepResult"]

# model -> the controller attached to it (weakly: a model that is garbage collected leaves)
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()

_WIDE_GRAD_FORMATS = {"fp32", "tf32", "bf16"}


@dataclass(frozen=True)
class StepResult:
    """What ``ap.step()`` did. Truthy when the optimizer stepped."""

    step: int
    stepped: bool
    reason: str
    loss: float
    loss_scale: float
    overflowed: tuple[str, ...] = ()
    rolled_back: bool = False
    changes: tuple[PlanChange, ...] = field(default_factory=tuple)

    @property
    def plan_changed(self) -> bool:
        return bool(self.changes)

    def __bool__(self) -> bool:
        return self.stepped


def _locals(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's local shard (FSDP2 DTensors); plain tensors as they are."""
    return [local(t) for t in tensors]


def _param_owners(model: nn.Module, modules: Sequence[str]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Module fqn -> its own parameters (direct and nested, by name prefix)."""
    owners: dict[str, list[tuple[str, nn.Parameter]]] = {m: [] for m in modules}
    by_len = sorted(modules, key=len, reverse=True)
    for pname, p in model.named_parameters():
        for m in by_len:
            if m == "" or pname.startswith(m + "."):
                owners[m].append((pname, p))
                break
    return owners


class AdaptivePrecision:
    """Trains ``model`` with per-layer precision decided by ``policy``.

    Args:
        model: an ``nn.Module``. Every matmul-like op it runs (linear,
            addmm, matmul/bmm, einsum, convolutions, attention, embedding,
            recurrent kernels) is recognised, whoever calls it, and
            attributed to the module owning its weight (or running it); the
            first forward pass finds them (or :meth:`prepare`). Ops adaprec
            cannot narrow run in fp32 and are counted and reported.
        optimizer: any torch optimizer over the model's (fp32) parameters.
        policy: a policy name (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp8"``,
            ``"fp8-hybrid"``, ``"schedule"``, ``"cyclic"``, ``"progressive"``,
            ``"gradient-diversity"``, ``"error-budget"``,
            ``"replay:timeline.json"``), a ``{"name": ..., **kwargs}`` dict, a
            :class:`PrecisionPlan` or a :class:`Policy`. Default ``"error-budget"``.
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
        compile: fuse the emulation casts with ``torch.compile`` (same
            bits, seconds of one-off compile, far faster stochastic rounding).
        hardware: ``"auto"`` probes the model's device (:func:`adaprec.hardware.probe`,
            cached) so policies choose only formats it runs natively and faster
            than fp32; a :class:`~adaprec.hardware.DeviceReport`; or None (no
            native narrow format: everything narrow is emulated).
        target: a device profile (e.g. ``"h100-sxm"``) to study instead of this
            device (research mode): policies may choose any format, formats this
            device lacks are emulated, and the ledger adds a figure labelled
            *simulated for* that target, kept apart from what ran.
        tune_allocator: on CPU, raise glibc's mmap threshold once per process
            (:func:`adaprec.engine.allocator.tune_cpu_allocator`): fresh pages for
            every large tensor cost more than an int8 GEMM (measured). Process-wide.
        distributed: under ``torch.distributed`` (``None``, the default: whenever a
            process group of 2+ ranks is initialised), every statistic the policy and
            the guard read is exchanged between ranks in one collective per step, so
            every rank takes the same decision; the plan each step ran under is checked
            to be the same on every rank; the ledger sums over ranks. ``True`` requires a
            process group; ``False`` lets each rank decide from its own statistics (no
            collective; plans may then diverge: for experiments only). The model may be
            wrapped in DistributedDataParallel (names stay the user's: ``fc1``, not
            ``module.fc1``) or sharded with ``fully_shard`` (FSDP2). See docs/distributed.md.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        policy: str | Mapping[str, Any] | PrecisionPlan | Policy = "error-budget",
        *,
        backend: str = "auto",
        loss_scaling: bool | None = None,
        monitor_every: int = 10,
        energy_profile: str = "7nm",
        guard: bool = True,
        shadow_every: int | None = None,
        seed: int = 0,
        module_filter: Callable[[nn.Module, str], bool] | None = None,
        pins: Mapping[str, str | ModulePrecision] | None = None,
        quantize_embeddings: bool = False,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        compile: bool = False,
        hardware: Any = "auto",
        target: str | None = None,
        tune_allocator: bool = True,
        distributed: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(monitor_every, int) or isinstance(monitor_every, bool) or monitor_every < 1:
            raise UsageError(f"monitor_every must be an int >= 1, got {monitor_every!r}")
        if backend not in ("auto", "emulate", "native"):
            raise UsageError(f"backend must be 'auto', 'native' or 'emulate', got {backend!r}")
        if distributed not in (None, True, False):
            raise UsageError(f"distributed must be None (auto), True or False, got {distributed!r}")
        inner = unwrap(model)  # inside a DDP / torch.compile wrapper: the user's module
        other = _ATTACHED.get(inner)
        if other is not None and other() is not None and not other()._closed:
            raise UsageError(
                f"this {type(model).__name__} already has an AdaptivePrecision attached; call ap.close() on it "
                "first (two controllers would both cast every op and count every GEMM twice)"
            )
        self.model = model
        self.optimizer = optimizer
        self.target = target
        device = next((p.device for p in model.parameters()), None)
        self.world = world(device=device) if distributed is not False else None
        if distributed is True and (self.world is None or self.world.size < 2):
            raise DistributedError(
                "distributed=True needs an initialised torch.distributed process group of 2 or more ranks: "
                "launch with torchrun (or adaprec run --nproc N) and call torch.distributed.init_process_group() "
                "before building AdaptivePrecision"
            )
        # one decision for all ranks: the statistics every decision reads are exchanged (adaprec.distributed)
        self._sync = RankSync(self.world) if self.world is not None and self.world.size > 1 else None
        if self._sync is not None and hardware == "auto":
            # policies choose among the formats the probe found fast: every rank must see the same list, so
            # rank 0 probes (timings of ranks sharing a machine would differ) and tells the others
            from adaprec.hardware import DeviceReport

            mine = self._probe(model, hardware, backend) if self._sync.world.rank == 0 else None
            shared = self._sync.ex.broadcast_object(None if mine is None else mine.to_dict())
            self.hardware = None if shared is None else DeviceReport.from_dict(shared)
        else:
            self.hardware = self._probe(model, hardware, backend)
        self.allocator = "glibc defaults (tune_allocator=False)"
        if tune_allocator and backend != "emulate" and not any(p.is_cuda for p in model.parameters()):
            from adaprec.engine.allocator import tune_cpu_allocator

            self.allocator = tune_cpu_allocator()[1]
        caps = Capabilities.from_report(self.hardware) if self.hardware is not None else Capabilities()
        self.engine = PrecisionEngine(
            model, backend=backend, module_filter=module_filter, seed=seed, compile=compile, capabilities=caps
        )
        if fsdp_modules(inner):  # FSDP2: the forward sees all-gathered parameters; tell the site map whose
            alias_fsdp_params(self.engine.map.owners, self.engine.map.names, inner)
        self.engine.on_new_site = self._on_new_site
        self.engine.probe_backward = True  # backward GEMMs go into the ledger as they run
        self._user_pins = dict(pins or {})
        self._quantize_embeddings = quantize_embeddings
        self._run_length = (total_steps, steps_per_epoch)
        base = build(policy)
        self.policy: Policy = with_guard(base) if guard else base
        self._template = PrecisionPlan()
        self.engine.set_plan(self.policy.setup(self._template, total_steps, steps_per_epoch))
        self._decided = False  # no decision yet: discovery may still set the policy up again
        self._finalized = False
        self.monitor = HealthMonitor(every=monitor_every)
        self._configure_monitor()
        self.engine.observer = self.monitor.observe_tensor
        self.loss_scaling = loss_scaling
        self.loss_scaler = DynamicLossScaler()
        self._scaling_for: tuple[PrecisionPlan | None, bool] = (None, False)
        self.timeline = Timeline()
        self.timeline.set_initial(self.engine.plan)
        self.energy = EnergyLedger(profile=energy_profile, target=target)
        if self._sync is not None:
            self.energy.world_size, self.energy.rank = self._sync.world.size, self._sync.world.rank
        self.meter, self.meter_reason = detect_meter()
        self._window = MeasurementWindow(self.meter) if self.meter is not None else None
        self.shadow_every = shadow_every
        self.shadow: dict[int, dict[str, tuple[float, float]]] = {}
        self._owners: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._sharded = any(is_sharded(p) for p in self._params)  # FSDP2: each rank holds shards
        self._prev_wall: float | None = None  # wall time of the last step, sent with the next exchange
        self._shadow_parts: dict[str, torch.Tensor] = {}  # a distributed shadow audit's sums, until exchanged
        self._backup: tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, str]]] | None = None
        # keep a pre-step copy only when something may ask to roll a step back
        self._guarded = hasattr(self.policy, "rollback_requested")
        self._step = 0
        self._epoch = 0
        self._phase = "ready"
        self._loss: torch.Tensor | None = None
        self._scale = 1.0
        self._unscaled: tuple[bool, tuple[str, ...]] | None = None  # set by unscale_()
        self._t0: float | None = None
        self._sync_cuda = any(p.is_cuda for p in model.parameters())
        self._closed = False
        self.inference_macs: dict[str, int] = {}  # MACs of ap.inference() passes, by executed format
        self._others_unscaled: set[int] = set()  # optimizers (other than ours) unscaled this step
        self._unscaled_ids: set[int] = set()  # their parameters
        self._warned_outside = False
        _ATTACHED[inner] = weakref.ref(self)

    # --- hardware and discovery ------------------------------------------------------
    @staticmethod
    def _probe(model: nn.Module, hardware: Any, backend: str) -> Any:
        """The device report policies choose formats from (None: no native narrow format)."""
        from adaprec.hardware import DeviceReport, probe

        if isinstance(hardware, DeviceReport):
            return hardware
        if hardware is None or hardware == "none":
            return None
        if hardware != "auto":
            raise UsageError(f"hardware must be 'auto', None or an adaprec.hardware.DeviceReport, got {hardware!r}")
        if backend == "emulate":
            return None
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return probe(device)

    def _allowed(self) -> tuple[dict[str, set[str]] | None, set[str]]:
        """Per module, the formats this device runs natively and faster (None: research mode)."""
        if self.target is not None or self.engine.backend == "emulate":
            return None, set()
        caps = self.engine.caps
        table = caps.native if self.engine.backend == "native" else caps.fast
        gemm, conv = set(table.get("gemm", ())), set(table.get("conv", ()))
        attention = set(table.get("attention", ()))
        floats16 = {"bf16", "fp16"}
        allowed: dict[str, set[str]] = {}
        coupled: set[str] = set()
        for name, site in self.engine.sites.items():
            if not site.covered:
                continue
            fmts = {"fp32", "int8", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"}
            for kind in site.kinds:
                if kind == "linear":
                    fmts &= gemm
                elif kind == "conv":
                    fmts &= conv & floats16
                elif kind == "embedding":
                    fmts &= {"fp32"}
                elif kind == "attention":  # fused attention kernels: measured on their own (bf16 may not pay)
                    fmts &= attention & floats16
                else:  # multi-head attention with its projections, matmul, einsum: cast to one 16-bit dtype
                    fmts &= gemm & floats16
            if site.kinds - {"linear"}:
                coupled.add(name)
            allowed[name] = fmts | {"fp32"}
        return allowed, coupled

    def _pins_now(self) -> dict[str, str | ModulePrecision]:
        names = list(self.engine.kinds)
        pins: dict[str, str | ModulePrecision] = {}
        if not self._quantize_embeddings:
            pins.update({n: "fp32" for n, s in self.engine.sites.items() if s.covered and s.kinds == {"embedding"}})
        for pattern, pin in self._user_pins.items():
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                pins[pattern] = pin
        return pins

    def _on_new_site(self, name: str) -> None:
        """The engine met a module that runs GEMMs: set the policy up again with it (before any decision)."""
        if self._decided:
            return
        self._template = PrecisionPlan.uniform(self.engine.kinds, "fp32", pins=self._pins_now())
        allowed, coupled = self._allowed()
        self.policy.restrict(allowed, coupled)
        self.engine.set_plan(self.policy.setup(self._template, *self._run_length))
        self._configure_monitor()
        self.timeline.set_initial(self.engine.plan)

    def _configure_monitor(self) -> None:
        """Measure what the policy may choose; a policy that chooses nothing from measurements (static,
        schedule) gets only the format in force measured (the guard's overflow check), and fp32 not at all."""
        wanted = self.policy.candidate_formats
        if wanted:
            self.monitor.set_candidates(wanted, self.policy.candidate_formats_by_role)
        else:
            self.monitor.set_candidates(())
        self.engine.observe_fp32 = bool(wanted)

    def _finalize(self) -> None:
        """After discovery: check the pins matched, say what the plan does not cover."""
        if self._finalized:
            return
        self._finalized = True
        names = list(self.engine.kinds)
        for pattern in self._user_pins:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise PlanError(
                    f"pin {pattern!r} matches no module that runs GEMMs; such modules are: {', '.join(names) or '(none)'}"
                )
        if not self.engine.sites:
            warnings.warn(
                f"adaprec: no matmul-like op ran in {type(self.model).__name__}'s forward pass: there is nothing to "
                "run under a precision plan, every step runs as plain fp32 and the ledger counts 0 MACs",
                stacklevel=3,
            )
        elif not names:
            warnings.warn(
                "adaprec: no module that runs GEMMs is under the plan (all filtered out or fused kernels): "
                f"{self.engine.uncovered}; training runs fp32",
                stacklevel=3,
            )
        elif all(n in self.plan.pinned for n in names):
            warnings.warn(
                "adaprec: every module that runs GEMMs is pinned, so the policy decides nothing; "
                "unpin some (pins=, quantize_embeddings=True) to let it",
                stacklevel=3,
            )
        self._owners = _param_owners(self.engine.map.model, names)  # the unwrapped model: the plan's names

    def prepare(self, *example_args: Any, **example_kwargs: Any) -> dict[str, str]:
        """Find every module that runs GEMMs with one forward pass (no grad, not counted) before training.

        Optional: the first training step does the same. Returns module -> op kind.
        """
        if self._decided:
            raise UsageError(
                "prepare() must come before the first ap.step(): the plan's modules are fixed once a step has "
                "run. A module that first ran later runs fp32; to put it under the plan, build a new "
                "AdaptivePrecision and call ap.prepare(example_batch) before its first step"
            )
        if not example_args and not example_kwargs:
            if self.engine.sites:
                self._finalize()
                return self.engine.kinds
            raise UsageError("prepare() needs an example batch: ap.prepare(x) runs model(x) once to find its GEMMs")
        self.engine.discover(*example_args, **example_kwargs)
        self._finalize()
        return self.engine.kinds

    # --- reading --------------------------------------------------------
    @property
    def plan(self) -> PrecisionPlan:
        """The plan in force for the next forward pass."""
        return self.engine.plan

    @property
    def sampling_next(self) -> bool:
        """Whether the next step measures tensor statistics (Python observers run inside its GEMMs).

        Under ``torch.compile`` such a step cannot be one graph: run it on the
        eager model (``net = model if ap.sampling_next else compiled``).
        """
        return self.monitor.should_sample(self._step) or self.policy.wants_sample(self._step)

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def epoch(self) -> int:
        return self._epoch

    # --- the protocol -----------------------------------------------------
    @contextlib.contextmanager
    def autocast(self, enabled: bool = True) -> Iterator[None]:
        """Run the forward pass inside under the current plan.

        Entered with gradients off (``torch.no_grad()`` / ``torch.inference_mode()``
        around it) it is :meth:`inference`: evaluation under the plan, any number of
        times, that leaves the training step alone.
        """
        if not torch.is_grad_enabled():
            with self.inference(enabled):
                yield
            return
        if self._phase == "backward":
            raise UsageError("autocast() entered again before step(): call ap.step() after ap.backward(loss)")
        if self._phase == "forward":
            raise UsageError("autocast() entered twice before backward(): one forward pass per step, then ap.backward(loss)")
        if self.engine._in_mode:
            raise UsageError("autocast() is already active: do not nest `with ap.autocast():` blocks")
        sampling = enabled and self.sampling_next
        self.engine.begin_step(self._step, sampling)
        started = self._t0 is None
        if started:
            self._t0 = time.perf_counter()
        with self.engine.activate(enabled):
            yield
        if enabled and self.engine.grad_ops == 0 and self.engine.nograd_ops > 0:
            # `with ap.autocast(), torch.no_grad():` an evaluation pass, not a step's forward: training is left alone
            cost, self.engine._cost = self.engine._cost, StepCost()  # kept apart from the ledger of steps
            self.engine._pending.clear()
            for fmt, n in cost.macs_by_format().items():
                self.inference_macs[fmt] = self.inference_macs.get(fmt, 0) + n
            self.engine.pop_faults()
            if started:
                self._t0 = None
            return
        if self._window is not None and self._step == 0:
            self._window.start()
        self._phase = "forward"

    @contextlib.contextmanager
    def inference(self, enabled: bool = True) -> Iterator[None]:
        """Evaluate or serve the model under the plan in force, without gradients, as often as you like.

        The model computes exactly as in a training forward pass (same formats,
        nearest-rounded where the plan rounds stochastically only in noise, which
        is deterministic for a step), but nothing of training moves: not the
        step, its phase, the monitors, the policy nor the ledger of training
        steps. Inference MACs are counted apart, in ``ap.inference_macs`` (by
        executed format). Allowed at any point, also between a step's forward
        and its backward.
        """
        engine = self.engine
        if engine._in_mode:
            raise UsageError("ap.inference() inside an active ap.autocast(): leave the training forward first")
        saved = (engine.sampling, engine._calls, engine._region_calls, engine._cost, engine._pending,
                 engine._faults, engine._weight_cache, engine._cast_cache)
        engine.sampling = False
        engine._calls, engine._region_calls, engine._cost, engine._pending = {}, {}, StepCost(), []
        engine._faults, engine._weight_cache, engine._cast_cache = [], {}, {}
        try:
            with torch.no_grad(), engine.activate(enabled):
                yield
        finally:
            cost = engine._cost
            (engine.sampling, engine._calls, engine._region_calls, engine._cost, engine._pending,
             engine._faults, engine._weight_cache, engine._cast_cache) = saved
            for fmt, n in cost.macs_by_format().items():
                self.inference_macs[fmt] = self.inference_macs.get(fmt, 0) + n

    @contextlib.contextmanager
    def not_counted(self) -> Iterator[None]:
        """Leave the forward passes inside out of the energy ledger.

        For evaluation between training steps: it runs outside the plan (fp32)
        and is no part of a step's cost, but the MAC counter's hooks would
        otherwise charge it to the next step.
        """
        with self.engine.not_counted():
            yield

    def _scaling_needed(self) -> bool:
        if self.loss_scaling is not None:
            return self.loss_scaling
        plan = self.plan
        if self._scaling_for[0] is not plan:  # asked twice a step; plans change rarely
            need = any(
                mp.grad_output.scaling == "none" and mp.grad_output.format not in _WIDE_GRAD_FORMATS
                for mp in plan.modules.values()
            )
            self._scaling_for = (plan, need)
        return self._scaling_for[1]

    def backward(self, loss: torch.Tensor, recompute: Callable[[], torch.Tensor] | None = None) -> None:
        """Backward pass of ``loss`` with the loss scale applied.

        ``recompute``: optional closure returning the same loss again; on
        shadow-audit steps it is re-run in fp32 to measure gradient error.
        """
        if self._phase != "forward":
            raise UsageError(
                "backward() needs a forward pass inside `with ap.autocast():` first"
                if self._phase == "ready"
                else "backward() called twice without step(): call ap.step() between them"
            )
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise UsageError("backward() needs the scalar loss tensor")
        self._scale = self.loss_scaler.scale() if self._scaling_needed() else 1.0
        self._loss = loss.detach()
        try:
            # checkpointed blocks recomputed in backward run under the plan, as in their forward pass
            with self.engine.backward_scope():
                (loss * self._scale if self._scale != 1.0 else loss).backward()
        except BaseException:
            # the step is abandoned, not half-done: the next `with ap.autocast():` starts it again
            self._abandon_step()
            raise
        self.engine.commit_backward()
        if (
            recompute is not None
            and self.shadow_every
            and self._step % self.shadow_every == 0
        ):
            self._shadow_audit(recompute)
        self._phase = "backward"

    def _abandon_step(self) -> None:
        """A backward pass raised: forget the step's forward (its cost too) so the controller stays usable."""
        self._phase = "ready"
        self._loss = None
        self._unscaled = None
        self._others_unscaled, self._unscaled_ids = set(), set()
        self._t0 = None
        self.engine.pop_step_cost()
        self.engine.pop_faults()

    def _grads(self) -> list[torch.Tensor]:
        return [local(p.grad) for p in self._params if p.grad is not None]

    def _unscale_and_check(self) -> bool:
        grads = self._grads()
        found = torch.zeros(1)
        if grads:
            inv = torch.tensor(1.0 / self._scale)
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for g in grads:
                by_device.setdefault(g.device, []).append(g)
            for dev, gs in by_device.items():
                f = torch.zeros(1, device=dev)
                torch._amp_foreach_non_finite_check_and_unscale_(gs, f, inv.to(dev))
                found += f.cpu()
        return bool(found.item() > 0)

    def _overflowed_modules(self) -> tuple[str, ...]:
        bad = []
        for m, params in self._owners.items():
            if any(p.grad is not None and not torch.isfinite(local(p.grad)).all() for _, p in params):
                bad.append(m)
        return tuple(bad)

    def _state_tensors(self) -> tuple[list[tuple[int, str]], list[torch.Tensor]]:
        keys, tensors = [], []
        for i, p in enumerate(self._params):
            for k, v in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(v):
                    keys.append((i, k))
                    tensors.append(local(v))
        return keys, tensors

    def _save_backup(self) -> None:
        """Copy master weights and optimizer state into reused buffers (one fused copy each)."""
        params = _locals([p.detach() for p in self._params])
        keys, state = self._state_tensors()
        if self._backup is None or self._backup[2] != keys:
            self._backup = ([p.clone() for p in params], [v.detach().clone() for v in state], keys)
        else:
            torch._foreach_copy_(self._backup[0], params)
            if state:
                torch._foreach_copy_(self._backup[1], state)

    def _restore_backup(self) -> bool:
        """Put back the weights and optimizer state saved before the last optimizer step."""
        if self._backup is None:
            return False
        weights, state, keys = self._backup
        with torch.no_grad():
            torch._foreach_copy_(_locals([p.detach() for p in self._params]), weights)
            now_keys, now = self._state_tensors()
            if now_keys == keys:
                if state:
                    torch._foreach_copy_(now, state)
            else:  # the state was created after the backup (first step): drop it, as it was
                saved = {i for i, _ in keys}
                for i, p in enumerate(self._params):
                    if i not in saved:
                        self.optimizer.state.pop(p, None)
        return True

    def unscale_(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Divide the gradients by the loss scale now, so they can be clipped or inspected before ``step()``.

        Optional, as ``torch.amp.GradScaler.unscale_``: ``step()`` unscales by
        itself otherwise, and does not unscale twice. Calling it again before
        ``step()`` changes nothing. Returns True when a gradient is inf/NaN
        (``step()`` will then skip the update).

        ``optimizer``: another optimizer the loop steps by hand (a second one over
        other parameters, as GradScaler takes one ``unscale_(opt)`` per optimizer):
        its gradients are unscaled too, once. Step it after this call.
        """
        if self._phase != "backward":
            raise UsageError("unscale_() needs ap.backward(loss) first; call it between backward() and step()")
        if optimizer is not None and optimizer is not self.optimizer:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise UsageError(f"unscale_(optimizer) takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
            if id(optimizer) in self._others_unscaled:
                return False
            self._others_unscaled.add(id(optimizer))
            mine = {id(p) for p in self._params}
            grads = [local(p.grad) for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None and id(p) not in mine]
            found = torch.zeros(1)
            if grads and self._scale != 1.0:
                by_device: dict[torch.device, list[torch.Tensor]] = {}
                for g in grads:
                    by_device.setdefault(g.device, []).append(g)
                for dev, gs in by_device.items():
                    f = torch.zeros(1, device=dev)
                    torch._amp_foreach_non_finite_check_and_unscale_(gs, f, torch.tensor(1.0 / self._scale, device=dev))
                    found += f.cpu()
            self._unscaled_ids.update(id(p) for g in optimizer.param_groups for p in g["params"])
            return bool(found.item() > 0)
        if self._unscaled is None:
            nonfinite = self._unscale_and_check()
            # name the overflowing modules now: clipping an inf gradient spreads NaN to every module
            self._unscaled = (nonfinite, self._overflowed_modules() if nonfinite else ())
        return self._unscaled[0]

    def _warn_outside(self) -> None:
        """Once: gradients of trainable parameters no known optimizer holds stay multiplied by the loss scale."""
        if self._warned_outside or self._scale == 1.0:
            return
        mine = {id(p) for p in self._params} | self._unscaled_ids
        outside = [n for n, p in self.engine.map.model.named_parameters()
                   if p.requires_grad and p.grad is not None and id(p) not in mine]
        if outside:
            self._warned_outside = True
            warnings.warn(
                f"adaprec: {len(outside)} trainable parameter(s) ({', '.join(outside[:3])}"
                f"{', ...' if len(outside) > 3 else ''}) belong to no optimizer adaprec knows: their gradients "
                f"are still multiplied by the loss scale ({self._scale:g}). Call ap.unscale_(other_optimizer) "
                "before stepping that optimizer, as with torch.amp.GradScaler",
                stacklevel=3,
            )

    def step(self) -> StepResult:
        """Unscale (unless ``unscale_()`` did), check, step (or skip or roll back), then monitor, decide, account."""
        if self._phase != "backward":
            raise UsageError("step() needs ap.backward(loss) first (forward inside ap.autocast(), then backward)")
        self._finalize()
        self._decided = True
        self._warn_outside()
        self._others_unscaled, self._unscaled_ids = set(), set()
        step = self._step
        plan_used = self.plan
        unscaled, self._unscaled = self._unscaled, None
        nonfinite = unscaled[0] if unscaled is not None else self._unscale_and_check()
        loss = float(self._loss) if self._loss is not None else math.nan
        sampled = self.engine.sampling
        overflowed: tuple[str, ...] = ()
        # a cast that met inf/NaN would hide it (int8 and saturating formats clip): the fault is the engine's to report
        cast_faults = self.engine.pop_faults()
        if self._sync is not None:  # every rank: the same loss, flags, faults and statistics from here on
            nonfinite, loss, cast_faults, overflowed = self._exchange(
                step, plan_used, sampled, nonfinite, loss, cast_faults, unscaled
            )
            bad = nonfinite or not math.isfinite(loss) or bool(cast_faults)
        else:
            bad = nonfinite or not math.isfinite(loss) or bool(cast_faults)
            if bad:
                overflowed = unscaled[1] if unscaled is not None and nonfinite else self._overflowed_modules()
                overflowed = tuple(dict.fromkeys(overflowed + tuple(m for m, _ in cast_faults)))
        if bad:
            nonfinite = True
        else:
            self.monitor.observe_loss(loss)
            if sampled and self._sync is None:
                for m, p in self._weight_params():
                    self.monitor.observe_grads(m, p.grad)
        if self._scale != 1.0 or self._scaling_needed():
            self.loss_scaler.update(nonfinite)
        cause = ""
        if nonfinite:
            cause = "loss" if not math.isfinite(loss) else ("cast" if cast_faults else "gradients")
        snap = self.monitor.snapshot(
            step, self._epoch, plan_used, nonfinite=nonfinite, overflowed=overflowed, nonfinite_cause=cause
        )
        new_plan = self.policy.decide(snap, step)
        rollback = bool(getattr(self.policy, "rollback_requested", False))
        stepped = False
        rolled_back = False
        if nonfinite:
            if not math.isfinite(loss):  # the forward pass already failed: the casts backward only met its NaN
                reason = f"skipped: inf/NaN in the loss ({loss}), from the forward pass"
            elif cast_faults:
                where = ", ".join(f"{r} of {m or '<root>'}" for m, r in cast_faults)
                reason = f"skipped: inf/NaN in the {where} before its cast"
            else:
                reason = "skipped: inf/NaN in gradients" + (f" of {', '.join(overflowed)}" if overflowed else "")
        elif rollback:
            self.monitor.discard_last_loss()  # an undone step's loss must not shift the trend later steps face
            rolled_back = self._restore_backup()
            what = getattr(self.policy, "incident", None) or "an incident"
            reason = f"rolled back: guard saw {what}" if rolled_back else f"skipped: guard saw {what}"
        else:
            if self._guarded:
                self._save_backup()
            self.optimizer.step()
            self._quantize_optimizer_state()
            stepped = True
            reason = "ok"
        changes: tuple[PlanChange, ...] = ()
        if new_plan != plan_used:
            changes = tuple(plan_used.diff(new_plan))
            reasons = dict(getattr(self.policy, "last_reasons", {}) or {})
            who = "guard" if getattr(self.policy, "incident", None) else self.policy.name
            self.timeline.record_plan_change(step, plan_used, new_plan, who, reasons)
            self.engine.set_plan(new_plan)
        self._account(step, plan_used)
        self._step += 1
        self._phase = "ready"
        self._loss = None
        return StepResult(
            step=step,
            stepped=stepped,
            reason=reason,
            loss=loss,
            loss_scale=self._scale,
            overflowed=overflowed,
            rolled_back=rolled_back,
            changes=changes,
        )

    def _weight_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Per module, the weight whose gradient the monitor reads (norm, diversity)."""
        for m, params in self._owners.items():
            for pname, p in params:
                if pname.endswith("weight") and p.grad is not None:
                    yield m, p
                    break

    def _exchange(
        self,
        step: int,
        plan: PrecisionPlan,
        sampled: bool,
        nonfinite: bool,
        loss: float,
        cast_faults: list[tuple[str, str]],
        unscaled: tuple[bool, tuple[str, ...]] | None,
    ) -> tuple[bool, float, list[tuple[str, str]], tuple[str, ...]]:
        """The step's one collective (adaprec.distributed): what every rank's decision reads, reduced.

        Returns the flags the guard reads, the same on every rank: whether some
        rank's gradients held inf/NaN, the mean loss over ranks, the cast faults
        of all ranks and the overflowing modules of all ranks (the last two from
        a second, small exchange, only on a step with inf/NaN somewhere).
        """
        sync = self._sync
        assert sync is not None
        packer = None
        if sampled:
            packer = Packer()
            for m, p in self._weight_params():
                self.monitor.stage_grads(m, p.grad, sharded=is_sharded(p.grad))
            self.monitor.pack(packer)
            for m in sorted(self._shadow_parts):
                packer.add(f"s|{m}", self._shadow_parts[m], "sum" if self._sharded else "max")
        row = self._price(step, plan)
        red = sync.exchange(
            step, sites=self.engine.sites, plan=plan, sampled=sampled, loss=loss, nonfinite=nonfinite,
            faults=len(cast_faults), energy=EnergyLedger.world_vector(row), prev_wall=self._prev_wall,
            payload=packer,
        )
        self.energy.set_world(step, red.energy)
        if self._prev_wall is not None:
            self.energy.set_world_wall(step - 1, red.prev_wall)
        self._prev_wall = None
        bad = red.nonfinite or not math.isfinite(red.loss) or red.faults > 0
        if packer is not None:
            self.monitor.unpack(red.payload, grads_ok=not bad)
            if self._shadow_parts:
                self._observe_shadow({m: red.payload[f"s|{m}"] for m in self._shadow_parts})
        self._shadow_parts = {}
        faults: list[tuple[str, str]] = []
        overflowed: tuple[str, ...] = ()
        if bad:  # name the modules: every rank's, so every rank reports (and the guard raises) the same
            mine = unscaled[1] if unscaled is not None and nonfinite else self._overflowed_modules()
            items = sync.union([("grad", m, "") for m in mine] + [("cast", m, r) for m, r in cast_faults])
            faults = sorted((m, r) for kind, m, r in items if kind == "cast")
            over = tuple(m for m in self.engine.kinds if ("grad", m, "") in items)
            overflowed = tuple(dict.fromkeys(over + tuple(m for m, _ in faults)))
        return red.nonfinite, red.loss, faults, overflowed

    def end_epoch(self) -> None:
        """Tell epoch-based policies (progressive, gradient-diversity) that an epoch ended."""
        self._epoch += 1
        self.monitor.end_epoch()

    # --- parts of step ----------------------------------------------------
    def _price(self, step: int, plan: PrecisionPlan) -> dict[str, Any]:
        """Record the step's cost in the ledger now (a distributed step sends its figures with the exchange)."""
        cost = self.engine.pop_step_cost()
        return self.energy.record(step, plan, cost, measured_reason=self.meter_reason if self._window is None else None)

    def _account(self, step: int, plan: PrecisionPlan) -> None:
        wall = None
        if self._t0 is not None:
            if self._sync_cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - self._t0
            self._t0 = None
        if self._sync is not None:  # priced before the exchange; its wall time travels with the next one
            self.energy.set_wall(step, wall)
            self._prev_wall = wall
        else:
            cost = self.engine.pop_step_cost()
            self.energy.record(
                step, plan, cost, measured_reason=self.meter_reason if self._window is None else None, wall_s=wall
            )
        if self._window is not None:
            closed = self._window.step_done(step)
            if closed:
                self.energy.attribute_measured(closed, self.meter.name)

    def flush_energy(self) -> None:
        """Close a partial measurement window so the last steps get measured figures too."""
        if self._window is not None:
            closed = self._window.flush()
            if closed:
                self.energy.attribute_measured(closed, self.meter.name)

    def _quantize_optimizer_state(self) -> None:
        for m, params in self._owners.items():
            fmt = self.plan.get(m).optimizer_state
            if fmt == "fp32":
                continue
            f = get(fmt)
            for _, p in params:
                for v in self.optimizer.state.get(p, {}).values():
                    v = local(v)  # FSDP2: this rank's shard of the state
                    if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0:
                        v.copy_(quantize(v, f, "nearest", saturate=True))

    def _shadow_audit(self, recompute: Callable[[], torch.Tensor]) -> None:
        low = {id(p): local(p.grad).detach().clone() / self._scale for p in self._params if p.grad is not None}
        saved = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        recompute().backward()
        audit: dict[str, tuple[float, float]] = {}
        parts: dict[str, torch.Tensor] = {}
        for m, params in self._owners.items():
            pairs = [(low[id(p)], local(p.grad)) for _, p in params if id(p) in low and p.grad is not None]
            if not pairs:
                continue
            a = torch.cat([x.flatten() for x, _ in pairs])
            b = torch.cat([y.flatten() for _, y in pairs])
            if self._sync is not None:  # the sums travel with the step's exchange (added over FSDP2 shards)
                a64, b64 = a.double(), b.double()
                parts[m] = torch.stack([a64 @ b64, a64 @ a64, b64 @ b64, (a64 - b64).square().sum()])
                continue
            cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
            audit[m] = (cos, rel)
        for p, g in zip(self._params, saved, strict=True):
            p.grad = g
        if self._sync is not None:
            self._shadow_parts = parts
            return
        self._observe_shadow_audit(audit)

    def _observe_shadow(self, sums: Mapping[str, Sequence[float]]) -> None:
        """A distributed shadow audit: cosine and relative error from the sums of all ranks."""
        audit = {}
        for m, (ab, aa, bb, dd) in sums.items():
            cos = ab / max(math.sqrt(aa) * math.sqrt(bb), 1e-8)
            audit[m] = (cos, math.sqrt(dd) / max(math.sqrt(bb), 1e-30))
        self._observe_shadow_audit(audit)

    def _observe_shadow_audit(self, audit: dict[str, tuple[float, float]]) -> None:
        self.shadow[self._step] = audit
        if hasattr(self.monitor, "observe_shadow"):
            self.monitor.observe_shadow(audit)

    # --- reporting --------------------------------------------------------
    def report(self) -> str:
        """A short human-readable account: coverage, what ran natively, plan changes, time and energy."""
        self.flush_energy()
        s = self.energy.summary()
        cov = s["coverage"]
        lines = [
            f"adaprec: {self._step} steps, policy {self.policy.name}, backend {self.engine.backend}",
            f"plan now: {self.plan.summary()}",
            f"coverage: {100 * cov:.1f} % of {s['macs']:,} MACs under the plan"
            + ("".join(f"\n  fp32, not covered: {m or '<root>'}: {why}" for m, why in s["uncovered"].items())),
            "ran natively: " + (", ".join(s["native_formats"]) or "fp32 only")
            + (f"; emulated: {', '.join(s['emulated_formats'])}" if s["emulated_formats"] else ""),
            f"narrow MACs (run natively below 32 bits): {100 * s['narrow_mac_fraction']:.1f} %"
            + (f"; emulated: {100 * s['emulated_mac_fraction']:.1f} %" if s["emulated_mac_fraction"] else ""),
            f"precision changes recorded: {len(self.timeline.events)}",
            f"world size: {s.get('world_size', 1)}"
            + (" (statistics reduced over ranks before every decision; MACs, energy and wall time summed over "
               "ranks)" if s.get("world_size", 1) > 1 else ""),
            f"device: {self.hardware.name if self.hardware is not None else 'not probed'}; allocator: {self.allocator}",
            (f"wall time, measured: {s['wall_s']:.3f} s over {s['timed_steps']} steps" if s["wall_s"] is not None
             else "wall time: not measured"),
            f"energy, {s['kind']['modeled_j']}: {s['modeled_j']:.4g} J; fp32 would be {s['fp32_modeled_j']:.4g} J"
            f" (saving {100 * (s['saving_vs_fp32'] or 0):.1f} %), static bf16 {s['bf16_modeled_j']:.4g} J",
            "measured: "
            + (f"{s['measured_j']:.4g} J" if s.get("measured_j") is not None else f"n/a ({s.get('measured_reason')})"),
        ]
        sim = s.get("simulated")
        if sim:
            lines.append(f"{sim['label']}: {sim['modeled_j']:.4g} J vs fp32 {sim['fp32_modeled_j']:.4g} J "
                         f"(saving {100 * sim['saving_vs_fp32']:.1f} %)")
        return "\n".join(lines)

    # --- state --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly (the model and optimizer are saved by the caller)."""
        return {
            "version": 2,
            "step": self._step,
            "epoch": self._epoch,
            "decided": self._decided,
            "template": self._template.to_dict(),
            "engine": self.engine.state_dict(),
            "policy": self.policy.state_dict(),
            "monitor": self.monitor.state_dict(),
            "loss_scaler": self.loss_scaler.state_dict(),
            "timeline": self.timeline.state_dict(),
            "energy": self.energy.state_dict(),
            # the copy of the last step's starting point a guard rollback would restore: without it, a
            # spike seen on the first step after a resume could only be skipped, not rolled back
            "world_size": self._sync.world.size if self._sync is not None else 1,
            # the parameter shapes this state was saved with: a state of another model is refused whole
            "params": [[n, list(p.shape)] for n, p in self.engine.map.model.named_parameters()],  # global (FSDP) shapes
            "rollback": None if self._backup is None else {
                "world_size": self._sync.world.size if self._sync is not None else 1,
                "sharded": self._sharded,
                "weights": [t.clone() for t in self._backup[0]],
                "state": [t.clone() for t in self._backup[1]],
                "keys": [[i, k] for i, k in self._backup[2]],
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore everything ``state_dict()`` saved: all of it, or (on a bad state) nothing."""
        if not isinstance(state, Mapping):
            raise CheckpointError(f"adaprec state must be the dict AdaptivePrecision.state_dict() returned, got {type(state).__name__}")
        required = ("step", "epoch", "engine", "policy", "monitor", "loss_scaler", "timeline", "energy", "template")
        missing = [k for k in required if k not in state]
        if missing:
            raise CheckpointError(
                f"adaprec state dict lacks {missing}; pass the dict returned by AdaptivePrecision.state_dict()"
            )
        self._check_params(state.get("params"))
        before = self.state_dict()
        try:
            self._load(state)
        except Exception as e:
            self._load(before)
            if isinstance(e, CheckpointError):
                raise CheckpointError(f"{e}; nothing was changed") from e.__cause__
            raise CheckpointError(
                f"adaprec state does not fit this model, optimizer or configuration ({type(e).__name__}: {e}); "
                "nothing was changed. Load a state saved by the same set-up"
            ) from e

    def _check_params(self, saved: Any) -> None:
        """Refuse, before touching anything, a state saved with parameters of other names or shapes."""
        if saved is None:  # a state of an older adaprec: the later checks still catch what they can
            return
        here = {n: list(p.shape) for n, p in self.engine.map.model.named_parameters()}
        try:
            there = {str(n): [int(d) for d in shape] for n, shape in saved}
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"adaprec state has an unreadable parameter list ({e}); nothing was changed") from None
        diff = [f"{n}: saved {there.get(n)}, here {here.get(n)}" for n in sorted(set(here) | set(there))
                if here.get(n) != there.get(n)]
        if diff:
            raise CheckpointError(
                "adaprec state was saved with another model (" + "; ".join(diff[:4])
                + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
                + "); nothing was changed. Load the state saved with this model"
            )

    def _load(self, state: Mapping[str, Any]) -> None:
        step, epoch = int(state["step"]), int(state["epoch"])
        self.engine.load_state_dict(state["engine"])
        self._template = PrecisionPlan.from_dict(state["template"])
        allowed, coupled = self._allowed()
        self.policy.restrict(allowed, coupled)
        plan = self.engine.plan
        self.policy.setup(self._template, *self._run_length)
        self.engine.set_plan(plan)
        self.policy.load_state_dict(state["policy"])
        self._configure_monitor()
        self.monitor.load_state_dict(state["monitor"])
        self.loss_scaler.load_state_dict(state["loss_scaler"])
        self.timeline.load_state_dict(state["timeline"])
        self.energy.load_state_dict(state["energy"])
        backup = self._load_backup(state.get("rollback"))
        self._prev_wall = None
        self._shadow_parts = {}
        self._step, self._epoch = step, epoch
        self._decided = bool(state.get("decided", step > 0))
        self._finalized = False
        if self.engine.sites:
            self._finalize()
        self._phase = "ready"
        self._backup = backup
        self._unscaled = None
        self._t0 = None

    def _load_backup(self, saved: Mapping[str, Any] | None) -> tuple[list, list, list] | None:
        if saved is None:
            return None
        here = self._sync.world.size if self._sync is not None else 1
        if (saved.get("sharded") or self._sharded) and int(saved.get("world_size", 1)) != here:
            # FSDP2 shards of another world size: this copy cannot be put back here (it only serves a guard
            # rollback of the very next step; that step can still be skipped)
            warnings.warn(
                f"adaprec: the rollback copy in this state holds FSDP shards of {saved.get('world_size', 1)} ranks, "
                f"this run has {here}: it is dropped (a guard incident on the next step is skipped, not rolled back)",
                stacklevel=3,
            )
            return None
        try:
            locals_ = _locals(self._params)
            weights = [w.to(p.device, p.dtype) for w, p in zip(saved["weights"], locals_, strict=True)]
            bad = [i for i, (w, p) in enumerate(zip(weights, locals_, strict=True)) if w.shape != p.shape]
            if bad:
                raise ValueError(f"parameter {bad[0]} has shape {tuple(locals_[bad[0]].shape)}, the saved copy "
                                 f"{tuple(weights[bad[0]].shape)}")
            keys = [(int(i), str(k)) for i, k in saved["keys"]]
            state = [v.to(self._params[i].device) for v, (i, _) in zip(saved["state"], keys, strict=True)]
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise CheckpointError(
                f"adaprec rollback copy does not fit this model and optimizer ({e}); "
                "load the state saved with the same model and optimizer"
            ) from None
        return weights, state, keys

    def close(self) -> None:
        """Remove every hook adaprec put on the model (another AdaptivePrecision may then take it)."""
        self.engine.remove()
        self._closed = True
        inner = unwrap(self.model)
        ref = _ATTACHED.get(inner)
        if ref is not None and ref() is self:
            del _ATTACHED[inner]
