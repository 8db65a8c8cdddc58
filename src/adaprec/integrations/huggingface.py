"""Hugging Face Trainer: adaprec through a Trainer subclass (or a mixin for your own subclass).

A ``TrainerCallback`` only hears events; it cannot own the forward context,
the backward pass or the optimizer step. ``Trainer`` documents subclassing
for that, so adaprec overrides the documented methods and nothing private:

- ``training_step``: the forward (``compute_loss``) inside ``ap.autocast()``,
  then ``ap.backward(loss)`` and ``ap.unscale_()``, so the Trainer's gradient
  clipping and ``on_pre_optimizer_step`` callbacks see true gradients;
- ``create_optimizer``: the optimizer the Trainer steps is a thin wrapper
  whose ``step()`` is ``ap.step()`` (inf/NaN check, guarded step, monitors,
  policy, ledger) and whose ``state_dict()`` carries adaprec's state, so it
  travels in ``optimizer.pt`` of every checkpoint and resumes exactly;
- ``log``: training logs gain the energy ledger, the plan-change count and
  the bits of each ``module.role`` (``adaprec/bits/<module>.<role>``: all at
  the first log, then those that changed), so every ``report_to`` logger
  shows each layer's format over time; plan changes are logged at WARNING
  on the ``adaprec.huggingface`` logger, one line per step that changed;
- ``evaluate`` / ``predict``: fp32 on the master weights, left out of the ledger.

Usage::

    from adaprec.integrations.huggingface import AdaptivePrecisionTrainer

    trainer = AdaptivePrecisionTrainer(model=model, args=args, train_dataset=ds,
                                       policy="error-budget", adaprec_kwargs={"monitor_every": 10})
    trainer.train()
    print(trainer.ap.report())

With your own Trainer subclass: ``class MyTrainer(AdaptivePrecisionMixin, MyBaseTrainer)``.
Supported: one device or DDP, ``gradient_accumulation_steps=1``, no
``fp16``/``bf16`` flags (adaprec owns precision), no DeepSpeed/FSDP.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from adaprec.controller import AdaptivePrecision, StepResult
from adaprec.errors import UsageError
from adaprec.integrations.logging import is_rank_zero, ledger_metrics, plan_bits, step_change_line
from adaprec.plan import PrecisionPlan
from adaprec.policies import Policy, build

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ModuleNotFoundError(
        "adaprec.integrations.huggingface needs transformers and accelerate: "
        "pip install 'adaprec[huggingface]' (or 'transformers>=4.46' 'accelerate>=1.0')"
    ) from e

__all__ = [
    "AdaptivePrecisionMixin",
    "AdaptivePrecisionOptimizer",
    "AdaptivePrecisionTrainer",
    "TrainerSetupError",
    "ledger_metrics",
]

log = logging.getLogger("adaprec.huggingface")

_STATE_KEY = "adaprec"
# keywords AdaptivePrecision takes besides the model and optimizer
_AP_OPTIONS = frozenset(inspect.signature(AdaptivePrecision).parameters) - {"model", "optimizer", "policy"}


class TrainerSetupError(UsageError):
    """A Trainer set-up adaprec cannot drive (fp16/bf16 flags, accumulation, DeepSpeed, FSDP...)."""


class AdaptivePrecisionOptimizer(torch.optim.Optimizer):
    """The optimizer the Trainer sees: ``step()`` runs ``ap.step()``; the rest is the wrapped optimizer's.

    Like accelerate's own ``AcceleratedOptimizer`` it forwards ``state``,
    ``param_groups`` and ``defaults``, so LR schedulers work unchanged.
    ``state_dict()`` adds adaprec's state under ``"adaprec"``; a plain torch
    optimizer loading that dict ignores the extra key.
    """

    def __init__(self, ap: AdaptivePrecision) -> None:  # no super().__init__: all state is the wrapped one's
        self.ap = ap
        self.optimizer = ap.optimizer
        self.last_result: StepResult | None = None
        self.skipped_steps = 0

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise TrainerSetupError("adaprec tracks the parameters it was built with; add parameter groups "
                                "before training starts (in create_optimizer)")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise TrainerSetupError("adaprec's step takes no closure (optimizers such as LBFGS are not supported)")
        r = self.ap.step()
        self.last_result = r
        self.skipped_steps += not r.stepped
        if r.changes and is_rank_zero():  # WARNING: a default logging set-up (Python's last resort) shows it
            log.warning("%s", step_change_line(self.ap, r.step, r.changes))

    def state_dict(self) -> dict[str, Any]:
        return {**self.optimizer.state_dict(), _STATE_KEY: self.ap.state_dict(), "adaprec_skipped": self.skipped_steps}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        inner = dict(state_dict)
        ap_state = inner.pop(_STATE_KEY, None)
        self.skipped_steps = int(inner.pop("adaprec_skipped", 0))
        self.optimizer.load_state_dict(inner)
        if ap_state is None:
            warnings.warn("adaprec: the optimizer checkpoint holds no adaprec state (it was not trained with "
                          "adaprec); adaprec starts afresh at step 0 with the policy's initial plan", stacklevel=2)
        else:
            self.ap.load_state_dict(ap_state)

    def train(self) -> None:  # schedule-free optimizers switch modes
        mode = getattr(self.optimizer, "train", None)
        if callable(mode):
            mode()

    def eval(self) -> None:
        mode = getattr(self.optimizer, "eval", None)
        if callable(mode):
            mode()

    def __repr__(self) -> str:
        return f"AdaptivePrecisionOptimizer(policy={self.ap.policy.name!r}, optimizer={self.optimizer!r})"


def _find_wrapper(opt: Any) -> AdaptivePrecisionOptimizer | None:
    """Our wrapper inside accelerate's (``AcceleratedOptimizer.optimizer``), if there."""
    while opt is not None and not isinstance(opt, AdaptivePrecisionOptimizer):
        opt = getattr(opt, "optimizer", None)
    return opt


