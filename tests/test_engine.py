"""The engine applies plans to live models, op by op: emulation by hand, the three GEMMs, native paths, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _train import TinyAttention
from adaprec.engine import Capabilities, PrecisionEngine
from adaprec.errors import ModuleNotSupportedError, PlanError
from adaprec.formats import quantize
from adaprec.plan import ModulePrecision, PrecisionPlan, TensorRecipe

NATIVE_BF16 = Capabilities(native={"gemm": frozenset({"bf16"})}, fast={"gemm": frozenset({"bf16"})})


@pytest.fixture(autouse=True)
def _quiet_emulation_notes():
    # backend="emulate" says once per format that it emulates; these tests ask for it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="adaprec: backend='emulate'")
        warnings.filterwarnings("ignore", message="adaprec: the plan asks for")
        yield


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _engine(model: nn.Module, *inputs: torch.Tensor, plan="fp32", **kw) -> PrecisionEngine:
    eng = PrecisionEngine(model, **kw)
    eng.discover(*inputs)
    eng.set_plan(plan if isinstance(plan, PrecisionPlan) else PrecisionPlan.uniform(eng.kinds, plan))
    return eng


class _Zoo(nn.Module):
    """One of each: conv1d, conv2d, embedding, an elementwise parameter, MHA, SDPA block, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, 4, 3)
        self.c2 = nn.Conv2d(1, 4, 3)
        self.emb = nn.Embedding(10, 16)
        self.scale = _Scale()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.block = TinyAttention()
        self.norm = nn.LayerNorm(16)

    def forward(self, x1, x2, idx):
        h = self.emb(idx)  # (B, T, 16)
        h = self.scale(h)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        h = self.norm(self.block(h))
        return h.sum() + self.c1(x1).sum() + self.c2(x2).sum()


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return x * self.w


def _zoo_inputs():
    return torch.randn(2, 1, 8), torch.randn(2, 1, 6, 6), torch.randint(0, 10, (2, 5))


def test_discovery_finds_every_module_that_runs_a_gemm_and_only_those():
    torch.manual_seed(0)
    model = _Zoo()
    eng = PrecisionEngine(model)
    kinds = eng.discover(*_zoo_inputs())
    assert kinds == {"emb": "embedding", "mha": "mha", "block.qkv": "linear", "block": "attention",
                     "block.proj": "linear", "c1": "conv", "c2": "conv"}
    assert eng.uncovered == {}  # elementwise parameters and LayerNorm run no GEMM: no gap, nothing to report
    # discovery leaves no trace: a later forward under an fp32 plan is the plain model's
    x = _zoo_inputs()
    torch.manual_seed(1)
    ref = model(*x)
    eng.set_plan(PrecisionPlan.uniform(eng.kinds, "fp32"))
    torch.manual_seed(1)
    with eng.activate():
        assert torch.equal(model(*x), ref)


def test_forward_equals_quantized_operands_by_hand():
    model = _mlp()
    x = torch.randn(4, 16)
    eng = _engine(model, x, plan="bf16", backend="emulate")
    with eng.activate():
        y = model(x)
    h = F.relu(F.linear(quantize(x, "bf16"), quantize(model[0].weight, "bf16"), model[0].bias))
    ref = F.linear(quantize(h, "bf16"), quantize(model[2].weight, "bf16"), model[2].bias)
    assert torch.equal(y, ref)
    assert not torch.equal(y, model(x))  # the plan did change the numbers


