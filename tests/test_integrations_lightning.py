"""Lightning plugin: real training on scikit-learn's digits, exactness, narrow formats, resume, clear errors."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from _train import FAST_INT8_BF16, assert_resumed_exactly  # noqa: E402
from adaprec.errors import AdaprecError  # noqa: E402
from adaprec.integrations.lightning import (  # noqa: E402
    AdaptivePrecisionCallback,
    AdaptivePrecisionPlugin,
    LightningSetupError,
)
from adaprec.integrations.logging import plan_bits  # noqa: E402
from adaprec.timeline import Timeline  # noqa: E402

torch.set_num_threads(2)

N_TRAIN, BATCH = 1280, 64
STEPS_PER_EPOCH = N_TRAIN // BATCH
# MACs of one step of the 64-128-10 MLP at batch 64: two forward GEMMs, two
# weight-gradient GEMMs, one input-gradient GEMM (the input needs no gradient)
MACS_PER_STEP = 2 * BATCH * (64 * 128 + 128 * 10) + BATCH * 128 * 10


def _digits() -> tuple[TensorDataset, TensorDataset]:
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


class DigitsMLP(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about adaprec."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _fit(tmp_path, plugins=(), callbacks=(), epochs=2, shuffle=True, ckpt_path=None, module=None, **trainer_kw):
    train, val = _digits()
    pl.seed_everything(0, verbose=False)
    module = module or DigitsMLP()
    opts = dict(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    opts.update(trainer_kw)
    trainer = pl.Trainer(plugins=list(plugins), callbacks=list(callbacks), **opts)
    trainer.fit(
        module,
        DataLoader(train, batch_size=BATCH, shuffle=shuffle),
        DataLoader(val, batch_size=256),
        ckpt_path=ckpt_path,
    )
    return module, trainer


def _accuracy(module: DigitsMLP) -> float:
    _, val = _digits()
    x, y = val.tensors
    with torch.no_grad():
        return float((module.net(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("loss_scaling", [False, True])
def test_fp32_plugin_is_bit_identical_to_plain_lightning(tmp_path, loss_scaling):
    """Same seed, same data order, clipping on, validation every epoch: the weights match bit for bit.

    With loss scaling on (scale 2^16, a power of two: scaling and unscaling
    are exact) this also proves gradients are unscaled before Lightning clips.
    """
    plain, _ = _fit(tmp_path, gradient_clip_val=0.5)
    plugin = AdaptivePrecisionPlugin("fp32", monitor_every=5, loss_scaling=loss_scaling)
    adaptive, trainer = _fit(tmp_path, plugins=[plugin], gradient_clip_val=0.5)
    assert trainer.precision_plugin is plugin
    assert plugin.ap.step_count == 2 * STEPS_PER_EPOCH
    assert plugin.last_result.loss_scale == (2.0**16 if loss_scaling else 1.0)
    for p, q in zip(plain.parameters(), adaptive.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("policy", ["fp8-hybrid", "error-budget"])
def test_narrow_policy_trains_digits_and_ledger_shows_narrow_macs(tmp_path, policy, caplog):
    plugin = AdaptivePrecisionPlugin(policy, monitor_every=5, hardware=FAST_INT8_BF16)
    callback = AdaptivePrecisionCallback(log_every_n_steps=10, timeline_path=tmp_path / "timeline.json")
    epochs = 4
    with caplog.at_level(logging.WARNING):  # Python's default level: what a default set-up shows
        module, trainer = _fit(tmp_path, plugins=[plugin], callbacks=[callback], epochs=epochs,
                               num_sanity_val_steps=2)
    assert _accuracy(module) > 0.85
    s = plugin.ap.energy.summary()
    assert s["coverage"] == 1.0
    if policy == "fp8-hybrid":  # no fp8 units on this CPU: emulated, and the ledger says so
        assert s["emulated_mac_fraction"] > 0.9 and s["saving_vs_fp32"] == pytest.approx(0.0), s["macs_by_format"]
    else:  # hardware-aware: only formats this device runs natively (the fake report says int8 and bf16)
        assert s["narrow_mac_fraction"] > 0.5 and not s["emulated_formats"], s["macs_by_format"]
        assert s["saving_vs_fp32"] > 0.2
    # every training step and nothing else: sanity checks and validation are not charged
    assert s["macs"] == epochs * STEPS_PER_EPOCH * MACS_PER_STEP
    logged = trainer.callback_metrics
    assert float(logged["adaprec/narrow_mac_fraction"]) == pytest.approx(s["narrow_mac_fraction"], rel=1e-6)
    assert float(logged["adaprec/skipped_steps"]) == 0.0
    assert "adaprec/energy_modeled_j" in logged
    assert Timeline.from_json(tmp_path / "timeline.json") == plugin.ap.timeline
    # plan changes: one WARNING line per step that changed the plan, in the default log output
    lines = [r.getMessage() for r in caplog.records if r.name == "adaprec.lightning" and r.levelno == logging.WARNING]
    change_steps = sorted({ev.step for ev in plugin.ap.timeline.events})
    assert [int(line.split()[2].rstrip(":")) for line in lines] == change_steps
    if policy == "error-budget":
        assert change_steps and all(re.match(r"adaprec step \d+: \d+ changes?: net\.\d\.\w+ \S+->\S+", x) for x in lines)
        assert "error-budget" in lines[-1], lines[-1]
    # per-layer, per-role bits through LightningModule.log (so any Lightning logger): the plan in force after
    # the last logging step
    every = 10
    last_logged = max(s for s in range(epochs * STEPS_PER_EPOCH) if s % every == 0)
    want = plan_bits(plugin.ap.timeline.plans_at(last_logged))
    assert {k: float(v) for k, v in logged.items() if k.startswith("adaprec/bits/")} == {
        f"adaprec/bits/{k}": v for k, v in want.items()}


def test_checkpoint_resume_restores_adaprec_state_exactly(tmp_path):
    """A run resumed from its epoch-1 checkpoint ends exactly where the uninterrupted run ends."""
    epochs = 3

    def plugin():
        return AdaptivePrecisionPlugin("error-budget", monitor_every=3, seed=7, loss_scaling=True,
                                       hardware=FAST_INT8_BF16)

    ckpt_dir = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    full_plugin = plugin()
    full, _ = _fit(tmp_path, plugins=[full_plugin], callbacks=[saver], epochs=epochs, shuffle=False,
                   enable_checkpointing=True)
    ck = torch.load(ckpt_dir / "epoch=0.ckpt", weights_only=True)
    saved = ck["AdaptivePrecisionPlugin"]
    assert saved["step"] == STEPS_PER_EPOCH
    assert saved["loss_scaler"] and saved["timeline"]["events"], "the plan should have changed in epoch 1"

    resumed_plugin = plugin()
    resumed, _ = _fit(tmp_path, plugins=[resumed_plugin], epochs=epochs, shuffle=False,
                      ckpt_path=ckpt_dir / "epoch=0.ckpt")
    a, b = full_plugin.ap, resumed_plugin.ap
    assert b.step_count == a.step_count == epochs * STEPS_PER_EPOCH
    assert_resumed_exactly(a, b, full, resumed)


def test_unsupported_setups_are_clear_errors(tmp_path):
    with pytest.raises(LightningSetupError, match="automatic optimization"):
        _fit(tmp_path, plugins=[AdaptivePrecisionPlugin("bf16")], module=DigitsMLP(manual=True), epochs=1)
    with pytest.raises(LightningSetupError, match="accumulate_grad_batches"):
        _fit(tmp_path, plugins=[AdaptivePrecisionPlugin("bf16")], epochs=1, accumulate_grad_batches=2)
    with pytest.raises(LightningSetupError, match="plugins="):
        _fit(tmp_path, callbacks=[AdaptivePrecisionCallback()], epochs=1)
    with pytest.raises(LightningSetupError, match=r"unknown AdaptivePrecision options \['monitor_evry'\]"):
        AdaptivePrecisionPlugin("bf16", monitor_evry=5)
    with pytest.raises(AdaprecError, match="no-such-policy"):
        AdaptivePrecisionPlugin("no-such-policy")
    assert issubclass(LightningSetupError, AdaprecError)
