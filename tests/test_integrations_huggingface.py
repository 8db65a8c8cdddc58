"""Hugging Face Trainer: real training on scikit-learn's digits, exactness, narrow formats, resume, clear errors."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _train import FAST_INT8_BF16, assert_resumed_exactly  # noqa: E402
from adaprec.errors import AdaprecError  # noqa: E402
from adaprec.integrations.huggingface import (  # noqa: E402
    AdaptivePrecisionTrainer,
    TrainerSetupError,
)
from adaprec.integrations.logging import plan_bits  # noqa: E402

torch.set_num_threads(2)

N_TRAIN, BATCH = 1280, 64
STEPS_PER_EPOCH = N_TRAIN // BATCH
MACS_PER_STEP = 2 * BATCH * (64 * 128 + 128 * 10) + BATCH * 128 * 10  # see test_integrations_lightning


class Digits(torch.utils.data.Dataset):
    def __init__(self, train: bool) -> None:
        d = load_digits()
        sl = slice(0, N_TRAIN) if train else slice(N_TRAIN, None)
        self.x = torch.tensor(d.data[sl], dtype=torch.float32) / 16.0
        self.y = torch.tensor(d.target[sl], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixels": self.x[i], "labels": self.y[i]}


class DigitsMLP(nn.Module):
    """A plain nn.Module in the Trainer's convention: returns the loss when given labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(pixels)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _args(out_dir, **kw) -> transformers.TrainingArguments:
    opts = dict(
        output_dir=str(out_dir), per_device_train_batch_size=BATCH, per_device_eval_batch_size=256,
        learning_rate=1e-2, lr_scheduler_type="constant", num_train_epochs=2, report_to="none",
        disable_tqdm=True, save_strategy="no", logging_steps=10, use_cpu=True, seed=0,
        dataloader_num_workers=0,
    )
    opts.update(kw)
    return transformers.TrainingArguments(**opts)


def _train(out_dir, cls=AdaptivePrecisionTrainer, resume=None, trainer_kw=None, **args_kw):
    torch.manual_seed(0)
    model = DigitsMLP()
    trainer = cls(model=model, args=_args(out_dir, **args_kw), train_dataset=Digits(True),
                  eval_dataset=Digits(False), **(trainer_kw or {}))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def _accuracy(model: DigitsMLP) -> float:
    test = Digits(False)
    with torch.no_grad():
        return float((model.net(test.x).argmax(1) == test.y).float().mean())


@pytest.mark.parametrize("loss_scaling", [False, True])
def test_fp32_trainer_is_bit_identical_to_plain_trainer(tmp_path, loss_scaling):
    """Same seed and data order, gradient clipping, evaluation each epoch: identical weights.

    With loss scaling on (scale 2^16, a power of two: scaling and unscaling
    are exact) this also proves gradients are unscaled before the Trainer clips.
    """
    common = dict(eval_strategy="epoch", max_grad_norm=0.5, lr_scheduler_type="linear")
    plain, _ = _train(tmp_path / "plain", cls=transformers.Trainer, **common)
    ap_kw = {"policy": "fp32", "adaprec_kwargs": {"loss_scaling": loss_scaling}}
    adaptive, trainer = _train(tmp_path / "ap", trainer_kw=ap_kw, **common)
    assert trainer.ap.step_count == 2 * STEPS_PER_EPOCH
    assert trainer.adaprec_optimizer.last_result.loss_scale == (2.0**16 if loss_scaling else 1.0)
    for p, q in zip(plain.parameters(), adaptive.parameters(), strict=True):
        assert torch.equal(p, q)


def test_fp8_hybrid_trains_digits_and_ledger_shows_narrow_macs(tmp_path):
    epochs = 4
    model, trainer = _train(tmp_path, trainer_kw={"policy": "fp8-hybrid", "adaprec_kwargs": {"monitor_every": 5}},
                            num_train_epochs=epochs, eval_strategy="epoch")
    assert _accuracy(model) > 0.85
    s = trainer.ap.energy.summary()
    # this CPU has no fp8 units: the plan runs emulated, and the ledger says so instead of crediting a saving
    assert s["emulated_mac_fraction"] > 0.9 and s["emulated_formats"], s["macs_by_format"]
    # emulation rounds every operand in fp32 arithmetic: the bytes it moves are counted, so it costs more than fp32
    assert s["saving_vs_fp32"] <= 0.0 and s["coverage"] == 1.0
    assert s["bytes_by_class"]["gemm"] < s["bytes"]  # the count covers more than the GEMMs
    assert s["macs"] == epochs * STEPS_PER_EPOCH * MACS_PER_STEP  # evaluation is not charged
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert train_logs and all("adaprec/energy_modeled_j" in h for h in train_logs)
    assert train_logs[-1]["adaprec/narrow_mac_fraction"] == 0.0  # nothing narrow ran natively
    trained = [p for p in model.parameters() if p.requires_grad]
    # fp32 Adam moments, and each parameter's fp32 step count
    assert train_logs[-1]["adaprec/memory/optimizer_state_bytes"] == sum(2 * 4 * p.numel() + 4 for p in trained)
    assert train_logs[-1]["adaprec/bytes_per_step"] > 0
    assert train_logs[-1]["adaprec/emulated_mac_fraction"] > 0.9
    assert train_logs[-1]["adaprec/skipped_steps"] == 0.0