def test_backward_runs_three_gemms_in_planned_formats():
    torch.manual_seed(1)
    model = nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8, requires_grad=True)
    mp = ModulePrecision(weight=TensorRecipe("fp8_e4m3"), activation=TensorRecipe("fp8_e4m3"),
                         grad_output=TensorRecipe("fp8_e5m2"), grad_weight=TensorRecipe("bf16"))
    eng = _engine(model, x, plan=mp, backend="emulate")
    assert eng.kinds == {"": "linear"}
    g = torch.randn(3, 4)
    eng.begin_step(0, False)
    with eng.activate():
        y = model(x)
    y.backward(g)
    eng.commit_backward()
    xq, wq, gq = quantize(x, "fp8_e4m3"), quantize(model.weight, "fp8_e4m3"), quantize(g, "fp8_e5m2")
    assert torch.equal(y, xq @ wq.t())
    assert torch.equal(x.grad, gq @ wq)
    assert torch.equal(model.weight.grad, quantize(gq.t() @ xq, "bf16"))
    # and the ledger says so: three GEMMs of 3*8*4 MACs, each in its operands' wider format (e4m3 has the
    # longer mantissa), emulated
    gemms = {(g.gemm, g.macs, g.a_role, g.b_role, g.fmt, g.native) for g in eng.pop_step_cost().modules[""].gemms}
    assert gemms == {("forward", 96, "activation", "weight", "fp8_e4m3", False),
                     ("input_grad", 96, "grad_output", "weight", "fp8_e4m3", False),
                     ("weight_grad", 96, "grad_output", "activation", "fp8_e4m3", False)}


def test_bf16_emulation_matches_autocast_within_bound():
    """bf16 emulation rounds operands exactly like autocast; only the output rounding differs.

    autocast rounds each GEMM result to bf16 (relative error <= 2^-8), emulation
    keeps it fp32, so the two agree within one bf16 ulp of the output magnitude.
    """
    model = _mlp()
    x = torch.randn(64, 16)
    eng = _engine(model, x, plan="bf16", backend="emulate")
    with eng.activate():
        y = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x).float()
    bound = 2.0**-8 * ref.abs().amax() * 2
    err = (y - ref).abs().max()
    assert 0 < err <= bound


def test_attention_operands_are_quantized():
    torch.manual_seed(0)
    model = TinyAttention()
    x = torch.randn(2, 5, 16)
    ref = model(x)
    eng = PrecisionEngine(model, backend="emulate")
    eng.discover(x)
    assert eng.kinds == {"qkv": "linear", "": "attention", "proj": "linear"}
    plan = PrecisionPlan.uniform(eng.kinds, "fp32").with_module("", ModulePrecision(activation="fp4_e2m1"))
    eng.set_plan(plan)
    with eng.activate():
        y = model(x)
    assert not torch.equal(y, ref)  # only the SDPA operands changed
    b, t, d = x.shape
    q, k, v = model.qkv(x).split(d, dim=-1)
    q, k, v = (quantize(z, "fp4_e2m1").view(b, t, 2, 8).transpose(1, 2) for z in (q, k, v))
    hand = model.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
    assert torch.allclose(y, hand, atol=1e-6)


def test_multihead_attention_is_one_unit_with_its_projections():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    ref, _ = mha(x, x, x, need_weights=False)
    eng = PrecisionEngine(mha, backend="emulate")
    assert eng.discover(x, x, x, need_weights=False) == {"": "mha"}
    eng.set_plan(PrecisionPlan.uniform(eng.kinds, "fp8-hybrid"))
    eng.begin_step(0, False)
    with eng.activate():
        y, _ = mha(x, x, x, need_weights=False)
    err = (y - ref).abs().max().item()
    assert 0 < err < 0.2 * ref.abs().max().item()
    ops = sorted(g.op for g in eng.pop_step_cost().modules[""].gemms)
    assert ops == ["in_proj_k", "in_proj_q", "in_proj_v", "out_proj", "pv", "qk"]


def test_plan_swap_does_not_rewrap_or_touch_parameters():
    model = _mlp()
    x = torch.randn(2, 16)
    params_before = [id(p) for p in model.parameters()]
    modules_before = [id(m) for m in model.modules()]
    eng = _engine(model, x)
    outs = {}
    for name in ("bf16", "fp8", "fp32", "fp16"):
        eng.set_plan(PrecisionPlan.uniform(eng.kinds, name))
        with eng.activate():
            outs[name] = model(x)
    assert [id(p) for p in model.parameters()] == params_before
    assert [id(m) for m in model.modules()] == modules_before
    assert torch.equal(outs["fp32"], model(x))
    assert not torch.equal(outs["bf16"], outs["fp32"]) and not torch.equal(outs["fp8"], outs["fp32"])


