"""Lightning's DDP strategy and the Hugging Face Trainer (Accelerate) on 2 CPU processes, with adaprec.

Each rank sees other batches (the trainers' distributed samplers); adaprec must take
the same decisions on both. The process group is initialised before the trainer
starts (as torchrun's environment describes it), and both trainers join it.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

from test_distributed import run_ranks  # noqa: F401 - the forkserver launcher

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

EB = {"name": "error-budget", "warmup_steps": 4, "patience": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(rank: int, port: int) -> None:
    """What torchrun would set for this rank (Lightning and Accelerate read it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), GROUP_RANK="0", LOCAL_WORLD_SIZE="2", TORCHELASTIC_RUN_ID="adaprec-test")


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def _lightning(rank: int, port: int) -> dict:
    _torchrun_env(rank, port)
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from _train import FAST_INT8_BF16
    from adaprec.integrations.lightning import AdaptivePrecisionPlugin

    class Digits(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=3e-3)

    x, y = _digits()
    plugin = AdaptivePrecisionPlugin(EB, hardware=FAST_INT8_BF16, monitor_every=2)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[plugin], max_steps=24, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = Digits()
    trainer.fit(module, DataLoader(TensorDataset(x[:1280], y[:1280]), batch_size=32))
    ap = plugin.ap
    return {"events": [e.to_dict() for e in ap.timeline.events], "plan": ap.plan.to_dict(),
            "world_size": ap.energy.summary()["world_size"], "steps": ap.step_count,
            "first_weight": module.net[0].weight.detach()[0, :4].clone()}


def _huggingface(rank: int, port: int) -> dict:
    _torchrun_env(rank, port)
    import transformers

    from _train import FAST_INT8_BF16
    from adaprec.integrations.huggingface import AdaptivePrecisionTrainer

    x, y = _digits()

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1280

        def __getitem__(self, i):
            return {"pixels": x[i], "labels": y[i]}

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

        def forward(self, pixels, labels=None):
            logits = self.net(pixels)
            return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}

    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=32, learning_rate=3e-3, max_steps=24,
        report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=100, use_cpu=True, seed=0,
        dataloader_num_workers=0, ddp_backend="gloo",
    )
    model = Model()
    trainer = AdaptivePrecisionTrainer(model=model, args=args, train_dataset=Data(), policy=EB,
                                       adaprec_kwargs={"hardware": FAST_INT8_BF16, "monitor_every": 2})
    trainer.train()
    ap = trainer.ap
    return {"events": [e.to_dict() for e in ap.timeline.events], "plan": ap.plan.to_dict(),
            "world_size": ap.energy.summary()["world_size"], "steps": ap.step_count,
            "first_weight": model.net[0].weight.detach()[0, :4].clone()}


def _both(rank: int, port: int) -> dict:
    out = {}
    try:
        import lightning.pytorch  # noqa: F401

        out["lightning"] = _lightning(rank, port)
    except ImportError:
        out["lightning"] = None
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401

        out["huggingface"] = _huggingface(rank, port)
    except ImportError:
        out["huggingface"] = None
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_both, _free_port(), timeout=240)


@pytest.mark.parametrize("trainer", ["lightning", "huggingface"])
def test_trainer_ddp_takes_one_decision_on_every_rank(ranks, trainer):
    r0, r1 = (r[trainer] for r in ranks)
    if r0 is None:
        pytest.skip(f"{trainer} is not installed")
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["steps"] == r1["steps"] == 24
    assert r0["events"], "no precision change: nothing was decided"
    assert r0["events"] == r1["events"] and r0["plan"] == r1["plan"]
    assert all(not e["module"].startswith("module.") for e in r0["events"])
    assert torch.equal(r0["first_weight"], r1["first_weight"])  # DDP kept the replicas identical