def test_checkpoint_resume_restores_adaprec_state_exactly(tmp_path, caplog):
    """Resumed from its epoch-1 checkpoint, a run ends exactly where the uninterrupted run ends."""
    epochs = 3
    ap_kw = {"policy": "error-budget",
             "adaprec_kwargs": {"monitor_every": 3, "seed": 7, "loss_scaling": True, "hardware": FAST_INT8_BF16}}
    with caplog.at_level(logging.WARNING):  # Python's default level: what a default set-up shows
        full, full_trainer = _train(tmp_path / "full", trainer_kw=ap_kw, num_train_epochs=epochs,
                                    save_strategy="epoch")
    # plan changes: one WARNING line per step that changed the plan, in the default log output
    lines = [r.getMessage() for r in caplog.records if r.name == "adaprec.huggingface" and r.levelno == logging.WARNING]
    change_steps = sorted({ev.step for ev in full_trainer.ap.timeline.events})
    assert change_steps and [int(line.split()[2].rstrip(":")) for line in lines] == change_steps
    assert all(re.match(r"adaprec step \d+: \d+ changes?: net\.\d\.\w+ \S+->\S+ .*error-budget", x) for x in lines)
    # per-layer, per-role bits in the training logs (every report_to logger): all at the first log, then changes
    logs = [h for h in full_trainer.state.log_history if "loss" in h]
    first = {k for k in logs[0] if k.startswith("adaprec/bits/")}
    assert first == {f"adaprec/bits/{k}" for k in plan_bits(full_trainer.ap.plan)}
    shown: dict[str, float] = {}
    for h in logs:
        shown.update({k: v for k, v in h.items() if k.startswith("adaprec/bits/")})
    last_step = logs[-1]["step"]  # global steps done when that log was written
    want = plan_bits(full_trainer.ap.timeline.plans_at(last_step - 1))
    assert shown == {f"adaprec/bits/{k}": v for k, v in want.items()}
    ckpt = tmp_path / "full" / f"checkpoint-{STEPS_PER_EPOCH}"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)["adaprec"]
    assert saved["step"] == STEPS_PER_EPOCH
    assert saved["loss_scaler"] and saved["timeline"]["events"], "the plan should have changed in epoch 1"

    resumed, resumed_trainer = _train(tmp_path / "resumed", trainer_kw=ap_kw, resume=str(ckpt),
                                      num_train_epochs=epochs)
    a, b = full_trainer.ap, resumed_trainer.ap
    assert b.step_count == a.step_count == epochs * STEPS_PER_EPOCH
    assert b.epoch == a.epoch == epochs
    assert_resumed_exactly(a, b, full, resumed)


def test_unsupported_setups_are_clear_errors(tmp_path):
    with pytest.raises(TrainerSetupError, match="gradient_accumulation_steps=2"):
        AdaptivePrecisionTrainer(model=DigitsMLP(), args=_args(tmp_path, gradient_accumulation_steps=2),
                                 train_dataset=Digits(True))
    with pytest.raises(TrainerSetupError, match="fp16/bf16"):
        AdaptivePrecisionTrainer(model=DigitsMLP(), args=_args(tmp_path, bf16=True), train_dataset=Digits(True))
    with pytest.raises(TrainerSetupError, match=r"unknown adaprec_kwargs \['model'\]"):
        AdaptivePrecisionTrainer(model=DigitsMLP(), args=_args(tmp_path), adaprec_kwargs={"model": None})
    with pytest.raises(AdaprecError, match="no-such-policy"):
        AdaptivePrecisionTrainer(model=DigitsMLP(), args=_args(tmp_path), policy="no-such-policy")
    assert issubclass(TrainerSetupError, AdaprecError)
