"""MAC counting agrees with torch's FlopCounterMode, forward and backward, module by module.

``MacCounter`` is the engine's op recognition with nothing narrowed: every
matmul-like op the model runs, whoever calls it, attributed to the module
owning its weight (or running it). FlopCounterMode has no formula for CPU's
fused attention kernel, so attention runs under the math backend in both.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from _train import TinyAttention
from adaprec.energy import GemmCost, MacCounter, StepCost


def _flops(model: nn.Module, *inputs: torch.Tensor) -> tuple[int, int]:
    """(forward, backward) FLOPs of one step as torch counts them."""
    with FlopCounterMode(display=False) as fc:
        out = model(*inputs)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        out.sum().backward()
    return fwd, fc.get_total_flops()


def _ours(model: nn.Module, *inputs: torch.Tensor) -> StepCost:
    counter = MacCounter(model)
    try:
        with counter:
            model(*inputs).sum().backward()
        return counter.pop_step_cost()
    finally:
        counter.close()


def _check(model: nn.Module, *inputs: torch.Tensor) -> StepCost:
    with sdpa_kernel(SDPBackend.MATH):
        fwd, bwd = _flops(model, *inputs)
        model.zero_grad()
        cost = _ours(model, *inputs)
    by = cost.macs_by_gemm()
    assert fwd > 0 and bwd > 0
    assert 2 * by["forward"] == fwd
    assert 2 * (by["input_grad"] + by["weight_grad"]) == bwd
    return cost


def _gemms(cost: StepCost, name: str) -> set[str]:
    return {g.gemm for g in cost.modules[name].gemms}


def test_linear_mlp_matches_flop_counter_and_first_layer_has_no_input_grad() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    cost = _check(model, torch.randn(3, 5, 8))
    assert set(cost.modules) == {"0", "2"}
    assert _gemms(cost, "0") == {"forward", "weight_grad"}
    assert _gemms(cost, "2") == {"forward", "input_grad", "weight_grad"}
    assert cost.modules["0"].gemms[0] == GemmCost("forward", 3 * 5 * 8 * 16, "activation", "weight", "linear")
    assert all(m.covered and m.kind == "linear" for m in cost.modules.values())


def test_input_that_requires_grad_gets_an_input_grad_gemm() -> None:
    model = nn.Linear(4, 6)
    cost = _check(model, torch.randn(2, 4, requires_grad=True))
    assert _gemms(cost, "") == {"forward", "input_grad", "weight_grad"}
    back = [g for g in cost.modules[""].gemms if g.gemm != "forward"]
    assert {(g.gemm, g.a_role, g.b_role) for g in back} == {("input_grad", "grad_output", "weight"),
                                                            ("weight_grad", "grad_output", "activation")}


def test_frozen_weight_has_no_weight_grad_gemm_and_no_optimizer_traffic() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    cost = _check(model, torch.randn(2, 4))
    assert _gemms(cost, "1") == {"forward", "input_grad"}
    assert cost.modules["1"].elements["optimizer_state"] == 0
    assert cost.modules["0"].elements["optimizer_state"] == 6 * 4


def test_conv2d_matches_flop_counter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten())
    cost = _check(model, torch.randn(2, 3, 9, 9))
    assert _gemms(cost, "0") == {"forward", "weight_grad"}
    assert cost.modules["2"].kind == "conv"


@pytest.mark.parametrize("conv", [
    nn.Conv1d(4, 5, 3, padding=1),
    nn.Conv1d(4, 6, 3, padding="same", dilation=2),
    nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 1), padding=1),
    nn.ConvTranspose1d(4, 3, 3, stride=2),
    nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
    nn.ConvTranspose3d(2, 3, 2, stride=2),
], ids=["conv1d", "conv1d-same-dilated", "conv3d", "convT1d", "convT2d", "convT3d"])
def test_every_convolution_matches_flop_counter(conv: nn.Module) -> None:
    torch.manual_seed(0)
    nd = {nn.Conv1d: 1, nn.ConvTranspose1d: 1, nn.Conv3d: 3, nn.ConvTranspose3d: 3}.get(type(conv), 2)
    x = torch.randn(2, conv.in_channels, *([5] * nd), requires_grad=True)
    cost = _check(conv, x)
    assert set(cost.modules) == {""} and cost.modules[""].kind == "conv"
    assert _gemms(cost, "") == {"forward", "input_grad", "weight_grad"}


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_convolution_counts_as_its_groups_run_apart(transposed: bool) -> None:
    """A conv with g groups is g independent convs of C/g channels: the same MACs, forward and backward.

    FlopCounterMode counts the grouped conv's weight-gradient as if it had one
    group (its ``conv_backward_flop`` ignores ``groups``), so the reference here
    is FlopCounterMode on the g separate convs, which it counts correctly.
    """
    torch.manual_seed(0)
    g, cin, cout = 3, 6, 9
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    grouped = cls(cin, cout, 3, stride=2, padding=1, groups=g)
    x = torch.randn(2, cin, 5, 7, requires_grad=True)

    class Apart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = nn.ModuleList(cls(cin // g, cout // g, 3, stride=2, padding=1) for _ in range(g))

        def forward(self, x):
            return torch.cat([p(c) for p, c in zip(self.parts, x.chunk(g, dim=1), strict=True)], dim=1)

    apart = Apart()
    fwd, bwd = _flops(apart, x)
    cost = _ours(grouped, x)
    by = cost.macs_by_gemm()
    assert 2 * by["forward"] == fwd
    assert 2 * (by["input_grad"] + by["weight_grad"]) == bwd
    assert by["input_grad"] == by["weight_grad"] == by["forward"]


class _Mha(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        a, _ = self.attn(h, h, h)
        return self.head(a)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_matches_flop_counter(batch_first: bool) -> None:
    torch.manual_seed(0)
    model = _Mha(batch_first)
    cost = _check(model, torch.randn(2, 5, 8))
    assert set(cost.modules) == {"emb", "attn", "head"}  # out_proj runs inside the attention call
    attn = cost.modules["attn"]
    assert attn.kind == "mha"  # multi-head attention: projections and the attention products as one call
    roles = {(g.a_role, g.b_role) for g in attn.gemms if g.op in ("qk", "pv") and g.gemm == "forward"}
    assert roles == {("activation", "activation")}
    back = [g for g in attn.gemms if g.op in ("qk", "pv") and g.gemm != "forward"]
    assert len(back) == 4 and all((g.a_role, g.b_role) == ("grad_output", "activation") for g in back)


def test_multihead_attention_with_keyword_inputs() -> None:
    m = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    with MacCounter(m) as c:
        m(query=x, key=x, value=x, need_weights=False)[0].sum().backward()
        cost = c.pop_step_cost()
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        m(query=x, key=x, value=x, need_weights=False)
    assert 2 * cost.macs_by_gemm()["forward"] == fc.get_total_flops()


_SdpaBlock = TinyAttention



def test_sdpa_is_attributed_to_the_module_that_calls_it() -> None:
    torch.manual_seed(0)
    model = _SdpaBlock()
    cost = _check(model, torch.randn(2, 6, 16))
    assert cost.modules[""].kind == "attention"
    ops = sorted((g.op, g.gemm) for g in cost.modules[""].gemms)
    assert ops == [("pv", "forward"), ("pv", "input_grad"), ("pv", "input_grad"),
                   ("qk", "forward"), ("qk", "input_grad"), ("qk", "input_grad")]
    assert cost.modules[""].macs == 3 * (2 * 2 * 6 * 6 * 8) * 2


class _Products(nn.Module):
    """Matmul-like ops called as functions and operators, on parameters and on activations."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.u = nn.Parameter(torch.randn(6, 4))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 8)
        h = x @ self.w  # __matmul__ with a parameter
        h = torch.einsum("btc,cd->btd", h, self.u)  # einsum with a parameter
        a = torch.bmm(h, h.transpose(1, 2))  # two activations
        a = torch.baddbmm(a, a, a)
        h2 = torch.addmm(self.b, h.reshape(-1, 4), torch.eye(4))  # HF Conv1D's form, a non-parameter matrix
        s = torch.matmul(a, h) + h2.view_as(h)
        return torch.einsum("bij,bjk->bik", s, s.transpose(1, 2)).sum(-1)


