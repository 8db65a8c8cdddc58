"""AdaptivePrecision: the training-loop face. It composes the parts and runs a step's stages in order.

Protocol, one training step::

    ap = adaprec.AdaptivePrecision(model, optimizer, policy="error-budget")
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        with ap.autocast():                 # forward under the plan in force
            loss = loss_fn(model(x), y)
        ap.backward(loss)                   # loss scaling; backward GEMMs in their planned formats
        result = ap.step()                  # unscale, inf/NaN check, guarded step, monitors, policy, ledger
    print(ap.report())

``step()`` returns a :class:`StepResult` that says whether the optimizer
stepped and why not. Calling the methods out of order raises
:class:`~adaprec.errors.UsageError` instead of producing wrong numbers. The
model's parameters stay fp32 throughout: they are the master weights the
optimizer updates.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adaprec.controller import state as saved_state
from adaprec.controller.books import Books
from adaprec.controller.config import ControllerConfig, Phase
from adaprec.controller.gradients import GradientCheck, LocalView, StepHealth, param_owners
from adaprec.controller.optimizer_state import OptimizerStates
from adaprec.controller.reducer import make_reducer
from adaprec.controller.report import report_lines
from adaprec.controller.rollback import Rollback
from adaprec.controller.saved import SavedByPlan
from adaprec.controller.setup import PlanSetup, build_engine, loss_scaling_needed
from adaprec.controller.shadow import ShadowAudit
from adaprec.controller.speed_check import SpeedCheck
from adaprec.controller.step_bytes import StepBytes
from adaprec.controller.update import Update
from adaprec.distributed import is_sharded
from adaprec.energy import EnergyLedger
from adaprec.engine.sites import unwrap
from adaprec.errors import UsageError
from adaprec.formats import compiled
from adaprec.formats.loss_scaling import DynamicLossScaler
from adaprec.monitor import HealthMonitor
from adaprec.optim import fused_adam
from adaprec.plan import ModulePrecision, PlanChange, PrecisionPlan
from adaprec.policies import Policy, build, with_guard
from adaprec.timeline import Timeline

__all__ = ["AdaptivePrecision", "StepResult"]

# model -> the controller attached to it (weakly: a model that is garbage collected leaves)
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


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


def _attachable(model: Any, optimizer: Any) -> nn.Module:
    """The user's module inside any DDP / compile wrapper, checked free of another controller."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    inner = unwrap(model)
    other = _ATTACHED.get(inner)
    if other is not None and other() is not None and not other()._closed:
        raise UsageError(
            f"this {type(model).__name__} already has an AdaptivePrecision attached; call ap.close() on it "
            "first (two controllers would both cast every op and count every GEMM twice)"
        )
    return inner


