"""Coverage: every GEMM of real models is under the plan or reported, and the ledger counts every MAC.

Models are real Hugging Face architectures built from small configs (never
downloaded), PyTorch's own encoder layer, and a model of convolutions,
an LSTM and an einsum. The reference count is ``FlopCounterMode`` run on the
very same training step (attention under the math backend, which it can
count); recurrent kernels, which it counts as 0 on CPU, are checked against
the same recurrence written with ``F.linear`` per time step.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import adaprec
from _train import fake_report
from adaprec.engine import MacCounter
from adaprec.errors import PlanError
from adaprec.plan import ModulePrecision, TensorRecipe

try:
    import transformers
    from transformers.pytorch_utils import Conv1D
except ImportError:  # the huggingface extra is not installed: the Hugging Face models are skipped
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="needs transformers (pip install adaprec[huggingface])")

BF16_FAST = fake_report(("bf16",), ("bf16",))
INT8_BF16_FAST = fake_report(("int8", "bf16"), ("bf16",))


# --- models ---------------------------------------------------------------------------------------
def _gpt2(n_embd: int = 128) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=n_embd, n_head=4, vocab_size=256, n_positions=128,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _bert(impl: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, attn_implementation=impl)
    model = transformers.BertForMaskedLM(cfg)
    assert model.config._attn_implementation == impl
    return model


class _Mix(nn.Module):
    """A learned channel mix written as an einsum."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(c_in, c_out) / c_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btc,cd->btd", x, self.w)


class _ConvLstm(nn.Module):
    """Conv3d -> ConvTranspose2d -> LSTM -> einsum channel mix -> linear head."""

    H = 8

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(2, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
        self.lstm = nn.LSTM(12, self.H, batch_first=True)
        self.mix = _Mix(self.H, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 2, 4, 4, 4)
        h = self.up(self.c3(x).mean(2))  # (B, 3, 8, 8)
        seq = h.flatten(2).transpose(1, 2).reshape(h.shape[0], -1, 12)  # (B, 16, 12)
        out, _ = self.lstm(seq)
        return self.head(self.mix(out)).squeeze(-1)


def _lstm_macs(model: _ConvLstm, batch: int) -> int:
    """Hand count of the LSTM's GEMMs in one step: input and recurrent GEMM per token, three times (fwd, dX/dH, dW)."""
    tokens = batch * 16
    return 3 * tokens * (4 * model.H * 12 + 4 * model.H * model.H)


def _ids(vocab: int, shape=(2, 16)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


# (name, model factory, inputs factory, loss of the output)
MODELS = [
    ("gpt2", _gpt2, lambda: (_ids(256),), lambda out: out.logits.float().square().mean()),
    ("bert-eager", lambda: _bert("eager"), lambda: (_ids(128, (2, 12)),), lambda out: out.logits.square().mean()),
    ("bert-sdpa", lambda: _bert("sdpa"), lambda: (_ids(128, (2, 12)),), lambda out: out.logits.square().mean()),
    ("encoder-batch-first", lambda: nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
     lambda: (torch.randn(2, 6, 32),), lambda out: out.square().mean()),
    ("encoder-seq-first", lambda: nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=False),
     lambda: (torch.randn(6, 2, 32),), lambda out: out.square().mean()),
    ("conv-lstm-einsum", _ConvLstm, lambda: (torch.randn(2, 2, 4, 4, 4),), lambda out: out.square().mean()),
]


def _own_macs(fc: FlopCounterMode, model: nn.Module) -> dict[str, int]:
    """MACs FlopCounterMode attributes to each module itself (its total minus its children's)."""
    totals = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    root = type(model).__name__

    def key(name: str) -> str:
        return f"{root}.{name}" if name else root

    def below(name: str, mod: nn.Module) -> int:  # what the modules under ``name`` ran (containers never run)
        return sum(totals.get(key(n), None) or below(n, c)
                   for n, c in ((f"{name}.{c}" if name else c, m) for c, m in mod.named_children()))

    out = {}
    for name, mod in model.named_modules():
        if key(name) in totals:
            own = totals[key(name)] - below(name, mod)
            if own:
                out[name] = own // 2
    return out


def _step_under_flop_counter(name, make, inputs, loss_fn, policy="bf16"):
    """One AdaptivePrecision step with FlopCounterMode watching its forward and its backward pass.

    Returns the model, the controller, the step's StepCost (what the ledger priced), and the
    FlopCounterModes of the forward and of the backward. (FlopCounterMode's per-module view is
    reliable for the forward pass only: its module tracker mis-attributes backward ops, e.g. to
    dropout modules, so the backward is compared in total.)
    """
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="adaprec: lstm")  # the fused-kernel note, checked below
        ap = adaprec.AdaptivePrecision(model, opt, policy, hardware=BF16_FAST)
        costs = []
        record = ap.energy.record
        ap.energy.record = lambda step, plan, cost, **kw: (costs.append(cost), record(step, plan, cost, **kw))[1]
        x = inputs()
        with sdpa_kernel(SDPBackend.MATH):
            with FlopCounterMode(display=False) as fwd, ap.autocast():
                loss = loss_fn(model(*x))
            with FlopCounterMode(display=False) as bwd:
                ap.backward(loss)
            result = ap.step()
    assert result.stepped, result.reason
    (cost,) = costs
    return model, ap, cost, fwd, bwd


