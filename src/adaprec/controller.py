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
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adaprec.energy import EnergyLedger, MacCounter, MeasurementWindow, detect_meter
from adaprec.engine import PrecisionEngine
from adaprec.errors import CheckpointError, UsageError
from adaprec.formats import get, quantize
from adaprec.formats.loss_scaling import DynamicLossScaler
from adaprec.monitor import HealthMonitor
from adaprec.plan import ModulePrecision, PlanChange, PrecisionPlan
from adaprec.policies import Policy, build, with_guard
from adaprec.timeline import Timeline

__all__ = ["AdaptivePrecision", "StepResult"]

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
        model: an ``nn.Module``; Linear, Conv1d/2d, Embedding and attention
            (nn.MultiheadAttention, modules calling
            ``F.scaled_dot_product_attention``) are quantized; other modules
            run in fp32 and modules with weights the engine cannot handle
            are reported once.
        optimizer: any torch optimizer over the model's (fp32) parameters.
        policy: a policy name (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp8"``,
            ``"fp8-hybrid"``, ``"schedule"``, ``"cyclic"``, ``"progressive"``,
            ``"gradient-diversity"``, ``"error-budget"``,
            ``"replay:timeline.json"``), a ``{"name": ..., **kwargs}`` dict, a
            :class:`PrecisionPlan` or a :class:`Policy`. Default ``"error-budget"``.
        backend: ``"auto"`` (native dtypes where the device has fast units,
            emulation elsewhere), ``"emulate"`` or ``"native"``.
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
        compile: fuse the quantization kernels with ``torch.compile`` (same
            bits, seconds of one-off compile, far faster stochastic rounding).
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if monitor_every < 1:
            raise UsageError(f"monitor_every must be >= 1, got {monitor_every}")
        self.model = model
        self.optimizer = optimizer
        self.engine = PrecisionEngine(
            model, backend=backend, module_filter=module_filter, seed=seed, compile=compile
        )
        all_pins: dict[str, str | ModulePrecision] = {}
        if not quantize_embeddings:
            all_pins.update({n: "fp32" for n, k in self.engine.kinds.items() if k == "embedding"})
        all_pins.update(pins or {})
        template = PrecisionPlan.uniform(self.engine.kinds, "fp32", pins=all_pins)
        base = build(policy)
        self.policy: Policy = with_guard(base) if guard else base
        self.engine.set_plan(self.policy.setup(template, total_steps, steps_per_epoch))
        wanted = self.policy.candidate_formats
        self.monitor = HealthMonitor(
            every=monitor_every,
            **({"candidates": wanted} if wanted else {}),
            role_candidates=self.policy.candidate_formats_by_role,
        )
        self.engine.observer = self.monitor.observe_tensor
        self.loss_scaling = loss_scaling
        self.loss_scaler = DynamicLossScaler()
        self._scaling_for: tuple[PrecisionPlan | None, bool] = (None, False)
        self.timeline = Timeline()
        self.timeline.set_initial(self.engine.plan)
        self.energy = EnergyLedger(profile=energy_profile)
        self.meter, self.meter_reason = detect_meter()
        self._window = MeasurementWindow(self.meter) if self.meter is not None else None
        self._counter = MacCounter(model, list(self.engine.kinds))
        self._counter.attach(watch_sdpa=False)
        self.shadow_every = shadow_every
        self.shadow: dict[int, dict[str, tuple[float, float]]] = {}
        self._owners = _param_owners(model, list(self.engine.kinds))
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._backup: tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, str]]] | None = None
        # keep a pre-step copy only when something may ask to roll a step back
        self._guarded = hasattr(self.policy, "rollback_requested")
        self._step = 0
        self._epoch = 0
        self._phase = "ready"
        self._loss: torch.Tensor | None = None
        self._scale = 1.0
        self._unscaled: tuple[bool, tuple[str, ...]] | None = None  # set by unscale_()

    # --- reading --------------------------------------------------------
    @property
    def plan(self) -> PrecisionPlan:
        """The plan in force for the next forward pass."""
        return self.engine.plan

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def epoch(self) -> int:
        return self._epoch

    # --- the protocol -----------------------------------------------------
    @contextlib.contextmanager
    def autocast(self, enabled: bool = True) -> Iterator[None]:
        """Run the forward pass inside under the current plan."""
        if self._phase == "backward":
            raise UsageError("autocast() entered again before step(): call ap.step() after ap.backward(loss)")
        sampling = enabled and self.monitor.should_sample(self._step)
        self.engine.begin_step(self._step, sampling)
        if self._window is not None and self._step == 0:
            self._window.start()
        # the counter's mode goes on top: its handler pops it, so the engine's
        # quantization code below runs with no mode in the way
        with self.engine.activate(enabled), self._counter.watching_sdpa():
            yield
        self._phase = "forward"

    @contextlib.contextmanager
    def not_counted(self) -> Iterator[None]:
        """Leave the forward passes inside out of the energy ledger.

        For evaluation between training steps: it runs outside the plan (fp32)
        and is no part of a step's cost, but the MAC counter's hooks would
        otherwise charge it to the next step.
        """
        attached = self._counter.attached
        self._counter.detach()
        try:
            yield
        finally:
            if attached:
                self._counter.attach(watch_sdpa=False)

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
        (loss * self._scale if self._scale != 1.0 else loss).backward()
        if (
            recompute is not None
            and self.shadow_every
            and self._step % self.shadow_every == 0
        ):
            self._shadow_audit(recompute)
        self._phase = "backward"

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self._params if p.grad is not None]

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
            if any(p.grad is not None and not torch.isfinite(p.grad).all() for _, p in params):
                bad.append(m)
        return tuple(bad)

    def _state_tensors(self) -> tuple[list[tuple[int, str]], list[torch.Tensor]]:
        keys, tensors = [], []
        for i, p in enumerate(self._params):
            for k, v in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(v):
                    keys.append((i, k))
                    tensors.append(v)
        return keys, tensors

    def _save_backup(self) -> None:
        """Copy master weights and optimizer state into reused buffers (one fused copy each)."""
        params = [p.detach() for p in self._params]
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
            torch._foreach_copy_([p.detach() for p in self._params], weights)
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

    def unscale_(self) -> bool:
        """Divide the gradients by the loss scale now, so they can be clipped or inspected before ``step()``.

        Optional, as ``torch.amp.GradScaler.unscale_``: ``step()`` unscales by
        itself otherwise, and does not unscale twice. Calling it again before
        ``step()`` changes nothing. Returns True when a gradient is inf/NaN
        (``step()`` will then skip the update).
        """
        if self._phase != "backward":
            raise UsageError("unscale_() needs ap.backward(loss) first; call it between backward() and step()")
        if self._unscaled is None:
            nonfinite = self._unscale_and_check()
            # name the overflowing modules now: clipping an inf gradient spreads NaN to every module
            self._unscaled = (nonfinite, self._overflowed_modules() if nonfinite else ())
        return self._unscaled[0]

    def step(self) -> StepResult:
        """Unscale (unless ``unscale_()`` did), check, step (or skip or roll back), then monitor, decide, account."""
        if self._phase != "backward":
            raise UsageError("step() needs ap.backward(loss) first (forward inside ap.autocast(), then backward)")
        step = self._step
        plan_used = self.plan
        unscaled, self._unscaled = self._unscaled, None
        nonfinite = unscaled[0] if unscaled is not None else self._unscale_and_check()
        loss = float(self._loss) if self._loss is not None else math.nan
        sampled = self.engine.sampling
        overflowed: tuple[str, ...] = ()
        if nonfinite or not math.isfinite(loss):
            overflowed = unscaled[1] if unscaled is not None and nonfinite else self._overflowed_modules()
            nonfinite = True
        else:
            self.monitor.observe_loss(loss)
            if sampled:
                for m, params in self._owners.items():
                    for pname, p in params:
                        if pname.endswith("weight") and p.grad is not None:
                            self.monitor.observe_grads(m, p.grad)
                            break
        if self._scale != 1.0 or self._scaling_needed():
            self.loss_scaler.update(nonfinite)
        snap = self.monitor.snapshot(step, self._epoch, plan_used, nonfinite=nonfinite, overflowed=overflowed)
        new_plan = self.policy.decide(snap, step)
        rollback = bool(getattr(self.policy, "rollback_requested", False))
        stepped = False
        rolled_back = False
        if nonfinite:
            reason = "skipped: inf/NaN in gradients" + (f" of {', '.join(overflowed)}" if overflowed else "")
        elif rollback:
            rolled_back = self._restore_backup()
            reason = "rolled back: guard saw a loss spike" if rolled_back else "skipped: guard saw a loss spike"
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

    def end_epoch(self) -> None:
        """Tell epoch-based policies (progressive, gradient-diversity) that an epoch ended."""
        self._epoch += 1
        self.monitor.end_epoch()

    # --- parts of step ----------------------------------------------------
    def _account(self, step: int, plan: PrecisionPlan) -> None:
        cost = self._counter.pop_step_cost()
        self.energy.record(step, plan, cost, measured_reason=self.meter_reason if self._window is None else None)
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
                    if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0:
                        v.copy_(quantize(v, f, "nearest", saturate=True))

    def _shadow_audit(self, recompute: Callable[[], torch.Tensor]) -> None:
        low = {id(p): p.grad.detach().clone() / self._scale for p in self._params if p.grad is not None}
        saved = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        recompute().backward()
        audit: dict[str, tuple[float, float]] = {}
        for m, params in self._owners.items():
            pairs = [(low[id(p)], p.grad) for _, p in params if id(p) in low and p.grad is not None]
            if not pairs:
                continue
            a = torch.cat([x.flatten() for x, _ in pairs])
            b = torch.cat([y.flatten() for _, y in pairs])
            cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
            audit[m] = (cos, rel)
        for p, g in zip(self._params, saved, strict=True):
            p.grad = g
        self.shadow[self._step] = audit
        if hasattr(self.monitor, "observe_shadow"):
            self.monitor.observe_shadow(audit)

    # --- reporting --------------------------------------------------------
    def report(self) -> str:
        """A short human-readable account: plan, changes, energy."""
        self.flush_energy()
        s = self.energy.summary()
        lines = [
            f"adaprec: {self._step} steps, policy {self.policy.name}",
            f"plan now: {self.plan.summary()}",
            f"precision changes recorded: {len(self.timeline.events)}",
            f"energy, {s['kind']['modeled_j']}: {s['modeled_j']:.4g} J; fp32 would be {s['fp32_modeled_j']:.4g} J"
            f" (saving {100 * (s['saving_vs_fp32'] or 0):.1f}%), static bf16 {s['bf16_modeled_j']:.4g} J",
            "measured: "
            + (f"{s['measured_j']:.4g} J" if s.get("measured_j") is not None else f"n/a ({s.get('measured_reason')})"),
        ]
        return "\n".join(lines)

    # --- state --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly (the model and optimizer are saved by the caller)."""
        return {
            "version": 1,
            "step": self._step,
            "epoch": self._epoch,
            "engine": self.engine.state_dict(),
            "policy": self.policy.state_dict(),
            "monitor": self.monitor.state_dict(),
            "loss_scaler": self.loss_scaler.state_dict(),
            "timeline": self.timeline.state_dict(),
            "energy": self.energy.state_dict(),
            # the copy of the last step's starting point a guard rollback would restore: without it, a
            # spike seen on the first step after a resume could only be skipped, not rolled back
            "rollback": None if self._backup is None else {
                "weights": [t.clone() for t in self._backup[0]],
                "state": [t.clone() for t in self._backup[1]],
                "keys": [[i, k] for i, k in self._backup[2]],
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        required = ("step", "epoch", "engine", "policy", "monitor", "loss_scaler", "timeline", "energy")
        missing = [k for k in required if k not in state]
        if missing:
            raise CheckpointError(
                f"adaprec state dict lacks {missing}; pass the dict returned by AdaptivePrecision.state_dict()"
            )
        self._step = int(state["step"])
        self._epoch = int(state["epoch"])
        self.engine.load_state_dict(state["engine"])
        self.policy.load_state_dict(state["policy"])
        self.monitor.load_state_dict(state["monitor"])
        self.loss_scaler.load_state_dict(state["loss_scaler"])
        self.timeline.load_state_dict(state["timeline"])
        self.energy.load_state_dict(state["energy"])
        self._phase = "ready"
        self._backup = self._load_backup(state.get("rollback"))
        self._unscaled = None

    def _load_backup(self, saved: Mapping[str, Any] | None) -> tuple[list, list, list] | None:
        if saved is None:
            return None
        try:
            weights = [w.to(p.device, p.dtype) for w, p in zip(saved["weights"], self._params, strict=True)]
            keys = [(int(i), str(k)) for i, k in saved["keys"]]
            state = [v.to(self._params[i].device) for v, (i, _) in zip(saved["state"], keys, strict=True)]
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise CheckpointError(
                f"adaprec rollback copy does not fit this model and optimizer ({e}); "
                "load the state saved with the same model and optimizer"
            ) from None
        return weights, state, keys

    def close(self) -> None:
        """Remove every hook adaprec put on the model."""
        self.engine.remove()
        self._counter.detach()
