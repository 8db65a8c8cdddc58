"""The ``output`` role: a module's GEMMs hand the ops after them a bf16 tensor, as under ``torch.autocast``.

Oracles: torch's own bf16 ops (``F.linear``/``F.gelu`` on bf16 tensors) for what a narrow output
computes, and the fp32 plan for what must not change.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprec
from _train import FAST_INT8_BF16, fake_report
from adaprec.errors import PlanError
from adaprec.plan import ModulePrecision, PrecisionPlan, TensorRecipe


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 5)
        self.seen: dict[str, torch.dtype] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        self.seen["up"] = h.dtype
        h = F.gelu(h)
        self.seen["gelu"] = h.dtype
        h = self.down(h)
        self.seen["down"] = h.dtype
        out = self.head(x + h)  # the residual: fp32 + bf16 promotes to fp32, as under autocast
        self.seen["head"] = out.dtype
        return out


def _ap(model, policy, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return adaprec.AdaptivePrecision(model, opt, policy, count_bytes=False, **kw), opt


def _plan(output: str, fmt: str = "bf16", head: str = "fp32") -> PrecisionPlan:
    r = TensorRecipe(fmt, scaling="tensor") if fmt == "int8" else fmt  # int8 as the native kernels run it
    mp = ModulePrecision(weight=r, activation=r, grad_output="bf16", grad_weight="fp32", output=output)
    return PrecisionPlan({"up": mp, "down": mp, "head": ModulePrecision(**dict.fromkeys(
        ("weight", "activation", "grad_output", "grad_weight"), head))})


def _step(model, ap, x, y):
    with ap.autocast():
        loss = F.cross_entropy(model(x), y)
    ap.backward(loss)
    return loss


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_a_bf16_output_flows_to_the_next_ops_and_an_fp32_module_widens_it(fmt):
    torch.manual_seed(0)
    model = _MLP()
    ref = _MLP()
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 32), torch.randint(0, 5, (16,))
    ap, _ = _ap(model, _plan("bf16", fmt), hardware=FAST_INT8_BF16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every GEMM runs natively: nothing emulated
        _step(model, ap, x, y)
    # up and down hand on bf16; gelu runs on it; head (planned fp32) widens its input and returns fp32
    assert model.seen == {"up": torch.bfloat16, "gelu": torch.bfloat16, "down": torch.bfloat16,
                          "head": torch.float32}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    if fmt == "bf16":  # the oracle: torch's own bf16 kernels, the head in fp32
        xb = x.bfloat16()
        h = F.linear(xb, ref.up.weight.bfloat16(), ref.up.bias.bfloat16())
        h = F.linear(F.gelu(h), ref.down.weight.bfloat16(), ref.down.bias.bfloat16())
        want = ref.head(x + h)
        with torch.no_grad(), ap.autocast():
            got = model(x)
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_an_fp32_output_plan_keeps_every_op_in_fp32_as_before():
    torch.manual_seed(0)
    model = _MLP()
    ap, _ = _ap(model, _plan("fp32"), hardware=FAST_INT8_BF16)
    _step(model, ap, torch.randn(8, 32), torch.randint(0, 5, (8,)))
    assert set(model.seen.values()) == {torch.float32}


def test_a_model_the_user_keeps_in_bf16_is_left_alone():
    torch.manual_seed(0)
    model = _MLP().bfloat16()
    ap, _ = _ap(model, _plan("bf16", head="fp32"), hardware=FAST_INT8_BF16)
    x = torch.randn(8, 32).bfloat16()
    with ap.autocast():
        out = model(x)
    assert out.dtype == torch.bfloat16  # its bf16 head weights are the user's: not widened


def test_error_budget_flows_bf16_where_bf16_is_fast_but_not_out_of_the_last_module():
    torch.manual_seed(0)
    model = _MLP()
    ap, opt = _ap(model, {"name": "error-budget", "warmup_steps": 2}, hardware=FAST_INT8_BF16)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        _step(model, ap, torch.randn(16, 32, generator=g), torch.randint(0, 5, (16,), generator=g))
        ap.step()
    plan = ap.plan
    assert plan.get("up").output == "bf16" and plan.get("down").output == "bf16"
    assert plan.get("head").output == "fp32"  # the logits the loss reads stay fp32
    assert model.seen["head"] == torch.float32


@pytest.mark.parametrize("case", ["no fast bf16", "storage fp32"])
def test_error_budget_keeps_outputs_fp32_without_fast_bf16_or_with_fp32_storage(case):
    torch.manual_seed(0)
    model = _MLP()
    policy = {"name": "error-budget", "warmup_steps": 2}
    hw = FAST_INT8_BF16
    if case == "no fast bf16":
        hw = fake_report(fast=("int8",), conv_fast=())
    else:
        policy["storage"] = "fp32"
    ap, opt = _ap(model, policy, hardware=hw)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        _step(model, ap, torch.randn(16, 32, generator=g), torch.randint(0, 5, (16,), generator=g))
        ap.step()
    assert {mp.output for mp in ap.plan.modules.values()} == {"fp32"}
    assert set(model.seen.values()) == {torch.float32}


def test_the_output_role_round_trips_and_refuses_a_format_ops_cannot_read():
    mp = ModulePrecision(weight="bf16", activation="bf16", output="bf16")
    assert ModulePrecision.from_dict(mp.to_dict()) == mp
    assert ModulePrecision.from_dict({k: v for k, v in mp.to_dict().items() if k != "output"}).output == "fp32"
    old = PrecisionPlan({"a": mp})
    new = PrecisionPlan({"a": mp.with_storage("output", "fp32")})
    assert [str(c) for c in old.diff(new)] == ["a.output: bf16 -> fp32"]
    with pytest.raises(PlanError, match="cannot be a GEMM's output.*bf16"):
        ModulePrecision(output="int8/block256")


def test_a_loss_or_softmax_of_a_bf16_output_runs_in_fp32_inside_autocast():
    torch.manual_seed(0)
    model = _MLP()
    mp = ModulePrecision(weight="bf16", activation="bf16", grad_output="bf16", grad_weight="fp32", output="bf16")
    ap, _ = _ap(model, PrecisionPlan.uniform(["up", "down", "head"], mp), hardware=FAST_INT8_BF16)
    x, y = torch.randn(16, 32), torch.randint(0, 5, (16,))
    with ap.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        probs = logits.softmax(-1)
    assert logits.dtype == torch.bfloat16  # every module hands on bf16 here, the head included
    assert loss.dtype == torch.float32 and probs.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach().float(), y), rtol=0, atol=0)
    ap.backward(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