@pytest.mark.parametrize(("name", "make", "inputs", "loss_fn"),
                         [pytest.param(*m, id=m[0], marks=[needs_hf] if m[0].startswith(("gpt2", "bert")) else [])
                          for m in MODELS])
def test_every_gemm_is_planned_or_reported_and_the_ledger_counts_what_flop_counter_counts(name, make, inputs, loss_fn):
    model, ap, cost, fwd, bwd = _step_under_flop_counter(name, make, inputs, loss_fn)
    theirs = _own_macs(fwd, model)
    row = ap.energy.steps()[-1]
    summary = ap.energy.summary()
    # every module torch saw multiply is under the plan, or listed as uncovered with a reason
    for module in theirs:
        assert module in ap.engine.kinds or ap.engine.uncovered.get(module), module
    assert set(ap.plan.modules) == set(ap.engine.kinds)
    assert all(reason for reason in ap.engine.uncovered.values())
    # module by module (forward), the ledger's MACs are torch's; the LSTM, which torch counts as 0, by hand
    ours = {n: sum(g.macs for g in mc.gemms if g.gemm == "forward") for n, mc in cost.modules.items()}
    hand = {"lstm": _lstm_macs(model, 2)} if name == "conv-lstm-einsum" else {}
    assert {n for n, m in ours.items() if m} == set(theirs) | set(hand)
    for module, macs in theirs.items():
        assert ours[module] == pytest.approx(macs, rel=0.01), module
    for module, macs in hand.items():
        assert cost.modules[module].macs == macs
    # forward + backward in total, as the ledger recorded the step
    total = (fwd.get_total_flops() + bwd.get_total_flops()) // 2 + sum(hand.values())
    assert row["macs"] == cost.macs == pytest.approx(total, rel=0.01)
    # coverage: the share of MACs under the plan, equal to the hand-computed share
    covered = total - sum(hand.values())
    assert summary["coverage"] == pytest.approx(covered / total, rel=0.01)
    assert summary["covered_macs"] == row["covered_macs"] == cost.covered_macs
    if hand:
        assert set(summary["uncovered"]) == {"lstm"} and "fused recurrent kernel" in summary["uncovered"]["lstm"]
        assert ap.engine.kinds["c3"] == ap.engine.kinds["up"] == "conv" and ap.engine.kinds["mix"] == "einsum"
        assert summary["coverage"] < 1.0
    else:
        assert summary["uncovered"] == {} and summary["coverage"] == 1.0
    # what was narrowed ran natively (bf16 on this device), nothing emulated
    assert summary["emulated_mac_fraction"] == 0.0 and summary["emulated_formats"] == []
    assert summary["narrow_mac_fraction"] == summary["coverage"]
    assert "coverage:" in ap.report()
    if name == "gpt2":  # HF Conv1D's addmm by the weight it multiplies; SDPA by the module running it
        kinds = ap.engine.kinds
        for i in range(2):
            for sub in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                assert kinds[f"transformer.h.{i}.{sub}"] == "linear"
            assert kinds[f"transformer.h.{i}.attn"] == "attention"
        assert kinds["lm_head"] == "linear"  # its weight is tied to wte: attributed to the module running it
        assert kinds["transformer.wte"] == "embedding"