class AdaptivePrecision:
    """Trains ``model`` with per-layer precision decided by ``policy``.

    Args:
        model: an ``nn.Module``. Every matmul-like op it runs (linear, addmm, matmul/bmm, einsum, convolution,
            attention, embedding, recurrent kernels) is recognised, whoever calls it, and attributed to the
            module owning its weight (or running it); ops adaprec cannot narrow run fp32, counted, reported.
        optimizer: any torch optimizer over the model's (fp32) parameters.
        policy: a policy name (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp8"``, ``"fp8-hybrid"``,
            ``"schedule"``, ``"cyclic"``, ``"progressive"``, ``"gradient-diversity"``, ``"error-budget"``,
            ``"replay:timeline.json"``), a ``{"name": ..., **kwargs}`` dict, a :class:`PrecisionPlan` or a
            :class:`Policy`. Default ``"error-budget"``.
        backend, loss_scaling, monitor_every, energy_profile, guard, shadow_every, seed, module_filter,
            pins, quantize_embeddings, total_steps, steps_per_epoch, compile, hardware, target,
            tune_allocator, distributed, rollback, count_bytes: keyword-only options, each documented with its default in
            :class:`ControllerConfig` (one frozen, validated value: ``ap.config``).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer,
        policy: str | Mapping[str, Any] | PrecisionPlan | Policy = "error-budget", *,
        backend: str = "auto", loss_scaling: bool | None = None, monitor_every: int = 10,
        energy_profile: str = "7nm", guard: bool = True, shadow_every: int | None = None, seed: int = 0,
        module_filter: Callable[[nn.Module, str], bool] | None = None,
        pins: Mapping[str, str | ModulePrecision] | None = None, quantize_embeddings: bool = False,
        total_steps: int | None = None, steps_per_epoch: int | None = None, compile: bool = False,
        hardware: Any = "auto", target: str | None = None, tune_allocator: bool = True,
        distributed: bool | None = None, rollback: bool = False, count_bytes: bool = True,
    ) -> None:
        inner = _attachable(model, optimizer)
        self.config = ControllerConfig(
            backend=backend, loss_scaling=loss_scaling, monitor_every=monitor_every, energy_profile=energy_profile,
            guard=guard, shadow_every=shadow_every, seed=seed, module_filter=module_filter, pins=pins or {},
            quantize_embeddings=quantize_embeddings, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
            compile=compile, hardware=hardware, target=target, tune_allocator=tune_allocator, distributed=distributed,
            rollback=rollback, count_bytes=count_bytes,
        )
        self.model, self.optimizer, self.target = model, optimizer, self.config.target
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._build(model, policy)
        self._step = self._epoch = 0
        self._phase, self._closed = Phase.READY, False
        self._loss: torch.Tensor | None = None
        self._scale = 1.0
        self._unscaled: tuple[bool, tuple[str, ...]] | None = None  # set by unscale_()
        self._shadow_sums: dict[str, torch.Tensor] = {}
        self._warned_outside = False
        _ATTACHED[inner] = weakref.ref(self)

    def _build(self, model: nn.Module, policy: Any) -> None:
        """The parts, each with one job, in the order data flows through a step."""
        cfg = self.config
        self.monitor = HealthMonitor(every=cfg.monitor_every)
        self.check = GradientCheck(self._params)
        self.shadow_audit = ShadowAudit(cfg.shadow_every, self._params)
        sharded = any(is_sharded(p) for p in self._params)  # FSDP2: each rank holds shards
        self.reducer = make_reducer(cfg.distributed, model, sharded, self.monitor, self.check, self.shadow_audit)
        self.engine, self.hardware, allocator = build_engine(model, cfg, self.reducer)
        base = build(policy)
        self.policy: Policy = with_guard(base) if cfg.guard else base
        self.timeline = Timeline()
        self.setup = PlanSetup(cfg, self.engine, self.policy, self.monitor, self.timeline, allocator)
        self.setup.report = self.hardware
        self.setup.fused_moments = functools.cache(lambda: fused_adam.covers(self.optimizer))
        self.setup.configure_monitor()
        self.engine.on_new_site = self.setup.on_new_site
        self.engine.observer = self.monitor.observe_tensor
        self.timeline.set_initial(self.engine.plan)
        self.loss_scaling, self.loss_scaler = cfg.loss_scaling, DynamicLossScaler()
        self.energy = EnergyLedger(profile=cfg.energy_profile, target=cfg.target)
        self.energy.world_size, self.energy.rank = self.reducer.world_size, self.reducer.rank
        self.books = Books(self.energy, any(p.is_cuda for p in model.parameters()))
        self.meter, self.meter_reason = self.books.meter, self.books.meter_reason
        self.inference_macs = self.books.inference_macs  # MACs of ap.inference() passes, by executed format
        self.shadow = self.shadow_audit.results  # step -> module -> (cosine, relative error) against fp32
        self.bytes = StepBytes(unwrap(model), enabled=cfg.count_bytes)
        self.saved = SavedByPlan(unwrap(model))
        self.speed = SpeedCheck.for_run(cfg, base, model, self.reducer.world_size)  # never slower than fp32
        # a pre-step copy only where something may ask to roll a step back, and only when asked for (memory)
        rollback = Rollback(self._params, self.optimizer, self.reducer.world_size, sharded) \
            if self.policy.may_roll_back and cfg.rollback else None
        self.update = Update(OptimizerStates(self.optimizer, unwrap(model)), rollback, self.bytes, cfg.compile)

    def _finalize(self) -> None:
        if self.setup.finalize(type(self.model).__name__):
            self.setup.measure_shapes()  # narrow a module only where its GEMM shapes pay (cached; no-op here if none)
            self.check.owners = param_owners(self.engine.map.model, list(self.engine.kinds))  # the plan's names
            self.update.plan_changed(self.plan, self.check.owners, self.policy.moments_min_numel())
            self.setup.tune(self.plan)

    def prepare(self, *example_args: Any, **example_kwargs: Any) -> dict[str, str]:
        """Optional: find every module that runs GEMMs with one forward pass (no grad, not counted); module -> kind."""
        self.setup.discover(example_args, example_kwargs)
        self._finalize()
        return self.engine.kinds

    def allowed_formats(self) -> tuple[dict[str, frozenset[str]] | None, set[str]]:
        """Per module, the formats policies may choose here (None: any); and the modules whose kernels couple roles."""
        return self.setup.allowed()

    allocator = property(lambda self: self.setup.allocator, doc="glibc's allocator setting in force (the report's)")

    @property
    def plan(self) -> PrecisionPlan:
        """The plan in force for the next forward pass."""
        return self.engine.plan

    @property
    def sampling_next(self) -> bool:
        """Whether the next step measures tensor statistics: under ``torch.compile`` run such a step on the eager
        model (``net = model if ap.sampling_next else compiled``), its observers are Python."""
        return self.monitor.should_sample(self._step) or self.policy.wants_sample(self._step)

    step_count = property(lambda self: self._step, doc="Steps taken (the next step's index).")
    epoch = property(lambda self: self._epoch, doc="Epochs ended (end_epoch calls).")

    @contextlib.contextmanager
    def autocast(self, enabled: bool = True) -> Iterator[None]:
        """Run the forward pass inside under the current plan. Entered with gradients off (``torch.no_grad()``
        around it) it is :meth:`inference`: evaluation under the plan that leaves training alone."""
        if not torch.is_grad_enabled():
            with self.inference(enabled):
                yield
            return
        saved_state.check_forward(self._phase, self.engine.active)
        self.speed.before_step(self)
        self.engine.begin_step(self._step, enabled and self.sampling_next)
        self.bytes.arm(self._step, self.plan, self.engine.sampling)
        self.saved.use(self.plan)
        started = self.books.start()
        try:
            with self.engine.activate(enabled), compiled(self.config.compile), self.saved.forward(enabled):
                yield
        finally:
            self.bytes.pause()  # the count's mode is on only inside adaprec's calls
        if enabled and self.engine.grad_ops == 0 and self.engine.nograd_ops > 0:
            # `with ap.autocast(), torch.no_grad():` an evaluation pass, not a step's forward: training is left alone
            self.books.count_inference(self.engine.tally.pop())  # kept apart from the ledger of steps
            self.engine.pop_faults()
            self.bytes.abandon()
            if started:
                self.books.cancel()
            return
        self.books.forward_done(self._step)
        self._phase = Phase.FORWARD

    @contextlib.contextmanager
    def inference(self, enabled: bool = True) -> Iterator[None]:
        """Evaluate or serve the model under the plan in force, without gradients, as often as you like: nothing
        of training moves (step, phase, monitors, policy, ledger); its MACs go to ``ap.inference_macs``. Allowed
        at any point, also between a step's forward and its backward."""
        if self.engine.active:
            raise UsageError("ap.inference() inside an active ap.autocast(): leave the training forward first")
        with self.engine.apart() as cost:
            try:
                with torch.no_grad(), self.engine.activate(enabled):
                    yield
            finally:
                self.books.count_inference(cost)

    @contextlib.contextmanager
    def not_counted(self) -> Iterator[None]:
        """Leave the forward passes inside out of the ledger (evaluation between steps, outside the plan)."""
        with self.engine.not_counted():
            yield

    def backward(self, loss: torch.Tensor, recompute: Callable[[], torch.Tensor] | None = None) -> None:
        """Backward pass of ``loss`` with the loss scale applied.

        ``recompute``: optional closure returning the same loss again; on shadow-audit steps it is re-run
        in fp32 to measure the gradient error.
        """
        saved_state.check_backward(self._phase, loss)
        self._scale = self.loss_scaler.scale() if self._scaling_needed() else 1.0
        self._loss = loss.detach()
        try:
            # checkpointed blocks recomputed here run under the plan; kept tensors are unpacked (fused if compile=)
            with self.engine.backward_scope(), compiled(self.config.compile), self.bytes.counting():
                (loss * self._scale if self._scale != 1.0 else loss).backward()
        except BaseException:
            self._abandon_step()  # not half-done: the next `with ap.autocast():` starts the step again
            raise
        self.engine.commit_backward()
        if self.shadow_audit.due(self._step, recompute):
            self._shadow_sums = self.shadow_audit.measure(recompute, self._scale, self.check.owners)
        self._phase = Phase.BACKWARD

    def _scaling_needed(self) -> bool:
        return self.loss_scaling if self.loss_scaling is not None else loss_scaling_needed(self.plan)

    def _abandon_step(self) -> None:
        """A backward pass raised: forget the step's forward (its cost too) so the controller stays usable."""
        self._phase, self._loss, self._unscaled = Phase.READY, None, None
        self.check.new_step()
        self.books.cancel()
        self.bytes.abandon()
        self.engine.pop_step_cost()
        self.engine.pop_faults()

    def unscale_(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Divide the gradients by the loss scale now, so they can be clipped or inspected before ``step()``.

        Optional, as ``torch.amp.GradScaler.unscale_``: ``step()`` unscales by itself otherwise, and not
        twice. Returns True when a gradient is inf/NaN (``step()`` will then skip the update).
        ``optimizer``: another optimizer the loop steps by hand: its gradients are unscaled too, once.
        """
        if self._phase is not Phase.BACKWARD:
            raise UsageError("unscale_() needs ap.backward(loss) first; call it between backward() and step()")
        if optimizer is not None and optimizer is not self.optimizer:
            return self.check.unscale_other(optimizer, self._scale)
        if self._unscaled is None:
            nonfinite = self.check.unscale(self._scale)
            # name the overflowing modules now: clipping an inf gradient spreads NaN to every module
            self._unscaled = (nonfinite, self.check.overflowed() if nonfinite else ())
        return self._unscaled[0]

    def step(self) -> StepResult:
        """Unscale (unless ``unscale_()`` did), check, step (or skip or roll back), then monitor, decide, account."""
        if self._phase is not Phase.BACKWARD:
            raise UsageError("step() needs ap.backward(loss) first (forward inside ap.autocast(), then backward)")
        self._finalize()
        self.setup.decided = True
        saved_state.warn_outside(self)
        step, plan = self._step, self.plan
        health = self._health(step, plan)
        plan = self.speed.ran(self, plan)  # the policy's own plan, also after a step the speed check ran fp32
        if not health.nonfinite:
            self.monitor.observe_loss(health.loss)
        if self._scale != 1.0 or self._scaling_needed():
            self.loss_scaler.update(health.nonfinite)
        snap = self.monitor.snapshot(step, self._epoch, plan, nonfinite=health.nonfinite,
                                     overflowed=health.overflowed, nonfinite_cause=health.cause)
        new_plan = self.policy.decide(snap, step)
        stepped, rolled_back, reason = self.update.apply(step, health, self.policy, self.monitor)
        new_plan = self.speed.end(self, step, new_plan)
        changes = self._change_plan(step, plan, new_plan)
        self.reducer.step_timed(step, self.books.close(step))
        self._step += 1
        self._phase, self._loss = Phase.READY, None
        return StepResult(step, stepped, reason, health.loss, self._scale, health.overflowed, rolled_back, changes)

    def _health(self, step: int, plan: PrecisionPlan) -> StepHealth:
        """The gradient check (unscaled here unless unscale_() did), priced and agreed on by every rank."""
        self.check.new_step()
        unscaled, self._unscaled = self._unscaled, None
        nonfinite = unscaled[0] if unscaled is not None else self.check.unscale(self._scale)
        loss = float(self._loss) if self._loss is not None else math.nan
        # a cast that met inf/NaN would hide it (int8 and saturating formats clip): the engine reports it
        view = LocalView(nonfinite, loss, tuple(self.engine.pop_faults()), unscaled[1] if unscaled else None,
                         self.engine.sampling)
        cost = self.engine.pop_step_cost()
        traffic, source = self.bytes.close()
        if traffic is not None:
            traffic.apply_to(cost, source)  # every op's bytes, not only the GEMMs' operands
        row = self.books.price(step, plan, cost)
        shadow, self._shadow_sums = self._shadow_sums, {}
        return self.reducer.reduce(step, plan, view, row, self.engine.sites, self.energy, shadow)

    def _change_plan(self, step: int, old: PrecisionPlan, new: PrecisionPlan) -> tuple[PlanChange, ...]:
        if new == old:
            return ()
        who = "guard" if self.policy.incident else self.policy.name
        self.timeline.record_plan_change(step, old, new, who, dict(self.policy.last_reasons or {}))
        self.engine.set_plan(new)
        self.update.plan_changed(new, self.check.owners, self.policy.moments_min_numel())
        self.setup.tune(new)
        return tuple(old.diff(new))

    def end_epoch(self) -> None:
        """Tell epoch-based policies (progressive, gradient-diversity) that an epoch ended."""
        self._epoch += 1
        self.monitor.end_epoch()

    def flush_energy(self) -> None:
        """Close a partial measurement window so the last steps get measured figures too."""
        self.books.flush()

    def report(self) -> str:
        """A short human-readable account: coverage, what ran natively, plan changes, time and energy."""
        self.books.flush()
        return "\n".join(report_lines(self))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly (the model and optimizer are saved by the caller)."""
        return saved_state.state_of(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore everything ``state_dict()`` saved: all of it, or (on a bad state) nothing."""
        saved_state.load_into(self, state)

    def close(self) -> None:
        """Remove every hook adaprec put on the model (another AdaptivePrecision may then take it)."""
        self.engine.remove()
        self.bytes.remove()
        self._closed = True
        inner = unwrap(self.model)
        ref = _ATTACHED.get(inner)
        if ref is not None and ref() is self:
            del _ATTACHED[inner]
