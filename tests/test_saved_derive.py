"""Saved tensors kept as a recipe over another saved tensor (adaprec.engine.saved_derive).

Oracles: the tensor autograd saved (replay of the steps read from the graph
must give it back: exactly for views, transposes and casts, to float rounding
for GELU and layer norm), and the same step with ``derive=False`` (packing
each tensor on its own): bit-identical gradients where packing is elementwise
(bf16), gradient error no larger beyond rounding where it is block-scaled.
"""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from adaprec.engine import saved_derive
from adaprec.engine.saved import SavedTensorStorage
from adaprec.errors import SavedTensorModifiedError


def _steps(t: torch.Tensor, source: torch.Tensor):
    sources = {(source.grad_fn, source.output_nr): source}  # the tensor itself stands for its handle
    return saved_derive.find(t, sources, getattr)


def _leaf(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_()


class Block(nn.Module):
    """A pre-norm MLP block: the pattern the recipes are for (norm -> Linear, GELU -> Linear)."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.norm(x).transpose(0, 1))
        return x + self.down(F.gelu(h, approximate="tanh")).transpose(0, 1)


def _grads(model: nn.Module, x: torch.Tensor, storage: SavedTensorStorage | None) -> torch.Tensor:
    m = copy.deepcopy(model)
    if storage is not None:
        storage.model = m
        with storage:
            loss = m(x).square().mean()
    else:
        loss = m(x).square().mean()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in m.parameters()])


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(32, 16, 64, generator=torch.Generator().manual_seed(1))


# --- find / replay against the tensor autograd saved ---------------------------------------------

@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), depth=st.integers(1, 4),
       ops=st.lists(st.sampled_from(["t", "permute", "view", "contiguous", "bf16", "fp64"]), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_layout_and_cast_chains_replay_exactly(rows, cols, depth, ops, seed):
    x = _leaf(depth, rows, cols, seed=seed) * 1.0  # a non-leaf: the source has a grad_fn
    t, casts = x, 0
    for op in ops:
        if op == "t":
            t = t.transpose(-1, -2) if seed % 2 else t.transpose(t.dim() - 1, t.dim() - 2)  # negative dims too
        elif op == "permute":
            t = t.permute(*range(1, t.dim()), 0)
        elif op == "view":
            t = t.reshape(-1, t.shape[-1]) if t.dim() == 3 else t.reshape(t.shape[0], 1, t.shape[1])
        elif op == "contiguous":
            t = t.contiguous()
        elif casts == 0:
            t, casts = t.to(torch.bfloat16 if op == "bf16" else torch.float64), 1
    if t.grad_fn is x.grad_fn:  # contiguous() of a contiguous tensor is the tensor itself: nothing to derive
        assert _steps(t, x) is None
        return
    found = _steps(t, x)
    assert found is not None
    source, steps = found
    assert source is x
    assert torch.equal(saved_derive.replay(x.detach(), steps), t.detach())


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_layer_norm_replay_to_rounding(approximate):
    x = _leaf(6, 5, 32) * 1.0
    w, b = torch.randn(32).requires_grad_(), torch.randn(32).requires_grad_()
    t = F.gelu(F.layer_norm(x, (32,), w, b), approximate=approximate).transpose(0, 1).reshape(-1, 32)
    found = _steps(t, x)
    assert found is not None
    got = saved_derive.replay(x.detach(), found[1])
    torch.testing.assert_close(got, t.detach(), rtol=1e-5, atol=1e-5)
    assert [s.kind for s in found[1]][:2] == ["NativeLayerNormBackward0", "GeluBackward0"]


def test_layer_norm_without_affine_and_with_two_normalized_dims():
    x = _leaf(4, 3, 5, 6) * 1.0
    t = F.layer_norm(x, (5, 6)).to(torch.bfloat16)
    found = _steps(t, x)
    assert found is not None
    got = saved_derive.replay(x.detach(), found[1])
    torch.testing.assert_close(got.float(), t.detach().float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("make", [
    lambda x: x.exp(),                                   # a node it does not rerun
    lambda x: x.to(torch.bfloat16).to(torch.float64),    # two casts: the dtype between them is not in the graph
    lambda x: x[:, :2],                                  # a slice: not a view it knows
    lambda x: x + x.detach(),                            # two tensor inputs
])
def test_what_it_does_not_know_ends_the_walk(make):
    x = _leaf(4, 5) * 1.0
    assert _steps(make(x), x) is None


def test_the_source_itself_is_not_a_recipe():
    x = _leaf(4, 5) * 1.0
    assert _steps(x, x) is None


# --- GEMMs and bias adds rerun from their activation operand ------------------------------------

def _projection(path: str, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A Linear's output four ways torch builds it: addmm (contiguous input), matmul then a bias add
    (non-contiguous input), mm (no bias), and a split of a packed projection cast to bf16 (attention's q)."""
    torch.manual_seed(5)
    w, b = nn.Parameter(torch.randn(96, 32) / 6), nn.Parameter(torch.randn(96))
    if path == "addmm":
        return F.linear(x, w, b), [w, b]
    if path == "matmul":
        return F.linear(x.transpose(0, 1), w, b), [w, b]
    if path == "no bias":
        return F.linear(x.transpose(0, 1), w), [w]
    wq, bq = w.to(torch.bfloat16).chunk(3)[1], b.to(torch.bfloat16).chunk(3)[1]
    return F.linear(x.transpose(0, 1).to(torch.bfloat16), wq, bq).transpose(1, 2), [w, b]


@pytest.mark.parametrize("path", ["addmm", "matmul", "no bias", "split bf16"])
def test_a_linear_output_replays_bit_for_bit_from_its_input(path):
    x = _leaf(6, 5, 32) * 1.0
    h, _ = _projection(path, x)
    found = _steps(h, x)
    assert found is not None
    kinds = {s.kind for s in found[1]}
    assert kinds & {"AddmmBackward0", "MmBackward0"}
    assert ("AddBackward0" in kinds) == (path in ("matmul", "split bf16"))
    got = saved_derive.replay(x.detach(), found[1])
    assert got.dtype == h.dtype and got.shape == h.shape
    assert torch.equal(got, h.detach())


def test_a_gemm_of_two_activations_is_not_rerun():
    x = _leaf(4, 5) * 1.0
    assert _steps(x @ x.t(), x) is None
    frozen = nn.Linear(5, 3)
    frozen.bias.requires_grad_(False)  # addmm's bias has no autograd edge: it cannot be made again
    assert _steps(frozen(x), x) is None
    assert _steps(x + x * 2, x) is None  # a residual add: both operands are activations


def test_gelu_input_is_a_recipe_under_8_bit_codes_only(batch):
    for fmt, expected in (("int8/block256", "derived"), ("bf16", "packed")):
        storage = SavedTensorStorage(fmt, min_numel=1)
        _grads(Block(), batch, storage)
        gelu = [r for r in storage.stats().rows if r.role == "gelu"]
        assert [r.reason for r in gelu] == [expected], fmt


def _w_grad_after_a_bias_change(change: bool) -> torch.Tensor:
    x = _leaf(6, 5, 32) * 1.0
    storage = SavedTensorStorage("int8/block256", min_numel=1)
    with storage:
        h, (w, b) = _projection("matmul", x)
        loss = F.gelu(h).sum()
    del h  # held through backward, the original would be used (exact): not what is tested
    assert [r.reason for r in storage.stats().rows if r.role == "gelu"] == ["derived"]
    if change:
        with torch.no_grad():
            b.add_(1.0)  # addmm/add save no bias: autograd itself would not object
    loss.backward()
    return w.grad


def test_a_bias_changed_between_forward_and_backward_leaves_the_gradients_as_forward_made_them():
    assert torch.equal(_w_grad_after_a_bias_change(True), _w_grad_after_a_bias_change(False))


def test_a_weight_changed_between_forward_and_backward_raises():
    x = _leaf(6, 5, 32) * 1.0
    storage = SavedTensorStorage("int8/block256", min_numel=1)
    with storage:
        h, (w, b) = _projection("addmm", x)
        loss = F.gelu(h).sum()
    del h
    with torch.no_grad():
        w.mul_(2.0)
    with pytest.raises((SavedTensorModifiedError, RuntimeError), match="modified"):
        loss.backward()


# --- residual adds: two saved tensors' recipes added ---------------------------------------------

def test_a_residual_add_of_two_recipes_replays_bit_for_bit():
    x, a = _leaf(6, 5, 32) * 1.0, _leaf(6, 5, 32, seed=1) * 1.0
    w, b = _leaf(32, 32, seed=2), _leaf(32, seed=3)
    t = x + F.linear(a, w, b)  # a pre-norm block's residual: the stream plus a projection of another saved tensor
    sources = {(x.grad_fn, x.output_nr): x, (a.grad_fn, a.output_nr): a}
    found = saved_derive.find(t, sources, getattr)
    assert found is not None and [s.kind for s in found[1]] == ["ResidualAdd"]
    assert torch.equal(saved_derive.replay(x.detach(), found[1]), t.detach())


class PreNormStack(nn.Module):
    """Three pre-norm residual blocks: each block's residual is x + Linear(norm(x))."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.linears = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale
        for norm, linear in zip(self.norms, self.linears, strict=True):
            x = x + linear(norm(x))
        return x


def test_residual_recipes_do_not_stack_and_keep_the_gradients_within_the_formats_error(batch):
    model = PreNormStack()
    ref = _grads(model, batch, None)
    errors, reasons = {}, {}
    for derive in (False, True):
        storage = SavedTensorStorage("int8/block256", model=model, min_numel=1024, derive=derive)
        g = _grads(model, batch, storage)
        errors[derive] = float((g - ref).norm() / ref.norm())
        reasons[derive] = {r.module: r.reason for r in storage.stats().rows
                           if r.role == "layer_norm" and r.reason in ("packed", "derived")}
    # the second norm's input is the first residual (a recipe over two packed tensors); the third's is a
    # residual over that recipe: packed, so a replay never reruns the blocks below it
    assert reasons[True] == {"norms.0": "packed", "norms.1": "derived", "norms.2": "packed"}
    assert set(reasons[False].values()) == {"packed"}
    assert 0 < errors[True] <= 1.25 * errors[False] + 1e-4


# --- one recomputed value for every reader (ReplayCache) -----------------------------------------

class ThreeProjections(nn.Module):
    """Attention's pattern: one norm's output projected three times (three GEMMs, each saving its own copy)."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x * self.scale).transpose(0, 1)  # non-contiguous: each projection copies it
        return x + (self.q(h) * self.k(h) + self.v(h).sin()).transpose(0, 1)


def test_the_replay_cache_reruns_a_shared_norm_once_with_the_same_gradients(batch, monkeypatch):
    calls = []
    real = saved_derive._layer_norm
    monkeypatch.setattr(saved_derive, "_layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    grads, reruns = {}, {}
    for budget in (0, saved_derive.REPLAY_CACHE_BYTES):
        calls.clear()
        # the norm's input packed (a source), its statistics kept (exact: the norm may be rerun)
        storage = SavedTensorStorage("int8/block256", min_numel=1024, replay_cache_bytes=budget)
        grads[budget] = _grads(ThreeProjections(), batch, storage)
        reruns[budget] = len(calls)
        assert storage._replays.nbytes == 0  # every entry went with the handles it came from
    assert reruns[0] >= 3 and reruns[saved_derive.REPLAY_CACHE_BYTES] == 1
    assert torch.equal(grads[0], grads[saved_derive.REPLAY_CACHE_BYTES])


def test_the_replay_cache_keeps_to_its_bound_and_drops_what_its_source_outlived():
    cache = saved_derive.ReplayCache(max_bytes=3 * 4 * 100)
    sources = [saved_derive.Step("x", (), None) for _ in range(4)]  # any object a weak reference can point to
    values = [torch.full((100,), float(i)) for i in range(4)]
    for i, (src, v) in enumerate(zip(sources, values, strict=True)):
        cache.put(("k", i), src, v)
        assert cache.nbytes <= cache.max_bytes
    assert cache.get(("k", 0), sources[0]) is None  # the oldest went to make room
    assert cache.get(("k", 3), sources[3]) is values[3]
    assert cache.get(("k", 3), sources[2]) is None  # the same key over another source is another value
    cache.put(("big",), sources[0], torch.zeros(1000))  # larger than the bound: not kept
    assert cache.get(("big",), sources[0]) is None
    del sources[3], src  # the last reference to the newest source
    assert cache.get(("k", 3), object()) is None and cache.nbytes == 2 * 4 * 100


# --- inside SavedTensorStorage --------------------------------------------------------------------

def test_block_keeps_fewer_bytes_and_gradients_within_the_formats_error(batch):
    model = Block()
    ref = _grads(model, batch, None)
    errors, after = {}, {}
    for derive in (False, True):
        storage = SavedTensorStorage("int8/block256", min_numel=1, derive=derive)
        g = _grads(model, batch, storage)
        errors[derive] = float((g - ref).norm() / ref.norm())
        after[derive] = storage.stats().bytes_after
        reasons = storage.stats().by("reason")
        assert ("derived" in reasons) == derive
    assert 0 < errors[True] <= 1.25 * errors[False] + 1e-4
    assert after[True] < 0.75 * after[False]


def test_elementwise_format_gives_the_same_gradients_bit_for_bit_on_layout_chains():
    torch.manual_seed(3)
    w = torch.randn(24, 16, requires_grad=True)
    x = torch.randn(16, 24)

    def grads(derive: bool) -> tuple[torch.Tensor, dict]:
        w.grad = None
        storage = SavedTensorStorage("bf16", min_numel=1, derive=derive)
        with storage:
            p = x @ w
            s = p.sin()  # sin saves p (packed bf16)
            y = p.t().contiguous() @ w.t()  # mm saves a transposed copy of p: a recipe over sin's copy
        del p  # alive through backward, sin's copy would go back to it (exact): not what is compared here
        (y.square().sum() + s.sum()).backward()
        return w.grad.clone(), storage.stats().by("reason")

    g0, r0 = grads(False)
    g1, r1 = grads(True)
    assert "derived" in r1 and "derived" not in r0
    assert torch.equal(g0, g1)


def _transposed_matmul(fmt: str) -> tuple[SavedTensorStorage, torch.Tensor, torch.Tensor]:
    """``sin(h) + (h.t() @ a)``: sin saves h (packed), the matmul saves ``t = h.t()`` (a recipe over h)."""
    a = torch.randn(8, 8, requires_grad=True)
    storage = SavedTensorStorage(fmt, min_numel=1)
    with storage:
        h = a * 2
        s = h.sin()
        t = h.t()
        loss = (t @ a).sum() + s.sum()
    return storage, t, loss


def test_in_place_change_after_save_raises_for_a_recipe_too():
    storage, t, loss = _transposed_matmul("bf16")
    assert "derived" in storage.stats().by("reason")
    t.mul_(2)
    with pytest.raises(SavedTensorModifiedError):
        loss.backward()


def test_a_recipe_whose_original_outlives_forward_goes_back_to_it():
    storage, t, loss = _transposed_matmul("int8/block256")  # t held below through backward
    assert storage.stats().by("reason")["derived"][0] == t.numel() * 4
    loss.backward()
    reasons = storage.stats().by("reason")
    assert "derived" not in reasons
    assert reasons["alive anyway"][0] >= t.numel() * 4


def test_no_graph_node_is_held_once_the_pass_is_over(batch):
    storage = SavedTensorStorage("int8/block256", min_numel=1)
    with storage:
        loss = Block()(batch).square().mean()
    assert storage._sources == {}
    loss.backward()


def test_derive_false_packs_each_tensor_on_its_own(batch):
    storage = SavedTensorStorage("int8/block256", min_numel=1, derive=False)
    _grads(Block(), batch, storage)
    assert "derived" not in storage.stats().by("reason")
