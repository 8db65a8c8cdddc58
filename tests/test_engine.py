"""The engine applies plans to live models: emulation, native paths, coverage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaprec.engine import PrecisionEngine
from adaprec.errors import ModuleNotSupportedError, PlanError
from adaprec.formats import quantize
from adaprec.plan import ModulePrecision, PrecisionPlan, TensorRecipe


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


class TinyAttention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


def test_discovers_matmul_modules_and_reports_the_rest():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Conv2d(1, 4, 3), nn.Embedding(10, 4), Odd(),
                          nn.MultiheadAttention(4, 1), TinyAttention(), nn.LayerNorm(4))
    with pytest.warns(UserWarning, match="cannot quantize"):
        eng = PrecisionEngine(model)
    assert eng.kinds == {"0": "conv", "1": "conv", "2": "embedding", "4": "attention",
                         "5": "attention", "5.qkv": "linear", "5.proj": "linear"}
    assert any(u.startswith("3 (Odd)") for u in eng.unsupported)
    assert not any("LayerNorm" in u for u in eng.unsupported)  # kept fp32 by design, not a gap


def test_forward_equals_quantized_operands_by_hand():
    model = _mlp()
    eng = PrecisionEngine(model, backend="emulate")
    eng.set_plan(PrecisionPlan.uniform(eng.kinds, "bf16"))
    x = torch.randn(4, 16)
    with eng.activate():
        y = model(x)
    h = F.relu(F.linear(quantize(x, "bf16"), quantize(model[0].weight, "bf16"), model[0].bias))
    ref = F.linear(quantize(h, "bf16"), quantize(model[2].weight, "bf16"), model[2].bias)
    assert torch.equal(y, ref)


def test_backward_runs_three_gemms_in_planned_formats():
    model = nn.Linear(8, 4, bias=False)
    torch.manual_seed(1)
    eng = PrecisionEngine(model, backend="emulate")
    mp = ModulePrecision(weight=TensorRecipe("fp8_e4m3"), activation=TensorRecipe("fp8_e4m3"),
                         grad_output=TensorRecipe("fp8_e5m2"), grad_weight=TensorRecipe("bf16"))
    eng.set_plan(PrecisionPlan({"": mp}) if "" in eng.kinds else PrecisionPlan.uniform(eng.kinds, mp))
    x = torch.randn(3, 8, requires_grad=True)
    g = torch.randn(3, 4)
    with eng.activate():
        y = model(x)
    y.backward(g)
    xq, wq, gq = quantize(x, "fp8_e4m3"), quantize(model.weight, "fp8_e4m3"), quantize(g, "fp8_e5m2")
    assert torch.equal(y, xq @ wq.t())
    assert torch.equal(x.grad, gq @ wq)
    assert torch.equal(model.weight.grad, quantize(gq.t() @ xq, "bf16"))


def test_bf16_emulation_matches_autocast_within_bound():
    """bf16 emulation rounds operands exactly like autocast; only the output rounding differs.

    autocast rounds each GEMM result to bf16 (relative error <= 2^-8), emulation
    keeps it fp32, so the two agree within one bf16 ulp of the output magnitude.
    """
    model = _mlp()
    eng = PrecisionEngine(model, backend="emulate")
    eng.set_plan(PrecisionPlan.uniform(eng.kinds, "bf16"))
    x = torch.randn(64, 16)
    with eng.activate():
        y = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x).float()
    bound = 2.0**-8 * ref.abs().amax() * 2
    assert (y - ref).abs().max() <= bound


def test_attention_operands_are_quantized():
    torch.manual_seed(0)
    model = TinyAttention()
    eng = PrecisionEngine(model, backend="emulate")
    x = torch.randn(2, 5, 16)
    ref = model(x)
    plan = PrecisionPlan.uniform(eng.kinds, "fp32").with_module("", ModulePrecision(activation="fp4_e2m1"))
    eng.set_plan(plan)
    with eng.activate():
        y = model(x)
    assert not torch.equal(y, ref)  # only the SDPA operands changed
    # and by hand: q, k, v rounded to fp4
    b, t, d = x.shape
    q, k, v = model.qkv(x).split(d, dim=-1)
    q, k, v = (quantize(z, "fp4_e2m1").view(b, t, 2, 8).transpose(1, 2) for z in (q, k, v))
    hand = model.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
    assert torch.allclose(y, hand, atol=1e-6)


def test_multihead_attention_is_one_unit():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    eng = PrecisionEngine(mha, backend="emulate")
    assert eng.kinds == {"": "attention"}
    x = torch.randn(2, 5, 16)
    ref, _ = mha(x, x, x, need_weights=False)
    eng.set_plan(PrecisionPlan.uniform(eng.kinds, "fp8-hybrid"))
    with eng.activate():
        y, _ = mha(x, x, x, need_weights=False)
    err = (y - ref).abs().max().item()
    assert 0 < err < 0.2 * ref.abs().max().item()


def test_plan_swap_does_not_rewrap_or_touch_parameters():
    model = _mlp()
    params_before = [id(p) for p in model.parameters()]
    eng = PrecisionEngine(model)
    for name in ("bf16", "fp8", "fp32", "fp16"):
        eng.set_plan(PrecisionPlan.uniform(eng.kinds, name))
    assert [id(p) for p in model.parameters()] == params_before
    assert len(list(model.named_modules())) == 4


def test_unknown_module_in_plan_and_bad_backend_are_clear_errors():
    eng = PrecisionEngine(_mlp())
    with pytest.raises(ModuleNotSupportedError, match="Quantizable modules"):
        eng.set_plan(PrecisionPlan.uniform(["nope"], "bf16"))
    with pytest.raises(PlanError, match="backend"):
        PrecisionEngine(_mlp(), backend="gpu")


def test_remove_leaves_model_untouched():
    model = _mlp()
    x = torch.randn(2, 16)
    ref = model(x)
    eng = PrecisionEngine(model)
    eng.remove()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(model(x), ref)


def test_native_bf16_equals_autocast_on_linear():
    model = _mlp()
    eng = PrecisionEngine(model, backend="native")
    eng.set_plan(PrecisionPlan.uniform(eng.kinds, "bf16"))
    x = torch.randn(8, 16)
    with eng.activate():
        y = model(x)
    h = F.relu(F.linear(x.bfloat16(), model[0].weight.bfloat16(), model[0].bias.bfloat16()).float())
    ref = F.linear(h.bfloat16(), model[2].weight.bfloat16(), model[2].bias.bfloat16()).float()
    assert torch.equal(y, ref)


def test_native_fp8_scaled_mm_agrees_with_emulation():
    """Native fp8 (torch._scaled_mm) and emulation quantize identically.

    Operands are the same fp8 values under the same power-of-two scales, so
    the products are exact in both; only the fp32 accumulation order differs
    (relative 1e-5 of the output scale is ample). The weight gradient differs
    by the plan's bf16 rounding of it, which emulation applies and the native
    GEMM (fp32 output) does not: within 2^-8 relative.
    """
    torch.manual_seed(0)
    mk = lambda: nn.Linear(32, 16)  # noqa: E731
    nat, emu = mk(), mk()
    emu.load_state_dict(nat.state_dict())
    out = {}
    for key, model, backend in (("native", nat, "native"), ("emulate", emu, "emulate")):
        eng = PrecisionEngine(model, backend=backend)
        plan = PrecisionPlan.uniform(eng.kinds, "fp8-hybrid")
        plan = plan.map(lambda n, mp: ModulePrecision(
            weight=mp.weight, activation=mp.activation,
            grad_output=TensorRecipe("fp8_e5m2", scaling="tensor"), grad_weight="fp32"))
        eng.set_plan(plan)
        x = torch.randn(24, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
        with eng.activate():
            y = model(x)
        y.backward(torch.randn(24, 16, generator=torch.Generator().manual_seed(4)))
        out[key] = (y.detach(), x.grad, model.weight.grad)
    for a, b in zip(out["native"], out["emulate"], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_native_fp8_rowwise_forward_equals_emulation_and_backward_agrees():
    """Row-wise scales: the forward GEMM sees identical fp8 operands in both paths.

    Backward, native folds the forward operands' row scales into the gradient
    before its e5m2 cast (so each _scaled_mm keeps scales on outer dims) while
    emulation casts the gradient itself: same format, different rounding
    points, so gradients agree to e5m2 precision (2^-3 relative per element,
    far less on the accumulated sums).
    """
    torch.manual_seed(0)
    nat, emu = nn.Linear(32, 16), nn.Linear(32, 16)
    emu.load_state_dict(nat.state_dict())
    rowwise = ModulePrecision(
        weight=TensorRecipe("fp8_e4m3", scaling="row"), activation=TensorRecipe("fp8_e4m3", scaling="row"),
        grad_output=TensorRecipe("fp8_e5m2", scaling="tensor"), grad_weight="fp32")
    out = {}
    for key, model in (("native", nat), ("emulate", emu)):
        eng = PrecisionEngine(model, backend=key)
        eng.set_plan(PrecisionPlan.uniform(eng.kinds, rowwise))
        x = torch.randn(24, 32, generator=torch.Generator().manual_seed(3)) * torch.logspace(-2, 2, 24)[:, None]
        x.requires_grad_(True)
        with eng.activate():
            y = model(x)
        y.backward(torch.randn(24, 16, generator=torch.Generator().manual_seed(4)))
        out[key] = (y.detach(), x.grad, model.weight.grad)
    (yn, gxn, gwn), (ye, gxe, gwe) = out["native"], out["emulate"]
    assert torch.allclose(yn, ye, rtol=1e-5, atol=1e-5 * ye.abs().max().item())
    for a, b in ((gxn, gxe), (gwn, gwe)):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 0.06, rel