def test_functional_and_operator_products_match_flop_counter() -> None:
    torch.manual_seed(0)
    model = _Products()
    cost = _check(model, torch.randn(2, 3, 8))
    assert set(cost.modules) == {""}
    assert {g.op for g in cost.modules[""].gemms} == {"matmul", "einsum", "bmm", "baddbmm", "addmm"}


def test_hf_conv1d_addmm_is_a_linear_with_transposed_weight() -> None:
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D  # noqa: N806

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 8), nn.ReLU(), Conv1D(5, 12))
    cost = _check(model, torch.randn(2, 3, 8))
    assert cost.modules["0"].kind == "linear"
    assert cost.modules["0"].gemms[0] == GemmCost("forward", 2 * 3 * 8 * 12, "activation", "weight", "addmm")
    assert _gemms(cost, "2") == {"forward", "input_grad", "weight_grad"}
    assert cost.modules["2"].elements["optimizer_state"] == 12 * 5 + 5 * 0  # the weight, not the bias


def test_tied_weights_are_attributed_to_the_module_running_them() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.mid = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.tanh(self.mid(self.emb(idx))))

    model = Tied()
    idx = torch.randint(0, 20, (2, 5))
    cost = _check(model, idx)
    assert cost.modules["emb"].macs == 0 and cost.modules["emb"].kind == "embedding"
    assert cost.modules["head"].kind == "linear"
    assert cost.modules["head"].macs == 3 * 10 * 8 * 20