def _check_supported(trainer: Trainer) -> None:
    args = trainer.args
    problems = []
    if args.fp16 or args.bf16:
        problems.append("fp16/bf16 are set: adaprec decides the precision itself; set fp16=False and bf16=False")
    if args.gradient_accumulation_steps != 1:
        problems.append(f"gradient_accumulation_steps={args.gradient_accumulation_steps}: adaprec decides precision "
                        "per optimizer step; set it to 1 and raise the batch size instead")
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False) or args.fsdp:
        problems.append("DeepSpeed/FSDP own the optimizer step and shard the parameters; use one device or DDP")
    if args.n_gpu > 1:
        problems.append(f"n_gpu={args.n_gpu} means torch.nn.DataParallel; launch DDP with torchrun instead")
    if "lomo" in str(args.optim).lower():
        problems.append(f"optim={args.optim} updates weights inside backward; use a regular optimizer")
    if problems:
        raise TrainerSetupError("AdaptivePrecisionTrainer cannot drive this set-up: " + " | ".join(problems))


class _AdaprecEvents(TrainerCallback):
    """Tells adaprec where epochs end (epoch-based policies) and closes measurement at the end of training."""

    def __init__(self, trainer: AdaptivePrecisionMixin) -> None:
        self.trainer = trainer

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.ap is not None:
            self.trainer.ap.end_epoch()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.ap is not None:
            self.trainer.ap.flush_energy()