def test_plan_validation_errors_are_clear():
    model = _mlp()
    x = torch.randn(2, 16)
    eng = _engine(model, x)
    with pytest.raises(ModuleNotSupportedError, match="does not have.*nope"):
        eng.set_plan(PrecisionPlan.uniform(["nope"], "bf16"))
    with pytest.raises(PlanError, match="backend"):
        PrecisionEngine(_mlp(), backend="gpu")
    # a module kept out by module_filter cannot be put under a plan: the error says why
    eng = PrecisionEngine(model, module_filter=lambda m, name: name != "2")
    with pytest.warns(UserWarning, match="excluded by module_filter"):
        eng.discover(x)
    assert eng.kinds == {"0": "linear"} and eng.uncovered == {"2": "excluded by module_filter"}
    with pytest.raises(ModuleNotSupportedError, match="2: excluded by module_filter"):
        eng.set_plan(PrecisionPlan.uniform(["0", "2"], "bf16"))
    with pytest.raises(PlanError, match="unknown plan preset"):
        PrecisionPlan.uniform(["0"], "bf17")


def test_module_first_seen_after_the_plan_was_set_runs_fp32_and_says_so():
    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.use_b = False

        def forward(self, x):
            return self.b(self.a(x)) if self.use_b else self.a(x)

    model = Late()
    x = torch.randn(3, 4)
    eng = _engine(model, x, plan="bf16", backend="emulate")
    model.use_b = True
    with pytest.warns(UserWarning, match="after the plan was set up"), eng.activate():
        y = model(x)
    assert "b" in eng.uncovered and "prepare" in eng.uncovered["b"]
    assert torch.equal(y, model.b(_bf16_linear(model.a, x)))  # a under the plan, b in fp32


def _bf16_linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(quantize(x, "bf16"), quantize(lin.weight, "bf16"), lin.bias)


def test_remove_leaves_model_untouched():
    model = _mlp()
    x = torch.randn(2, 16)
    ref = model(x)
    eng = PrecisionEngine(model)
    assert any(m._forward_pre_hooks for m in model.modules())  # discovery watches every module
    eng.discover(x)
    eng.remove()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(model(x), ref)


def test_native_bf16_runs_the_op_in_bf16():
    """Uniform bf16 on a device with bf16 units: the op itself runs in bf16 (as autocast would)."""
    model = _mlp()
    x = torch.randn(8, 16, requires_grad=True)
    eng = _engine(model, x, plan="bf16", backend="native", capabilities=NATIVE_BF16)
    eng.begin_step(0, False)
    with eng.activate():
        y = model(x)
    assert y.dtype == torch.float32
    h = F.relu(F.linear(x.bfloat16(), model[0].weight.bfloat16(), model[0].bias.bfloat16()).float())
    ref = F.linear(h.bfloat16(), model[2].weight.bfloat16(), model[2].bias.bfloat16()).float()
    assert torch.equal(y, ref)
    y.sum().backward()
    eng.commit_backward()
    cost = eng.pop_step_cost()
    assert {(g.fmt, g.native) for m in cost.modules.values() for g in m.gemms} == {("bf16", True)}
    assert model[0].weight.grad.dtype == torch.float32  # master weights and their gradients stay fp32
    # the same plan on a device without bf16 units is emulated, and recorded as such
    eng2 = _engine(_mlp(), x, plan="bf16", backend="auto", capabilities=Capabilities())
    eng2.begin_step(0, False)
    with pytest.warns(UserWarning, match="can only emulate"), eng2.activate():
        eng2.model(x)
    assert {(g.fmt, g.native) for m in eng2.pop_step_cost().modules.values() for g in m.gemms} == {("bf16", False)}


def test_fp32_plan_is_bit_identical_and_counts_everything():
    model = _mlp()
    x = torch.randn(5, 16, requires_grad=True)
    ref = model(x)
    ref.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eng = _engine(model, x, backend="native", capabilities=NATIVE_BF16)
    eng.begin_step(0, False)
    with eng.activate():
        y = model(x)
    y.sum().backward()
    eng.commit_backward()
    assert torch.equal(y, ref)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    cost = eng.pop_step_cost()
    assert cost.macs == 3 * 5 * (16 * 32 + 32 * 8)
    assert cost.covered_macs == cost.macs
