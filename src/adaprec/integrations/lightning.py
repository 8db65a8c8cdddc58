"""Lightning: adaprec as a precision plugin, plus an optional logging callback.

A Lightning ``Precision`` plugin owns exactly the three places adaprec needs
(the training step's forward context, the backward pass and the optimizer
step) and the plugin's ``state_dict`` goes into every Lightning checkpoint.
So the user's LightningModule stays untouched::

    import lightning.pytorch as L
    from adaprec.integrations.lightning import AdaptivePrecisionCallback, AdaptivePrecisionPlugin

    trainer = L.Trainer(
        plugins=[AdaptivePrecisionPlugin("error-budget", monitor_every=10)],
        callbacks=[AdaptivePrecisionCallback()],          # optional: logs the ledger and plan changes
    )
    trainer.fit(module, train_loader, val_loader)
    print(trainer.precision_plugin.ap.report())

Supported: automatic optimization with one optimizer, no gradient
accumulation, single-device or DDP strategies. Anything else raises
:class:`LightningSetupError` naming what to change.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaprec.controller import AdaptivePrecision, StepResult
from adaprec.errors import UsageError
from adaprec.integrations.logging import is_rank_zero, ledger_metrics, plan_bits, step_change_line
from adaprec.plan import PrecisionPlan
from adaprec.policies import Policy, build

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ModuleNotFoundError(
        "adaprec.integrations.lightning needs Lightning 2.x: pip install 'adaprec[lightning]' (or 'lightning>=2.2')"
    ) from e

__all__ = ["AdaptivePrecisionCallback", "AdaptivePrecisionPlugin", "LightningSetupError", "ledger_metrics"]

log = logging.getLogger("adaprec.lightning")

# keywords AdaptivePrecision takes besides the model and optimizer
_AP_OPTIONS = frozenset(inspect.signature(AdaptivePrecision).parameters) - {"model", "optimizer", "policy"}


class LightningSetupError(UsageError):
    """A Lightning set-up the adaprec plugin cannot drive (manual optimization, accumulation, sharding...)."""


def _lightning_module(model: nn.Module) -> pl.LightningModule:
    """The LightningModule inside whatever the strategy wrapped it in (DDP keeps it at ``.module``)."""
    m: Any = model
    while not isinstance(m, pl.LightningModule) and isinstance(getattr(m, "module", None), nn.Module):
        m = m.module
    if not isinstance(m, pl.LightningModule):
        raise LightningSetupError(
            f"the adaprec plugin expected a LightningModule, got {type(model).__name__}; "
            "pass the plugin to lightning.pytorch.Trainer(plugins=[...])"
        )
    return m


def _check_supported(module: pl.LightningModule, optimizers: list[torch.optim.Optimizer]) -> None:
    """Refuse, with the fix, every set-up where adaprec would not own forward, backward and step."""
    trainer = module.trainer
    if not module.automatic_optimization:
        raise LightningSetupError(
            "AdaptivePrecisionPlugin supports automatic optimization only (one optimizer, Lightning calls "
            "backward and step); this module sets automatic_optimization = False. Use automatic optimization, "
            "or drive adaprec yourself in training_step: ap.autocast(), ap.backward(loss), ap.step()"
        )
    if len(optimizers) != 1:
        raise LightningSetupError(
            f"AdaptivePrecisionPlugin supports exactly one optimizer, configure_optimizers returned {len(optimizers)}"
        )
    if isinstance(optimizers[0], torch.optim.LBFGS):
        raise LightningSetupError("AdaptivePrecisionPlugin cannot drive LBFGS (its step re-runs the closure); "
                                  "use a first-order optimizer")
    if trainer.accumulate_grad_batches != 1:
        raise LightningSetupError(
            f"AdaptivePrecisionPlugin does not support gradient accumulation (accumulate_grad_batches="
            f"{trainer.accumulate_grad_batches}): adaprec decides precision per optimizer step. "
            "Set accumulate_grad_batches=1 and raise the batch size instead"
        )
    if not isinstance(trainer.strategy, SingleDeviceStrategy | DDPStrategy):
        raise LightningSetupError(
            f"AdaptivePrecisionPlugin supports single-device and DDP strategies, not {type(trainer.strategy).__name__}"
            " (sharded strategies own the optimizer step and the parameters)"
        )
    if type(module).backward is not pl.LightningModule.backward:
        raise LightningSetupError(
            f"{type(module).__name__} overrides LightningModule.backward; adaprec runs the backward itself "
            "(loss scaling, gradient quantization). Remove the override"
        )


def _run_length(trainer: pl.Trainer) -> dict[str, int]:
    """total_steps and steps_per_epoch as the trainer knows them (schedule-based policies need them)."""
    out: dict[str, int] = {}
    total = trainer.estimated_stepping_batches
    if total != float("inf"):
        out["total_steps"] = int(total)
    per_epoch = trainer.num_training_batches
    if per_epoch != float("inf") and per_epoch > 0:
        out["steps_per_epoch"] = int(per_epoch)
    return out


class AdaptivePrecisionPlugin(Precision):
    """Train a LightningModule under adaprec: pass it as ``Trainer(plugins=[AdaptivePrecisionPlugin(...)])``.

    Training steps run inside ``ap.autocast()``, the backward through
    ``ap.backward`` (loss scaling, gradient quantization) and the optimizer
    step through ``ap.step()`` (inf/NaN check, guarded step, monitors,
    policy, energy ledger). Validation, test and predict run in fp32 on the
    master weights and are left out of the ledger. Gradients are unscaled
    before ``on_before_optimizer_step`` and gradient clipping, so both see
    true gradients. The adaprec state is saved in Lightning checkpoints and
    restored on resume, exactly.

    Args:
        policy: as for :class:`~adaprec.AdaptivePrecision` (a name, a dict,
            a plan or a policy). Default ``"error-budget"``.
        **ap_kwargs: any other :class:`~adaprec.AdaptivePrecision` keyword
            (``monitor_every``, ``seed``, ``energy_profile``, ``pins``...).
            ``total_steps`` and ``steps_per_epoch`` default to what the
            Trainer estimates.

    After ``fit`` starts, ``plugin.ap`` is the controller (its ``report()``,
    ``energy``, ``timeline``) and ``plugin.last_result`` the last
    :class:`~adaprec.StepResult`.
    """

    precision = "32-true"  # the parameters (master weights) stay fp32

    def __init__(
        self, policy: str | Mapping[str, Any] | PrecisionPlan | Policy = "error-budget", **ap_kwargs: Any
    ) -> None:
        bad = sorted(set(ap_kwargs) - _AP_OPTIONS)
        if bad:
            raise LightningSetupError(f"unknown AdaptivePrecision options {bad} (the model and optimizer come from "
                                      f"the Trainer); valid: {sorted(_AP_OPTIONS)}")
        build(policy)  # a bad policy fails here, not in the middle of Trainer.fit
        self.policy = policy
        self.ap_kwargs = ap_kwargs
        self.ap: AdaptivePrecision | None = None
        self.last_result: StepResult | None = None
        self._training = False  # connected by Trainer.fit (not validate/test/predict)

    # --- wiring -------------------------------------------------------------
    def connect(
        self, model: nn.Module, optimizers: list[torch.optim.Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[torch.optim.Optimizer], list[Any]]:
        """Build the controller once Lightning has the module and its optimizer (every ``fit``)."""
        if not optimizers:  # validate / test / predict: nothing to train
            return model, optimizers, lr_schedulers
        module = _lightning_module(model)
        _check_supported(module, optimizers)
        if self.ap is not None:
            self.ap.close()
        kwargs = {**_run_length(module.trainer), **self.ap_kwargs}
        self.ap = AdaptivePrecision(module, optimizers[0], self.policy, **kwargs)
        self.last_result = None
        self._training = True
        return model, optimizers, lr_schedulers

    def _controller(self) -> AdaptivePrecision:
        if self.ap is None:
            raise LightningSetupError("the adaprec plugin is not connected: it is set up by Trainer.fit()")
        return self.ap

    # --- the training step ----------------------------------------------------
    @contextlib.contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        with self._controller().autocast():
            yield

    def _uncounted(self) -> contextlib.AbstractContextManager[None]:
        """Evaluation runs fp32 on the master weights and is no part of a training step's cost."""
        return self.ap.not_counted() if self.ap is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def val_step_context(self) -> Generator[None, None, None]:
        with self._uncounted():
            yield

    @contextlib.contextmanager
    def test_step_context(self) -> Generator[None, None, None]:
        with self._uncounted():
            yield

    @contextlib.contextmanager
    def predict_step_context(self) -> Generator[None, None, None]:
        with self._uncounted():
            yield

    def backward(  # type: ignore[override]
        self,
        tensor: torch.Tensor,
        model: pl.LightningModule,
        optimizer: Any,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if args or kwargs:
            raise LightningSetupError("adaprec's backward takes only the loss; drop the extra backward arguments")
        self._controller().backward(tensor)

    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Any,
        model: pl.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        """Run the closure (training step + backward), unscale, run Lightning's hooks and clipping, then ``ap.step()``."""
        ap = self._controller()
        if kwargs:
            raise LightningSetupError(f"adaprec's step takes no optimizer.step() arguments, got {sorted(kwargs)}")
        if optimizer is not ap.optimizer:
            raise LightningSetupError("the optimizer being stepped is not the one adaprec was built with; "
                                      "return a single optimizer from configure_optimizers")
        while ap.epoch < model.trainer.current_epoch:  # epoch-based policies count epochs
            ap.end_epoch()
        closure_result = closure()
        if closure_result is None:  # training_step returned None: Lightning skipped the backward
            return None
        ap.unscale_()
        self._after_closure(model, optimizer)  # on_before_optimizer_step hooks and gradient clipping
        self.last_result = r = ap.step()
        if r.changes and is_rank_zero():  # WARNING: a default logging set-up (Python's last resort) shows it
            log.warning("%s", step_change_line(ap, r.step, r.changes))
        return closure_result

    # --- checkpoints ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.ap.state_dict() if self.ap is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores the plugin after connect(); outside fit there is no training state to restore
        if state_dict and self._training and self.ap is not None:
            self.ap.load_state_dict(state_dict)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._training and type(self).__qualname__ not in checkpoint:
            warnings.warn(
                "adaprec: the checkpoint holds no adaprec state (it was not trained with this plugin); "
                "adaprec starts afresh at step 0 with the policy's initial plan",
                stacklevel=2,
            )

    def teardown(self) -> None:
        """Take adaprec's hooks off the model; ``plugin.ap`` stays readable (report, ledger, state)."""
        if self.ap is not None and self._training:
            self.ap.flush_energy()
            self.ap.close()
        self._training = False


class AdaptivePrecisionCallback(Callback):
    """Optional: log adaprec's loss scale, skipped steps, plan changes and energy ledger through ``LightningModule.log``.

    Every step: ``adaprec/loss_scale``, ``adaprec/skipped_steps``. Every
    ``log_every_n_steps``: the ledger totals (``adaprec/energy_modeled_j``,
    ...) and the bits of each ``module.role`` in force from the next step,
    ``adaprec/bits/<module>.<role>``: all of them the first time, then those
    that changed since they were last logged. So any Lightning logger
    (TensorBoard, MLflow, CSV, ...) shows each layer's format over time.

    Args:
        log_every_n_steps: how often the ledger totals are logged (their sum
            runs over every step so far); default: the Trainer's
            ``log_every_n_steps``.
        timeline_path: where to write the precision timeline as JSON when
            training ends (``None``: not written).
    """

    def __init__(self, log_every_n_steps: int | None = None, timeline_path: str | Path | None = None) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise LightningSetupError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.timeline_path = timeline_path
        self.skipped_steps = 0
        self._last_step = -1
        self._bits: dict[str, float] = {}  # bits last logged per module.role
        self._bits_plan: object = None  # the plan they were computed from

    @staticmethod
    def _plugin(trainer: pl.Trainer) -> AdaptivePrecisionPlugin:
        plugin = trainer.precision_plugin
        if not isinstance(plugin, AdaptivePrecisionPlugin):
            raise LightningSetupError(
                "AdaptivePrecisionCallback only logs; adaprec itself runs as a precision plugin: "
                "Trainer(plugins=[AdaptivePrecisionPlugin(policy)], callbacks=[AdaptivePrecisionCallback()])"
            )
        return plugin

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._plugin(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        plugin = self._plugin(trainer)
        r = plugin.last_result
        if r is None or plugin.ap is None or r.step == self._last_step:  # no adaprec step in this batch
            return
        self._last_step = r.step
        self.skipped_steps += not r.stepped
        metrics = {"adaprec/loss_scale": r.loss_scale, "adaprec/skipped_steps": float(self.skipped_steps)}
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 0) or 50
        if r.step % every == 0:
            metrics.update({f"adaprec/{k}": v for k, v in ledger_metrics(plugin.ap).items()})
            metrics.update(self._changed_bits(plugin.ap))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def _changed_bits(self, ap: AdaptivePrecision) -> dict[str, float]:
        """``adaprec/bits/<module>.<role>`` of the plan in force from the next step: new or changed ones only."""
        plan = ap.plan
        if plan is self._bits_plan:
            return {}
        self._bits_plan = plan
        changed = {k: v for k, v in plan_bits(plan).items() if self._bits.get(k) != v}
        self._bits.update(changed)
        return {f"adaprec/bits/{k}": v for k, v in changed.items()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bits, self._bits_plan = {}, None  # a new fit (or a resume) logs every format again

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ap = self._plugin(trainer).ap
        if ap is None:
            return
        if self.timeline_path is not None and trainer.is_global_zero:
            ap.timeline.to_json(self.timeline_path)
        log.info("%s", ap.report())
