"""MAC counting agrees with torch's FlopCounterMode, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from adaprec.energy import GemmCost, MacCounter, StepCost
from adaprec.errors import AdaprecError


def _flops(model: nn.Module, *inputs: torch.Tensor) -> tuple[int, int]:
    """(forward, backward) FLOPs of one step as torch counts them."""
    with FlopCounterMode(display=False) as fc:
        out = model(*inputs)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        out.sum().backward()
    return fwd, fc.get_total_flops()


def _ours(model: nn.Module, names: list[str], *inputs: torch.Tensor) -> StepCost:
    with MacCounter(model, names) as counter:
        model(*inputs).sum().backward()
        return counter.pop_step_cost()


def _check(model: nn.Module, names: list[str], *inputs: torch.Tensor, math_sdpa: bool = False) -> StepCost:
    # CPU's fused attention kernel is not in FlopCounterMode's registry; the math path is
    ctx = sdpa_kernel(SDPBackend.MATH) if math_sdpa else torch.enable_grad()
    with ctx:
        fwd, bwd = _flops(model, *inputs)
        model.zero_grad()
        cost = _ours(model, names, *inputs)
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
    cost = _check(model, ["0", "2"], torch.randn(3, 5, 8))
    assert _gemms(cost, "0") == {"forward", "weight_grad"}
    assert _gemms(cost, "2") == {"forward", "input_grad", "weight_grad"}
    g = cost.modules["0"].gemms[0]
    assert g == GemmCost("forward", 3 * 5 * 8 * 16, "activation", "weight")


def test_input_that_requires_grad_gets_an_input_grad_gemm() -> None:
    model = nn.Linear(4, 6)
    x = torch.randn(2, 4, requires_grad=True)
    cost = _check(model, [""], x)
    assert _gemms(cost, "") == {"forward", "input_grad", "weight_grad"}


def test_frozen_weight_has_no_weight_grad_gemm() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    cost = _check(model, ["0", "1"], torch.randn(2, 4))
    assert _gemms(cost, "1") == {"forward", "input_grad"}
    assert cost.modules["1"].elements["optimizer_state"] == 0


def test_conv2d_matches_flop_counter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten())
    cost = _check(model, ["0", "2"], torch.randn(2, 3, 9, 9))
    assert _gemms(cost, "0") == {"forward", "weight_grad"}


def test_conv1d_forward_matches_flop_counter() -> None:
    model = nn.Conv1d(4, 5, 3, padding=1)
    x = torch.randn(2, 4, 10, requires_grad=True)
    _check(model, [""], x)


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
    cost = _check(model, ["emb", "attn", "head"], torch.randn(2, 5, 8))
    roles = {(g.a_role, g.b_role) for g in cost.modules["attn"].gemms if g.op in ("qk", "pv")}
    assert roles == {("activation", "activation")}
    back = [g for g in cost.modules["attn"].gemms if g.op in ("dq", "dk", "dv", "dp")]
    assert len(back) == 4 and all((g.a_role, g.b_role) == ("grad_output", "activation") for g in back)


def test_multihead_attention_with_keyword_inputs() -> None:
    m = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    with MacCounter(m, [""]) as c:
        m(query=x, key=x, value=x, need_weights=False)[0].sum().backward()
        cost = c.pop_step_cost()
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        m(query=x, key=x, value=x, need_weights=False)
    assert 2 * cost.macs_by_gemm()["forward"] == fc.get_total_flops()


class _SdpaBlock(nn.Module):
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


def test_sdpa_module_matches_flop_counter() -> None:
    torch.manual_seed(0)
    model = _SdpaBlock()
    cost = _check(model, ["", "qkv", "proj"], torch.randn(2, 6, 16), math_sdpa=True)
    ops = sorted(g.op for g in cost.modules[""].gemms)
    assert ops == ["dk", "dp", "dq", "dv", "pv", "qk"]


def test_sdpa_outside_named_modules_is_not_counted_and_detach_stops_counting() -> None:
    model = _SdpaBlock()
    counter = MacCounter(model, ["qkv"]).attach()
    model(torch.randn(1, 4, 16)).sum().backward()
    cost = counter.pop_step_cost()
    assert set(cost.modules) == {"qkv"}
    counter.detach()
    model(torch.randn(1, 4, 16)).sum().backward()
    assert counter.pop_step_cost().modules == {}


def test_embedding_has_bytes_but_no_macs() -> None:
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 2))
    idx = torch.randint(0, 50, (3, 7))
    cost = _ours(model, ["0", "1"], idx)
    emb = cost.modules["0"]
    assert emb.macs == 0 and emb.gemms == []
    assert emb.elements["weight"] == 3 * 7 * 8
    assert emb.elements["grad_weight"] == 50 * 8


def test_no_grad_forward_counts_only_forward() -> None:
    model = nn.Linear(4, 3)
    with MacCounter(model, [""]) as c, torch.no_grad():
        model(torch.randn(5, 4))
        cost = c.pop_step_cost()
    assert _gemms(cost, "") == {"forward"}


def test_pop_resets_and_signature_is_stable() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with MacCounter(model, ["0", "2"]) as c:
        model(torch.randn(3, 4)).sum().backward()
        a = c.pop_step_cost()
        assert c.pop_step_cost().macs == 0
        model(torch.randn(3, 4)).sum().backward()
        b = c.pop_step_cost()
    assert a.signature() == b.signature()
    assert StepCost.from_dict(a.to_dict()).signature() == a.signature()


def test_unknown_module_name_is_a_clear_error() -> None:
    with pytest.raises(AdaprecError, match="fc9"):
        MacCounter(nn.Linear(2, 2), ["fc9"])


class _TwoBlocks(nn.Module):
    """SDPA inside a named attention block, plus plain layers around it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.block = _SdpaBlock()
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.block(self.inp(x))))


def test_scoped_sdpa_watch_counts_what_the_global_mode_counts() -> None:
    """Inside watching_sdpa() the mode is live only while the attention block runs, and counts the same."""
    torch.manual_seed(0)
    model, x = _TwoBlocks(), torch.randn(2, 6, 16)
    names = ["inp", "block", "block.qkv", "block.proj", "out"]
    with MacCounter(model, names) as c:  # the mode on for the whole pass
        model(x).sum().backward()
        want = c.pop_step_cost()
    c = MacCounter(model, names).attach(watch_sdpa=False)
    seen: list[bool] = []
    model.out.register_forward_pre_hook(lambda m, a: seen.append(torch.overrides._is_torch_function_mode_enabled()))
    with c.watching_sdpa():
        model(x).sum().backward()
    got = c.pop_step_cost()
    assert got.macs_by_gemm() == want.macs_by_gemm()
    assert sorted(g.op for g in got.modules["block"].gemms) == ["dk", "dp", "dq", "dv", "pv", "qk"]
    assert seen == [False]  # outside the attention block no mode intercepts torch calls
    assert c._scope_mode is None  # and none is left behind after the pass
    with pytest.raises(RuntimeError), c.watching_sdpa():
        model.block(torch.randn(2, 6, 15))  # a shape error inside the block: the mode is still popped
    assert c._scope_mode is None and not torch.overrides._is_torch_function_mode_enabled()