class AdaptivePrecisionMixin:
    """Put before ``Trainer`` (or your Trainer subclass) in the bases to train under adaprec.

    Args:
        policy: as for :class:`~adaprec.AdaptivePrecision`. Default ``"error-budget"``.
        adaprec_kwargs: other :class:`~adaprec.AdaptivePrecision` keywords
            (``monitor_every``, ``seed``, ``energy_profile``, ``pins``...);
            ``total_steps`` and ``steps_per_epoch`` default to the Trainer's.
        everything else: the base Trainer's arguments.

    ``trainer.ap`` is the controller once training starts.
    """

    ap: AdaptivePrecision | None
    optimizer: torch.optim.Optimizer | None

    def __init__(
        self,
        *args: Any,
        policy: str | Mapping[str, Any] | PrecisionPlan | Policy = "error-budget",
        adaprec_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.adaprec_policy = policy
        self.adaprec_kwargs = dict(adaprec_kwargs or {})
        bad = sorted(set(self.adaprec_kwargs) - _AP_OPTIONS)
        if bad:
            raise TrainerSetupError(f"unknown adaprec_kwargs {bad} (the model and optimizer come from the "
                                    f"Trainer); valid: {sorted(_AP_OPTIONS)}")
        build(policy)  # a bad policy fails here, not in the middle of train()
        self.ap = None
        self._adaprec_run: dict[str, int] = {}
        self._adaprec_bits: dict[str, float] = {}  # bits last logged per module.role
        super().__init__(*args, **kwargs)
        _check_supported(self)  # type: ignore[arg-type]
        self.add_callback(_AdaprecEvents(self))  # type: ignore[attr-defined]

    # --- run length (schedule-based policies need it) ---------------------------
    def set_initial_training_values(self, args: Any, dataloader: Any) -> Any:
        values = super().set_initial_training_values(args, dataloader)  # type: ignore[misc]
        # documented order: num_train_epochs, num_update_steps_per_epoch, ..., max_steps
        self._adaprec_run = {"steps_per_epoch": int(values[1]), "total_steps": int(values[-1])}
        return values

    # --- optimizer: its step is ap.step() ------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt = super().create_optimizer(model)  # type: ignore[misc]
        if _find_wrapper(opt) is not None:
            return opt
        run = dict(self._adaprec_run)
        max_steps = getattr(self.state, "max_steps", 0)  # type: ignore[attr-defined]
        if "total_steps" not in run and max_steps and max_steps > 0:
            run["total_steps"] = int(max_steps)
        if self.ap is not None:
            self.ap.close()
        self.ap = AdaptivePrecision(self.model, opt, self.adaprec_policy, **{**run, **self.adaprec_kwargs})  # type: ignore[attr-defined]
        self._adaprec_bits = {}
        self.optimizer = AdaptivePrecisionOptimizer(self.ap)
        return self.optimizer

    @property
    def adaprec_optimizer(self) -> AdaptivePrecisionOptimizer | None:
        """The wrapper the Trainer steps (its ``last_result`` is the last :class:`~adaprec.StepResult`)."""
        return _find_wrapper(getattr(self, "optimizer", None))

    # --- the training step -------------------------------------------------------------
    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Trainer.training_step for the supported set-up, with adaprec's forward context and backward."""
        ap = self.ap
        if ap is None:
            raise TrainerSetupError("adaprec is not set up: training_step ran before create_optimizer()")
        model.train()
        mode = getattr(self.optimizer, "train", None)  # schedule-free optimizers switch modes
        if callable(mode):
            mode()
        inputs = self._prepare_inputs(inputs)  # type: ignore[attr-defined]
        with self.compute_loss_context_manager(), ap.autocast():  # type: ignore[attr-defined]
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)  # type: ignore[attr-defined]
        del inputs
        ap.backward(loss)
        ap.unscale_()  # the Trainer clips and calls on_pre_optimizer_step next: give them true gradients
        return loss.detach()

    # --- evaluation: fp32, not part of a training step's cost ------------------------------
    @contextlib.contextmanager
    def _not_counted(self) -> Iterator[None]:
        with self.ap.not_counted() if self.ap is not None else contextlib.nullcontext():
            yield

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        with self._not_counted():
            return super().evaluate(*args, **kwargs)  # type: ignore[misc]

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with self._not_counted():
            return super().predict(*args, **kwargs)  # type: ignore[misc]

    # --- logging -----------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs gain ``adaprec/*``: loss scale, skipped steps, the ledger totals and changed bits."""
        wrapper = self.adaprec_optimizer
        if self.ap is not None and wrapper is not None and ("loss" in logs or "train_loss" in logs):
            r = wrapper.last_result
            logs = dict(logs)
            if r is not None:
                logs["adaprec/loss_scale"] = r.loss_scale
            logs["adaprec/skipped_steps"] = float(wrapper.skipped_steps)
            logs.update({f"adaprec/{k}": v for k, v in ledger_metrics(self.ap).items() if math.isfinite(v)})
            changed = {k: v for k, v in plan_bits(self.ap.plan).items() if self._adaprec_bits.get(k) != v}
            self._adaprec_bits.update(changed)
            logs.update({f"adaprec/bits/{k}": v for k, v in changed.items()})
        if start_time is None:  # older Trainers take no start_time
            super().log(logs)  # type: ignore[misc]
        else:
            super().log(logs, start_time)  # type: ignore[misc]


class AdaptivePrecisionTrainer(AdaptivePrecisionMixin, Trainer):
    """``transformers.Trainer`` that trains under adaprec; see :class:`AdaptivePrecisionMixin` for the arguments."""
