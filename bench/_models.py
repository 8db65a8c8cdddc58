"""Models from outside adaprec, with their data, for the benches that compare it with what users would pick.

Each :class:`Workload` is a model built from its own library's config (a
Hugging Face GPT-2 and BERT, torch's own ``nn.TransformerEncoder``), or one
of adaprec's tasks, plus a seeded batch stream, a loss and a held-out
validation figure. The benches train the same workload under several
variants from the same seed and batches, so step times and losses compare
side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Workload:
    """A model, its batches, its loss and its validation, for one bench row."""

    name: str
    build: Callable[[], nn.Module]
    batches: Callable[[int], Iterator[Batch]]  # seed -> endless batches
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (model output, y) -> scalar
    validate: Callable[[nn.Module], float]  # held-out loss, lower is better
    lr: float
    small: bool = False  # a headline small task (target: never slower than fp32)
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, x: m(x)


@lru_cache(maxsize=1)
def _text() -> tuple[torch.Tensor, torch.Tensor, int]:
    from adaprec.experiments.tasks.char_transformer import encode, load_text

    ids, vocab = encode(load_text())
    ids = ids[:600_000]
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], vocab


def _windows(ids: torch.Tensor, block: int, batch: int, seed: int) -> Iterator[Batch]:
    g = torch.Generator().manual_seed(seed)
    offs = torch.arange(block)
    while True:
        start = torch.randint(0, len(ids) - block - 1, (batch, 1), generator=g)
        yield ids[start + offs], ids[start + offs + 1]


def _lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def _lm_validate(forward: Callable[[nn.Module, torch.Tensor], torch.Tensor], block: int, batch: int,
                 masked: Callable[[torch.Tensor, torch.Tensor, int], Batch] | None = None) -> Callable[[nn.Module], float]:
    @torch.no_grad()
    def validate(model: nn.Module) -> float:
        _, val, vocab = _text()
        was = model.training
        model.eval()
        it = _windows(val, block, batch, seed=2)
        losses = []
        for i in range(4):
            x, y = next(it)
            if masked is not None:
                x, y = masked(x, y, 100 + i)
            losses.append(float(_lm_loss(forward(model, x), y)))
        model.train(was)
        return sum(losses) / len(losses)

    return validate


class EncoderLM(nn.Module):
    """A causal character LM made of torch's own ``nn.TransformerEncoderLayer`` (pre-norm, GELU)."""

    def __init__(self, vocab: int, width: int, heads: int, layers: int, block: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(block, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(block), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        x = self.encoder(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.ln(x))


def encoder_lm(layers: int = 2, width: int = 256, block: int = 128, batch: int = 16) -> Workload:
    _, _, vocab = _text()
    fwd: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, x: m(x)  # noqa: E731
    return Workload(
        f"nn.TransformerEncoder LM ({layers}x{width}, context {block}, batch {batch})",
        lambda: EncoderLM(vocab, width, 4, layers, block),
        lambda seed: _windows(_text()[0], block, batch, seed), _lm_loss, _lm_validate(fwd, block, batch), 1e-3)


def _hf_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(input_ids=x).logits


def gpt2(layers: int = 4, width: int = 384, heads: int = 6, block: int = 256, batch: int = 8) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel

    _, _, vocab = _text()
    cfg = GPT2Config(vocab_size=vocab, n_positions=block, n_embd=width, n_layer=layers, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return Workload(
        f"transformers GPT-2 ({layers}x{width}, context {block}, batch {batch})",
        lambda: GPT2LMHeadModel(cfg), lambda seed: _windows(_text()[0], block, batch, seed), _lm_loss,
        _lm_validate(_hf_logits, block, batch), 1e-3, forward=_hf_logits)


def _mask_chars(vocab: int) -> Callable[[torch.Tensor, torch.Tensor, int], Batch]:
    """BERT's masked-LM targets on characters: 15 % of positions, replaced by a [MASK] id (= ``vocab``)."""

    def masked(x: torch.Tensor, _y: torch.Tensor, seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        pick = torch.rand(x.shape, generator=g) < 0.15
        labels = torch.where(pick, x, torch.full_like(x, -100))
        return torch.where(pick, torch.full_like(x, vocab), x), labels

    return masked


def bert(layers: int = 4, width: int = 384, heads: int = 6, block: int = 256, batch: int = 8) -> Workload:
    from transformers import BertConfig, BertForMaskedLM

    _, _, vocab = _text()
    cfg = BertConfig(vocab_size=vocab + 1, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * width, max_position_embeddings=block, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    masked = _mask_chars(vocab)

    def batches(seed: int) -> Iterator[Batch]:
        for i, (x, y) in enumerate(_windows(_text()[0], block, batch, seed)):
            yield masked(x, y, seed * 100_003 + i)

    return Workload(f"transformers BERT masked LM ({layers}x{width}, context {block}, batch {batch})",
                    lambda: BertForMaskedLM(cfg), batches, _lm_loss,
                    _lm_validate(_hf_logits, block, batch, masked), 1e-3, forward=_hf_logits)


def char_gpt(layers: int, width: int, heads: int, block: int, batch: int, label: str) -> Workload:
    from adaprec.experiments.tasks.char_transformer import CharGPT

    _, _, vocab = _text()
    fwd: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, x: m(x)  # noqa: E731
    return Workload(f"{label} ({layers}x{width}, context {block}, batch {batch})",
                    lambda: CharGPT(vocab, d=width, heads=heads, layers=layers, block=block),
                    lambda seed: _windows(_text()[0], block, batch, seed), _lm_loss,
                    _lm_validate(fwd, block, batch), 1e-3)


def task(name: str) -> Workload:
    """One of adaprec's own headline tasks (real data), its validation the task's held-out loss."""
    from adaprec.experiments.tasks import get_task

    t = get_task(name)

    def batches(seed: int) -> Iterator[Batch]:
        epoch = 0
        while True:
            yield from t.train_loader(seed + epoch)
            epoch += 1

    def validate(model: nn.Module) -> float:
        scores = t.evaluate(model)
        return float(scores.get("val_loss", scores.get("loss", float("nan"))))

    return Workload(f"{name} (adaprec task)", lambda: t.make_model(0), batches, t.loss_fn, validate,
                    t.make_optimizer(nn.Linear(1, 1)).param_groups[0]["lr"], small=True)


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "gpt2": gpt2,
    "bert": bert,
    "encoder": encoder_lm,
    # bench_memory's parameter-heavy regime (101 M parameters, few tokens): the optimizer step dominates
    "encoder-params": lambda: encoder_lm(8, 1024, 32, 2),
    "wide": lambda: char_gpt(6, 384, 6, 256, 8, "the project's wide GPT"),
    "nanogpt": lambda: char_gpt(4, 128, 4, 64, 12, "nanoGPT CPU config"),
    "digits": lambda: task("digits-cnn"),
    "mnist1d": lambda: task("mnist1d-cnn"),
    "mnist-mlp": lambda: task("mnist-mlp"),
}
"""Bench key -> workload factory (built lazily: transformers is imported only when asked for)."""