# --- recurrent kernels, counted by hand ---------------------------------------------------------------
def _hand_rnn(rnn: nn.RNNBase, x: torch.Tensor, hx, lengths: list[int] | None = None) -> torch.Tensor:
    """The same recurrence as ``rnn`` (batch_first), one ``F.linear`` per GEMM and time step.

    ``lengths`` (descending): sequence b stops after lengths[b] steps, as a packed sequence does.
    """
    lstm = isinstance(rnn, nn.LSTM)
    h0, c0 = hx if lstm else (hx, None)
    dirs = 2 if rnn.bidirectional else 1
    steps = x.shape[1]
    lengths = lengths or [steps] * x.shape[0]
    layer_in = x
    for layer in range(rnn.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(rnn, "weight_ih" + sfx), getattr(rnn, "weight_hh" + sfx)
            b_ih, b_hh = getattr(rnn, "bias_ih" + sfx), getattr(rnn, "bias_hh" + sfx)
            w_hr = getattr(rnn, "weight_hr" + sfx, None)
            h, c = h0[layer * dirs + d], (c0[layer * dirs + d] if lstm else None)
            out = [None] * steps
            order = range(steps - 1, -1, -1) if d else range(steps)
            for t in order:
                n = sum(1 for L in lengths if L > t)  # rows still running at step t
                gi = F.linear(layer_in[:n, t], w_ih, b_ih)
                gh = F.linear(h[:n], w_hh, b_hh)
                if lstm:
                    i, f, g, o = (gi + gh).chunk(4, 1)
                    c_new = torch.sigmoid(f) * c[:n] + torch.sigmoid(i) * torch.tanh(g)
                    h_new = torch.sigmoid(o) * torch.tanh(c_new)
                    if w_hr is not None:
                        h_new = F.linear(h_new, w_hr)
                    c = torch.cat([c_new, c[n:]])
                else:
                    ri, zi, ni = gi.chunk(3, 1)
                    rh, zh, nh = gh.chunk(3, 1)
                    r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
                    h_new = (1 - z) * torch.tanh(ni + r * nh) + z * h[:n]
                h = torch.cat([h_new, h[n:]])
                out[t] = torch.cat([h_new, h_new.new_zeros(x.shape[0] - n, h_new.shape[1])])
            outs.append(torch.stack(out, 1))
        layer_in = torch.cat(outs, -1)
    return layer_in


RNNS = [
    ("lstm-2-layers", lambda: nn.LSTM(6, 5, num_layers=2, batch_first=True), None),
    ("lstm-proj", lambda: nn.LSTM(6, 7, proj_size=3, batch_first=True), None),
    ("gru-bidirectional", lambda: nn.GRU(6, 5, bidirectional=True, batch_first=True), None),
    ("lstm-packed", lambda: nn.LSTM(6, 5, batch_first=True), [7, 5, 2]),
]


@pytest.mark.parametrize(("name", "make", "lengths"), RNNS, ids=[r[0] for r in RNNS])
def test_recurrent_kernels_count_what_the_same_recurrence_runs_as_linears(name, make, lengths):
    torch.manual_seed(0)
    rnn = make()
    batch, steps = 3, 7
    x = torch.randn(batch, steps, 6, requires_grad=True)
    dirs = 2 if rnn.bidirectional else 1
    h_size = rnn.proj_size or rnn.hidden_size if isinstance(rnn, nn.LSTM) else rnn.hidden_size
    h0 = torch.randn(rnn.num_layers * dirs, batch, h_size, requires_grad=True)
    hx = (h0, torch.randn(rnn.num_layers * dirs, batch, rnn.hidden_size, requires_grad=True)) \
        if isinstance(rnn, nn.LSTM) else h0

    def run_module():
        if lengths is None:
            return rnn(x, hx)[0]
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        return nn.utils.rnn.pad_packed_sequence(rnn(packed, hx)[0], batch_first=True, total_length=steps)[0]

    with FlopCounterMode(display=False) as fc:
        hand = _hand_rnn(rnn, x, hx, lengths)
        hand.square().sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fused-kernel note
        counter = MacCounter(rnn)
        with counter:
            out = run_module()
            out.square().sum().backward()
    cost = counter.pop_step_cost()
    counter.close()
    assert torch.allclose(out, hand, atol=1e-5)  # the same computation
    assert fc.get_total_flops() > 0
    assert 2 * cost.macs == fc.get_total_flops()
    mc = cost.modules[""]
    assert mc.kind == "rnn" and not mc.covered and "fused recurrent kernel" in mc.reason


# --- a narrow policy really narrows GPT-2's Conv1D layers ---------------------------------------------
def _conv1d_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


def _capture(module: nn.Module, store: dict) -> None:
    """Keep the last call's input, output, weight and bias, and the output's gradient."""

    def hook(mod, args, out):
        store.update(x=args[0].detach().clone(), y=out.detach().clone(), w=mod.weight.detach().clone(),
                     b=mod.bias.detach().clone())
        out.register_hook(lambda g: store.__setitem__("g", g.detach().clone()))

    module.register_forward_hook(hook)


GPT2_STEPS = 2


def _train_gpt2(policy, hardware, steps: int = GPT2_STEPS, **kw):
    model = _gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ap = adaprec.AdaptivePrecision(model, opt, policy, hardware=hardware, **kw)
    seen: dict = {}
    _capture(model.transformer.h[0].attn.c_attn, seen)
    ids = _ids(256)
    results = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with ap.autocast():
            loss = model(ids, labels=ids).loss
        ap.backward(loss)
        results.append(ap.step())
    assert all(r.stepped for r in results), [r.reason for r in results]
    return model, ap, seen


def _gemm_macs(model: nn.Module, names: list[str], tokens: int) -> int:
    """Forward + both backward GEMMs of linear-like modules (each input needs a gradient in GPT-2)."""
    total = 0
    for n in names:
        w = model.get_submodule(n).weight
        total += 3 * tokens * w.numel()
    return total


@needs_hf
def test_bf16_policy_runs_gpt2_conv1d_in_bf16():
    model, ap, seen = _train_gpt2("bf16", BF16_FAST)
    convs = _conv1d_names(model)
    assert len(convs) == 8 and "transformer.h.0.attn.c_attn" in convs
    bf16 = TensorRecipe("bf16")
    for plan in [ap.timeline.initial] + [ap.timeline.plans_at(s) for s in range(GPT2_STEPS)] + [ap.plan]:
        for n in convs:
            mp = plan.get(n)
            assert (mp.weight, mp.activation, mp.grad_output) == (bf16, bf16, bf16), n
    # c_attn's output is addmm on bf16 operands, run in bf16, and differs from fp32 as bf16 predicts
    x2 = seen["x"].reshape(-1, seen["x"].shape[-1])
    y2 = seen["y"].reshape(x2.shape[0], -1)
    want = torch.addmm(seen["b"].bfloat16(), x2.bfloat16(), seen["w"].bfloat16()).float()
    assert torch.equal(y2, want)
    fp32 = torch.addmm(seen["b"], x2, seen["w"])
    err = (y2 - fp32).abs()
    assert err.max() > 0
    assert (err <= 2**-7 * (fp32.abs() + (x2.abs() @ seen["w"].abs()) + seen["b"].abs())).all()
    # its weight gradient is the bf16 GEMM of the bf16 operands
    g2 = seen["g"].reshape(y2.shape)
    gw = model.transformer.h[0].attn.c_attn.weight.grad
    assert torch.equal(gw, (x2.bfloat16().t() @ g2.bfloat16()).float())
    # the ledger: every MAC bf16, natively; the Conv1D layers' share is theirs
    s = ap.energy.summary()
    assert set(s["macs_by_format"]) == {"bf16"} and s["native_formats"] == ["bf16"]
    assert s["narrow_mac_fraction"] == 1.0 and s["emulated_mac_fraction"] == 0.0
    conv_macs = sum(s["modules"][n]["macs"] for n in convs)
    assert conv_macs == GPT2_STEPS * _gemm_macs(model, convs, 32)


INT8 = TensorRecipe("int8", scaling="tensor")
INT8_PLAN = ModulePrecision(weight=INT8, activation=INT8,
                            grad_output=TensorRecipe("int8", rounding="stochastic", scaling="tensor"),
                            grad_weight="fp32")


def _int8_codes(t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-tensor int8 codes with the largest power-of-two scale s such that amax * s <= 127."""
    amax = t.abs().max().item()
    s = 2.0 ** torch.floor(torch.log2(torch.tensor(127.0 / amax, dtype=torch.float64))).item()
    assert amax * s <= 127 < amax * 2 * s
    return torch.round(t * s).clamp(-127, 127), s


@needs_hf
def test_int8_plan_runs_gpt2_conv1d_as_int8_gemms():
    pins = {"transformer.h.*.attn": "bf16"}  # the attention products: one 16-bit dtype (their kernel's)
    model, ap, seen = _train_gpt2(INT8_PLAN, INT8_BF16_FAST, pins=pins)
    convs = _conv1d_names(model)
    for plan in [ap.timeline.initial, ap.plan]:
        for n in convs + ["lm_head"]:
            mp = plan.get(n)
            assert (mp.weight.format, mp.activation.format, mp.grad_output.format) == ("int8",) * 3, n
    # c_attn's output is the product of the int8-quantized operands, by an independent quantizer
    x2 = seen["x"].reshape(-1, seen["x"].shape[-1])
    y2 = seen["y"].reshape(x2.shape[0], -1)
    cx, sx = _int8_codes(x2)
    cw, sw = _int8_codes(seen["w"])
    assert x2.shape[1] * 127 * 127 < 2**24  # the integer sums are exact in fp32 too
    want = (cx @ cw) * (1.0 / (sx * sw)) + seen["b"]
    assert torch.equal(y2, want)
    fp32 = torch.addmm(seen["b"], x2, seen["w"])
    err = (y2 - fp32).abs()
    # int8 error: half a code of each operand per product, summed over the contraction
    k = x2.shape[1]
    bound = 0.5 / sx * seen["w"].abs().sum(0) + 0.5 / sw * x2.abs().sum(1, keepdim=True) + 0.75 * k / (sx * sw)
    assert err.max() > 0 and (err <= bound + 1e-6 * (x2.abs() @ seen["w"].abs())).all()
    # the ledger: the Conv1D layers and lm_head ran int8 natively, attention bf16, nothing else
    s = ap.energy.summary()
    linear_macs = _gemm_macs(model, convs + ["lm_head"], 32) * GPT2_STEPS
    attn_macs = sum(s["modules"][f"transformer.h.{i}.attn"]["macs"] for i in range(2))
    assert s["macs_by_format"] == {"int8": linear_macs, "bf16": attn_macs}
    assert s["native_formats"] == ["bf16", "int8"] and s["emulated_formats"] == []


# --- bad input: never silent --------------------------------------------------------------------------
def _one_step(model, x, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ap = adaprec.AdaptivePrecision(model, opt, "bf16", hardware=BF16_FAST, **kw)
    with ap.autocast():
        loss = model(x).float().square().mean()
    ap.backward(loss)
    return ap, ap.step()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_a_model_without_any_gemm_warns():
    with pytest.warns(UserWarning, match="no matmul-like op ran in LayerNorm"):
        ap, res = _one_step(nn.LayerNorm(8), torch.randn(2, 8))
    assert res.stepped and ap.energy.summary()["macs"] == 0 and ap.engine.kinds == {}


def test_everything_pinned_warns():
    with pytest.warns(UserWarning, match="every module that runs GEMMs is pinned"):
        ap, _ = _one_step(_mlp(), torch.randn(2, 8), pins={"*": "fp32"})
    assert ap.plan.pinned == {"0", "2"}
    with pytest.warns(UserWarning, match="every module that runs GEMMs is pinned"):
        _one_step(nn.Embedding(10, 4), torch.randint(0, 10, (2, 3)))  # embeddings are pinned fp32 by default


def test_module_filter_exclusion_is_uncovered_with_its_reason_and_coverage_says_how_much():
    with pytest.warns(UserWarning, match="0 \\(Linear\\) runs linear in fp32: excluded by module_filter"):
        ap, _ = _one_step(_mlp(), torch.randn(2, 8), module_filter=lambda m, name: name != "0")
    assert ap.engine.uncovered == {"0": "excluded by module_filter"}
    assert "0" not in ap.plan.modules and ap.plan.get("2").weight.format == "bf16"
    s = ap.energy.summary()
    assert s["uncovered"] == {"0": "excluded by module_filter"}
    first = 2 * 2 * 8 * 8  # forward + weight grad (its input needs no gradient)
    second = 3 * 2 * 8 * 2
    assert s["macs"] == first + second
    assert s["coverage"] == pytest.approx(second / (first + second), rel=1e-12)
    assert s["macs_by_format"] == {"fp32": first, "bf16": second}
    with pytest.warns(UserWarning) as seen:
        _one_step(_mlp(), torch.randn(2, 8), module_filter=lambda m, name: False)
    messages = [str(w.message) for w in seen]
    assert any("no module that runs GEMMs is under the plan" in m for m in messages)
    assert sum("excluded by module_filter" in m for m in messages) == 3  # each module once, then the summary


def test_pins_that_match_no_module_are_a_plan_error():
    model = _mlp()
    ap = adaprec.AdaptivePrecision(model, torch.optim.SGD(model.parameters(), lr=0.1), "bf16",
                                   hardware=BF16_FAST, pins={"encoder.*": "fp32"})
    with pytest.raises(PlanError, match="'encoder.\\*' matches no module.*0, 2"):
        ap.prepare(torch.randn(2, 8))
