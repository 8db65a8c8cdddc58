"""adaprec.explain / `adaprec explain`: every GEMM, its formats here and its cost, counted as FlopCounterMode counts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import adaprec
from _train import fake_report
from adaprec.cli import main
from adaprec.errors import AdaprecError
from adaprec.experiments.runner import epoch_seed
from adaprec.experiments.tasks import get_task, task_names
from adaprec.explainer import Explanation, explain_task

torch.set_num_threads(2)
HW = fake_report()  # int8 and bf16 fast for GEMMs, bf16 for convs, nothing for attention


def _flop_counter_macs(step) -> int:
    """MACs of one forward+backward as torch counts them (attention on the math path, as the engine counts it)."""
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        step()
    return fc.get_total_flops() // 2


def _check_rows(e: Explanation) -> None:
    assert sum(r.macs for r in e.rows) == e.total_macs > 0
    for r in e.rows:
        assert r.forward_macs > 0 and r.shapes
        assert "fp32" in r.formats and r.native["fp32"] and set(r.native) == set(r.formats)
        assert r.best in r.formats and r.native[r.best]
        assert 0 < r.best_j <= r.fp32_j
    json.dumps(e.to_dict())  # plain data


@pytest.mark.parametrize("name", task_names())
def test_every_builtin_task_matches_flop_counter(name: str) -> None:
    task = get_task(name)
    x, y = next(iter(task.train_loader(epoch_seed(0, 0))))  # the batch `adaprec explain` uses
    e = adaprec.explain(task.make_model(0), x, hardware=HW, loss_fn=lambda out: task.loss_fn(out, y), name=name)
    model = task.make_model(0)
    rnn = sum(r.macs for r in e.rows if r.kind == "rnn")  # FlopCounterMode counts 0 for fused LSTM/GRU on CPU
    assert e.total_macs - rnn == _flop_counter_macs(lambda: task.loss_fn(model(x), y).backward())
    _check_rows(e)
    assert e.coverage == 1.0 and not e.uncovered
    assert e.model == name and "guard(error-budget)" in e.policy
    table = e.table()
    assert table.splitlines()[2].startswith("coverage: 100.0 % of") and f"{e.total_macs:,} MACs" in table
    for r in e.rows:
        assert f"| {r.module} | {r.op} |" in table
    by_kind = {r.kind: r for r in e.rows}
    if "linear" in by_kind:  # the fake device runs int8 and bf16 GEMMs natively and fast
        lin = by_kind["linear"]
        assert lin.formats == ("int8", "bf16", "fp32") and all(lin.native.values())
        assert lin.best == "int8" and lin.speedup == 3.0
    if "conv" in by_kind:
        assert by_kind["conv"].formats == ("bf16", "fp32")
    if "attention" in by_kind:  # nothing fast for attention on the fake device
        att = by_kind["attention"]
        assert att.formats == ("fp32",) and att.best == "fp32" and att.start == "fp32"


def test_hf_gpt2_from_config_matches_flop_counter() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=256, n_positions=128)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 256, (2, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    e = adaprec.explain(model, {"input_ids": ids, "labels": ids}, hardware=HW)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert e.total_macs == _flop_counter_macs(lambda: model(input_ids=ids, labels=ids).loss.backward())
    _check_rows(e)
    ops = {(r.module, r.op) for r in e.rows}
    assert ("transformer.h.0.attn.c_attn", "addmm") in ops  # HF Conv1D is a linear with a transposed weight
    assert ("transformer.h.1.attn", "attention") in ops and ("lm_head", "linear") in ops  # lm_head tied to wte
    assert e.coverage == 1.0
    c_attn = next(r for r in e.rows if r.module == "transformer.h.0.attn.c_attn")
    assert c_attn.shapes == ((128, 128), (128, 384)) and c_attn.best == "int8"


class _Recurrent(nn.Module):
    """An LSTM (a fused kernel adaprec cannot narrow), a linear head and batch norm (buffers to restore)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.fc = nn.Linear(32, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(x))
        return self.bn(self.fc(h[:, -1]))