def test_embedding_has_bytes_but_no_macs() -> None:
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 2))
    idx = torch.randint(0, 50, (3, 7))
    cost = _ours(model, idx)
    emb = cost.modules["0"]
    assert emb.macs == 0 and emb.gemms == [] and emb.kind == "embedding"
    assert emb.elements["weight"] == 3 * 7 * 8
    assert emb.elements["grad_weight"] == 50 * 8


def test_no_grad_forward_counts_only_forward() -> None:
    model = nn.Linear(4, 3)
    with MacCounter(model) as c, torch.no_grad():
        model(torch.randn(5, 4))
        cost = c.pop_step_cost()
    assert _gemms(cost, "") == {"forward"}
    assert cost.macs == 5 * 4 * 3


def test_ops_outside_the_model_are_not_counted_and_detach_stops_counting() -> None:
    model = _SdpaBlock()
    counter = MacCounter(model).attach()
    out = model(torch.randn(1, 4, 16))
    (out @ torch.randn(16, 3)).sum().backward()  # the "loss" matmul runs outside every module of the model
    cost = counter.pop_step_cost()
    assert set(cost.modules) == {"qkv", "", "proj"}
    assert cost.modules["proj"].macs == 3 * 4 * 16 * 16
    counter.detach()
    model(torch.randn(1, 4, 16)).sum().backward()
    assert counter.pop_step_cost().modules == {}
    counter.close()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_pop_resets_and_signature_is_stable() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with MacCounter(model) as c:
        model(torch.randn(3, 4)).sum().backward()
        a = c.pop_step_cost()
        assert c.pop_step_cost().macs == 0
        model(torch.randn(3, 4)).sum().backward()
        b = c.pop_step_cost()
    assert a.macs == b.macs > 0
    assert a.signature() == b.signature()
    assert StepCost.from_dict(a.to_dict()).signature() == a.signature()


def test_counting_does_not_change_the_numbers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(8, 2))
    x = torch.randn(2, 3, 4)
    ref = model(x)
    ref.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with MacCounter(model) as c:
        y = model(x)
        y.sum().backward()
    assert torch.equal(y, ref)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert {(g.fmt, g.native) for m in c.pop_step_cost().modules.values() for g in m.gemms} == {("fp32", True)}


def test_step_cost_copy_equals_deepcopy_and_is_independent():
    import copy as copy_module

    from adaprec.energy.counting import GemmCost, ModuleCost, StepCost

    m = ModuleCost("linear", [GemmCost("forward", 96, "activation", "weight", "linear", "int8", True)])
    m.add_traffic("activation", 12, "int8", "int8")
    m.add_ops("forward", "elementwise", "fp32", 32, "read", 40)
    cost = StepCost({"fc": m}, "counted", {"aten::foo": 2})
    dup, before = cost.copy(), cost.modules["fc"].op_bytes
    assert dup == copy_module.deepcopy(cost)
    dup.modules["fc"].gemms.append(GemmCost("input_grad", 7, "grad_output", "weight"))
    dup.modules["fc"].add_ops("forward", "elementwise", "fp32", 32, "read", 1)
    dup.unclassified_ops["aten::bar"] = 1
    dup.modules["new"] = ModuleCost("conv")
    assert cost.macs == 96 and cost.modules["fc"].op_bytes == before and set(cost.modules) == {"fc"}
    assert cost.unclassified_ops == {"aten::foo": 2}