def test_uncovered_ops_are_listed_with_the_reason_and_the_model_is_left_as_it_was() -> None:
    torch.manual_seed(0)
    model = _Recurrent()
    x = torch.randint(0, 50, (8, 12))
    stats, rng = model.bn.running_mean.clone(), torch.get_rng_state()
    e = adaprec.explain(model, x, hardware=HW)
    assert torch.equal(model.bn.running_mean, stats) and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    lstm = next(r for r in e.rows if r.module == "lstm")
    assert not lstm.covered and lstm.formats == ("fp32",) and "fused recurrent kernel" in lstm.reason
    assert set(e.uncovered) == {"lstm"}
    assert e.coverage == pytest.approx(1 - lstm.macs / e.total_macs)
    assert "not covered, runs fp32: lstm (" in e.table("plain")
    assert e.total_macs - lstm.macs == _flop_counter_macs(lambda: model(x).sum().backward())
    assert not any(r.module == "emb" for r in e.rows)  # a gather, no GEMM
    # nothing stays attached: a controller can take the model now
    ap = adaprec.AdaptivePrecision(model, torch.optim.SGD(model.parameters(), lr=0.1), hardware=HW)
    ap.close()


class _Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, -1).permute(2, 0, 3, 1, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


class _Mixed(nn.Module):
    """Every op class the probe tells apart: a conv, linears, attention, and an einsum of two activations."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, d, 3, padding=1)
        self.attn = _Attention(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)
        h = self.attn(h)
        return self.head(torch.einsum("bld,ble->bde", h, h).mean(1))


def test_formats_are_the_controllers_hardware_allowed_set() -> None:
    """The formats shown are what the controller's policy may use here: its _allowed() and its candidates."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 12)
    e = adaprec.explain(_Mixed(), x, hardware=HW)
    assert {r.op for r in e.rows} == {"conv1d", "linear", "attention", "einsum"}
    assert e.total_macs == _flop_counter_macs(lambda: _Mixed()(x).sum().backward())
    model = _Mixed()
    ap = adaprec.AdaptivePrecision(model, torch.optim.SGD(model.parameters(), lr=0.1), hardware=HW)
    try:
        ap.prepare(x)
        allowed, _ = ap.allowed_formats()
        wanted = set(ap.policy.candidate_formats)
        for r in e.rows:
            assert set(r.formats) == (allowed[r.module] & wanted) | {"fp32"}, r.module
            assert r.start == ap.plan.get(r.module).weight.short().split("/")[0]
    finally:
        ap.close()
    # no native narrow format at all: everything shown runs fp32
    bare = adaprec.explain(_Mixed(), x, hardware=None)
    assert all(r.formats == ("fp32",) and r.best_j == r.fp32_j for r in bare.rows)
    assert bare.total_macs == e.total_macs


def test_static_policy_and_research_mode() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(16, 32)
    bf16 = adaprec.explain(model, x, policy="bf16", hardware=HW)
    assert all(r.start == "bf16" and r.formats == ("bf16", "fp32") for r in bf16.rows)
    research = adaprec.explain(model, x, hardware=HW, backend="emulate")  # any format, emulated: none native
    row = research.rows[0]
    assert {"int4", "fp8_e4m3", "int8", "bf16"} <= set(row.formats)
    assert [f for f in row.formats if row.native[f]] == ["fp32"] and row.best == "fp32"
    assert "research mode" in " ".join(research.notes)


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(AdaprecError, match="needs a torch.nn.Module"):
        adaprec.explain(lambda x: x, torch.randn(2))  # type: ignore[arg-type]
    with pytest.raises(AdaprecError, match="unknown task 'no-such-task'"):
        explain_task("no-such-task")
    with pytest.raises(AdaprecError, match="style"):
        adaprec.explain(nn.Linear(4, 4), torch.randn(2, 4), hardware=HW).table("html")


def test_cli_prints_the_table(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["explain", "digits-cnn", "--format", "plain"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("adaprec explain: digits-cnn on ") and "coverage: 100.0 % of" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line[:5] in ("conv1", "conv2", "fc   ")}
    assert rows == {"conv1": "conv2d", "conv2": "conv2d", "fc": "linear"}
    config = tmp_path / "exp.yaml"
    config.write_text("task: mnist-mlp\npolicies: [fp32, bf16]\nsteps: 10\n")
    assert main(["explain", str(config), "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "mnist-mlp" and d["policy"] == "guard(bf16)" and d["coverage"] == 1.0
    assert d["total_macs"] == sum(r["macs"] for r in d["rows"])


def test_cli_bad_input_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "no-such-task"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adaprec: error: unknown task 'no-such-task'")
    assert main(["explain", "nowhere.module:make"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot import module 'nowhere.module'" in err
