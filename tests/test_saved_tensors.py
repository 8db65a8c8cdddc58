"""SavedTensorStorage: what autograd keeps for backward, packed in a storage format.

Real models (torch's TransformerEncoderLayer, the char GPT task's model),
gradients compared with the unpacked step: bit for bit under fp32, within
the format's rounding under a narrow format. Checkpointing, double
backward, torch.func and in-place changes are checked against PyTorch's
own behaviour without hooks.
"""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn
from torch.utils.checkpoint import checkpoint

from adaprec.engine.engine import checkpoint_region
from adaprec.engine.saved import SavedTensorStorage
from adaprec.errors import AdaprecError, CheckpointError, SavedTensorModifiedError, UsageError
from adaprec.experiments.tasks.char_transformer import CharGPT, lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")

# a narrow format's relative rounding step (2^-mantissa bits; int8: one step of 127): gradients stay within 2 of them
NARROW = [("bf16", 2.0**-8), ("int8/row", 1 / 127), ("int8", 1 / 127), ("fp8_e4m3", 2.0**-3)]


def _grads(model: nn.Module, step, storage: SavedTensorStorage | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if storage is None:
        loss = step()
    else:
        with storage:
            loss = step()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = CharGPT(65, d=64, heads=4, layers=2, block=64)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 65, (8, 64), generator=g)
    y = torch.randint(0, 65, (8, 64), generator=g)
    return model, lambda: lm_loss(model(x), y)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True, norm_first=True),
                          nn.Linear(64, 10))
    x = torch.randn(8, 48, 64, generator=torch.Generator().manual_seed(2))
    return model, lambda: model(x).square().mean()


@pytest.mark.parametrize("fmt", [None, "fp32"])
def test_fp32_plan_is_bit_exact(gpt, fmt):
    model, step = gpt
    loss0, g0 = _grads(model, step)
    storage = SavedTensorStorage(fmt, model=model, min_numel=0)
    loss, g = _grads(model, step, storage)
    assert torch.equal(loss, loss0) and torch.equal(g, g0)
    s = storage.stats()
    assert s.bytes_before == s.bytes_after > 0
    assert "planned fp32" in s.by("reason") and "packed" not in s.by("reason")


@pytest.mark.parametrize(("fmt", "step"), NARROW)
@pytest.mark.parametrize("which", ["gpt", "encoder"])
def test_narrow_storage_gradients_within_format_error(request, which, fmt, step):
    model, run = request.getfixturevalue(which)
    loss0, g0 = _grads(model, run)
    storage = SavedTensorStorage(fmt, model=model, min_numel=0)
    loss, g = _grads(model, run, storage)
    assert torch.equal(loss, loss0)  # forward values are untouched: only what backward reads is rounded
    err = _rel(g, g0)
    assert 0 < err < 2 * step, err
    s = storage.stats()
    packed = s.by("reason")["packed"]
    assert packed[1] < packed[0]  # narrower for real
    assert s.bytes_after < 0.75 * s.bytes_before


def test_bytes_by_module_role_and_format(gpt):
    model, step = gpt
    storage = SavedTensorStorage("bf16", model=model, min_numel=0)
    _grads(model, step, storage)
    s = storage.stats()
    mods = s.by("module")
    assert {"blocks.0.ln1", "blocks.0.fc2", "blocks.1.attn", "head"} <= set(mods)
    roles = s.by("role")
    assert {"linear", "layer_norm", "gelu", "scaled_dot_product_attention", "embedding"} <= set(roles)
    packed = [r for r in s.rows if r.format == "bf16" and r.reason == "packed"]
    assert sum(r.bytes_after for r in packed) * 2 == sum(r.bytes_before for r in packed)  # exactly half of fp32
    derived = [r for r in s.rows if r.reason == "derived"]  # recomputed from another saved tensor: no bytes
    assert derived and all(r.bytes_after == 0 < r.bytes_before for r in derived)
    # each LayerNorm's input and each Linear's input: batch x block x width fp32 values, packed
    row = next(r for r in s.rows if r.module == "blocks.0.ln1" and r.reason == "packed")
    assert row.bytes_before == 8 * 64 * 64 * 4 and row.bytes_after == row.bytes_before // 2
    assert "saved for backward" in str(s) and s.to_dict()["bytes_before"] == s.bytes_before


def test_callable_format_decides_per_module_and_role(gpt):
    model, step = gpt
    seen = set()

    def fmt(module, role, t):
        seen.add((module, role))
        return "bf16" if role == "gelu" else None

    storage = SavedTensorStorage(fmt, model=model, min_numel=0)
    loss0, g0 = _grads(model, step)
    _, g = _grads(model, step, storage)
    assert ("blocks.0", "gelu") in seen and ("blocks.0.fc1", "linear") in seen
    packed = [r for r in storage.stats().rows if r.reason == "packed"]
    assert packed and all(r.role == "gelu" for r in packed)
    assert 0 < _rel(g, g0) < 2**-8


def test_parameters_inputs_and_small_tensors_are_never_packed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    x = torch.randn(300, 256)  # the batch: no autograd history, held by the caller
    storage = SavedTensorStorage("bf16", model=model, min_numel=0)
    with storage:
        loss = model(x).sum()
    by = storage.stats().by("reason")
    assert set(by) == {"parameter", "no autograd history", "packed"}
    assert by["parameter"] == (256 * 256 * 4, 256 * 256 * 4)  # the second layer's w.t(): a view of its weight
    assert by["no autograd history"] == (300 * 256 * 4, 300 * 256 * 4)  # the first layer's input
    assert by["packed"] == (300 * 256 * 4, 300 * 256 * 2)  # the second layer's input: only autograd holds it
    assert storage.stats().bytes_before == 2 * 300 * 256 * 4  # parameters are not counted
    loss.backward()
    ref = x.sum(0).expand(256, 256) * model[1].weight.sum(0)[:, None]
    torch.testing.assert_close(model[0].weight.grad, ref, rtol=0, atol=1e-3)

    h = torch.randn(10, 10, requires_grad=True) * 1  # 100 elements: under min_numel
    storage = SavedTensorStorage("bf16", min_numel=1000)
    with storage:
        h.sin().sum()
        torch.randn(10, 10, requires_grad=True)[torch.arange(3)].sum()
    assert set(storage.stats().by("reason")) == {"small", "not floating"}


def test_weight_casts_and_narrow_tensors_are_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128))
    x = torch.randn(256, 128)
    storage = SavedTensorStorage("bf16", model=model, min_numel=0)
    with storage, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    reasons = storage.stats().by("reason")
    assert "weight cast" in reasons  # autocast's cached bf16 weights: a copy would add memory
    assert "already narrow" in reasons  # bf16 activations: nothing to gain in bf16 storage
    assert "packed" not in reasons
    out.float().sum().backward()


def test_a_tensor_saved_twice_is_packed_once():
    a = torch.randn(512, 512, requires_grad=True)
    storage = SavedTensorStorage("bf16", min_numel=0)
    with storage:
        loss = (a * 1).exp().square().sum()  # exp saves its output, square saves it again
    s = storage.stats()
    assert s.by("reason")["packed"] == (512 * 512 * 4, 512 * 512 * 2)
    assert any(r.reason == "shared" and r.tensors == 1 for r in s.rows)
    loss.backward()
    ref = torch.autograd.grad((a * 1).exp().square().sum(), a)[0]
    assert 0 < _rel(a.grad, ref) < 2**-7


def test_a_packed_tensor_still_alive_after_forward_goes_back_to_the_original():
    torch.manual_seed(0)
    lin = nn.Linear(256, 256)
    x = torch.randn(512, 256)

    def step(keep: bool, storage):
        with storage:
            h = lin(x)
            loss = h.sin().sum()  # sin saves h
        if not keep:
            del h  # dropped before backward: the packed copy is all that is left
        return torch.autograd.grad(loss, lin.weight)[0]

    ref = step(True, SavedTensorStorage(None))
    kept = SavedTensorStorage("bf16", model=lin)
    assert torch.equal(step(True, kept), ref)  # the user held h: backward read the original, exactly
    assert kept.stats().by("reason")["alive anyway"] == (512 * 256 * 4, 512 * 256 * 4)
    dropped = SavedTensorStorage("bf16", model=lin)
    g = step(False, dropped)
    assert "alive anyway" not in dropped.stats().by("reason") and 0 < _rel(g, ref) < 2**-8

    no_sweep = SavedTensorStorage("bf16", model=lin, sweep=False)
    g = step(True, no_sweep)
    assert "alive anyway" not in no_sweep.stats().by("reason") and _rel(g, ref) > 0


@pytest.mark.parametrize("fmt", [None, "bf16"])
def test_in_place_change_after_save_raises_like_pytorch(fmt):
    a = torch.randn(300, 300, requires_grad=True)
    b = a * 2
    c = b.sin()  # saves b
    b.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        c.sum().backward()  # PyTorch without hooks
    storage = SavedTensorStorage(fmt, min_numel=0)
    with storage:
        b = a * 2
        c = b.sin()
    b.add_(1)
    with pytest.raises(SavedTensorModifiedError, match="modified in place"):
        c.sum().backward()


@pytest.mark.parametrize("op", ["relu_", "sigmoid_", "exp_", "tanh_"])
def test_in_place_ops_that_save_their_output_work(op):
    a = torch.randn(300, 300, requires_grad=True)

    def f():
        y = a * 2
        getattr(y, op)()
        return (y * y).sum()

    ref = torch.autograd.grad(f(), a)[0]
    with SavedTensorStorage(None, min_numel=0):
        loss = f()
    assert torch.equal(torch.autograd.grad(loss, a)[0], ref)
    with SavedTensorStorage("bf16", min_numel=0):
        loss = f()
    assert 0 < _rel(torch.autograd.grad(loss, a)[0], ref) < 2**-7


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(64), nn.Linear(64, 64)
        self.regions: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.regions.append(checkpoint_region())
        return x + F.gelu(self.fc(self.ln(x)))


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_block_inside_still_recomputes_and_trains(reentrant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), _Block(), nn.Linear(64, 8))
    x = torch.randn(512, 32)

    def step():
        h = model[0](x)
        h = checkpoint(model[1], h, use_reentrant=reentrant)
        return model[2](h).square().mean()

    _, ref = _grads(model, step)
    model[1].regions.clear()
    storage = SavedTensorStorage(None, model=model, min_numel=0)
    _, g = _grads(model, step, storage)
    assert torch.equal(g, ref)
    kind = "reentrant" if reentrant else "non-reentrant"
    # the engine still finds the region, in forward and in the recompute, under this context's hooks
    assert [(r[1], r[2]) for r in model[1].regions] == [(kind, False), (kind, True)]
    model[1].regions.clear()
    storage = SavedTensorStorage("bf16", model=model, min_numel=0)
    _, g = _grads(model, step, storage)
    assert len(model[1].regions) == 2
    assert 0 < _rel(g, ref) < 2**-7
    with storage:
        assert checkpoint_region() is None  # this context's own hooks are not taken for a region


@pytest.mark.parametrize(("fmt", "step"), [(None, 0.0), ("bf16", 2.0**-8)])
def test_double_backward(fmt, step):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 1))
    x = torch.randn(512, 64, requires_grad=True)

    def penalty(storage):
        model.zero_grad(set_to_none=True)
        with storage:
            out = model(x).sum()
            (gx,) = torch.autograd.grad(out, x, create_graph=True)
            loss = gx.square().sum()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ref = penalty(SavedTensorStorage(None, enabled=False))
    g = penalty(SavedTensorStorage(fmt, model=model, min_numel=0))
    if fmt is None:
        assert torch.equal(g, ref)
    else:
        assert 0 < _rel(g, ref) < 2 * step


def test_retain_graph_backward_twice():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 1))
    x = torch.randn(512, 64)
    with SavedTensorStorage("bf16", model=model, min_numel=0):
        loss = model(x).sum()
    g1 = torch.autograd.grad(loss, model[0].weight, retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, model[0].weight)[0]
    assert torch.equal(g1, g2)


def test_torch_func_refuses_hooks_and_runs_when_paused():
    torch.manual_seed(0)
    w = torch.randn(64, 64) / 8
    x = torch.randn(64)

    def f(w):
        return torch.sin(w @ x).sum()

    ref = torch.func.grad(f)(w)
    storage = SavedTensorStorage("bf16", min_numel=0)
    with storage:
        with pytest.raises(RuntimeError, match="saved tensor hooks"):  # PyTorch's own rule, not ours
            torch.func.grad(f)(w)
        with storage.paused():
            assert torch.equal(torch.func.grad(f)(w), ref)
    # vmap over tensors that require grad saves through the hooks
    xs = torch.randn(3, 64, requires_grad=True)
    torch.func.vmap(lambda v: torch.sin(w @ v).sum())(xs).sum().backward()
    ref = xs.grad
    for fmt in (None, "bf16"):
        xs.grad = None
        with SavedTensorStorage(fmt, min_numel=0):
            out = torch.func.vmap(lambda v: torch.sin(w @ v).sum())(xs)
        out.sum().backward()
        if fmt is None:
            assert torch.equal(xs.grad, ref)
        else:
            assert 0 < _rel(xs.grad, ref) < 2**-8


def test_the_context_cleans_up_after_itself():
    hooks_before = dict(torch.nn.modules.module._global_forward_hooks)
    model = nn.Linear(8, 8)
    storage = SavedTensorStorage("bf16", model=model)
    with pytest.raises(ZeroDivisionError), storage:
        model(torch.randn(2, 8))
        raise ZeroDivisionError
    assert torch._C._autograd._top_saved_tensors_default_hooks(True) is None
    assert dict(torch.nn.modules.module._global_forward_hooks) == hooks_before
    with storage:  # re-enterable after an error
        with pytest.raises(UsageError, match="already active"), storage:
            pass
    with torch.autograd.graph.save_on_cpu(), pytest.raises(UsageError, match="inside other saved-tensor hooks"):
        with storage:
            pass

    def region(x):  # entered inside a checkpointed function, it would save what the region means to recompute
        with storage:
            return x.sin()

    with pytest.raises(UsageError, match="inside other saved-tensor hooks"):
        checkpoint(region, torch.randn(4, requires_grad=True), use_reentrant=False)


def test_bad_input_raises_clear_errors():
    with pytest.raises(AdaprecError, match="storage format"):
        SavedTensorStorage("bf17")
    with pytest.raises(UsageError, match="not both"):
        SavedTensorStorage("bf16", model=nn.Linear(2, 2), module_name=lambda: None)
    with pytest.raises(CheckpointError, match="missing"):
        SavedTensorStorage("bf16").load_state_dict({"forwards": 1})


def test_state_dict_round_trip(gpt):
    model, step = gpt
    storage = SavedTensorStorage("bf16", model=model, min_numel=0)
    _grads(model, step, storage)
    _grads(model, step, storage)
    state = storage.state_dict()
    assert state["forwards"] == 2 and state["bytes_after_total"] == 2 * storage.stats().bytes_after
    other = SavedTensorStorage("bf16")
    other.load_state_dict(copy.deepcopy(state))
    assert other.state_dict() == state


def test_module_name_callable():
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU())
    storage = SavedTensorStorage("bf16", module_name=lambda: "engine-says", min_numel=0)
    with storage:
        model(torch.randn(32, 64)).sum()
    assert set(storage.stats().by("module")) == {"engine-says"}


class _Save(torch.autograd.Function):
    """Saves its input; backward hands what autograd gives back to ``out``."""

    @staticmethod
    def forward(ctx, x, out):  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.out = out
        return x.sum()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        ctx.out.append(x)
        return torch.zeros_like(x), None


_layouts = st.sampled_from(["contiguous", "transposed", "sliced", "strided", "expanded"])


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), layout=_layouts, scale=st.floats(1e-30, 1e30),
       seed=st.integers(0, 2**16))
def test_round_trip_of_any_layout_matches_torchs_cast(rows, cols, layout, scale, seed):
    """Oracle: torch's own fp32 -> bf16 -> fp32 cast, element by element; fp32 plan: the same values, no copy."""
    base = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale).requires_grad_()
    t = base * 1
    if layout == "transposed":
        t = t.t()
    elif layout == "sliced":
        t = t[rows // 2:]
    elif layout == "strided":
        t = t[:, ::2]
    elif layout == "expanded":
        t = t[:1].expand(3, -1)
    for fmt in (None, "bf16"):
        got: list[torch.Tensor] = []
        with SavedTensorStorage(fmt, min_numel=0, sweep=False):  # t stays alive here: no going back to it
            loss = _Save.apply(t, got)
        loss.backward(retain_graph=True)
        (x,) = got
        assert x.shape == t.shape and x.dtype == t.dtype
        if fmt is None:
            assert torch.equal(x, t) and x.data_ptr() == t.data_ptr()
        else:
            assert torch.equal(x, t.detach().to(torch.bfloat16).float())


@pytest.mark.parametrize("plan", ["fp32", "bf16"])
def test_inside_the_engine(gpt, plan):
    """Nested in ``ap.autocast()`` (the engine's own torch function mode): fp32 storage changes no bit."""
    import warnings

    import adaprec

    model0, _ = gpt
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 65, (8, 64), generator=g), torch.randint(0, 65, (8, 64), generator=g)

    def grads(fmt):
        model = copy.deepcopy(model0)
        ap = adaprec.AdaptivePrecision(model, torch.optim.SGD(model.parameters(), lr=0.1), plan, guard=False)
        storage = SavedTensorStorage(None if fmt == "off" else fmt, model=model, min_numel=0, enabled=fmt != "off")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 emulated on a CPU without bf16 units: said once, not tested here
            with ap.autocast(), storage:
                loss = lm_loss(model(x), y)
            ap.backward(loss)
        out = torch.cat([p.grad.flatten() for p in model.parameters()])
        ap.close()
        return out, storage.stats()

    ref, _ = grads("off")
    same, _ = grads(None)
    assert torch.equal(same, ref)
    narrow, stats = grads("bf16")
    assert 0 < _rel(narrow, ref) < 2**-7 and stats.by("reason")["packed"][1] > 0


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 60), cols=st.integers(1, 70), fmt=st.sampled_from(["int8/row", "int8", "fp8_e4m3/block64",
                                                                             "int4", "int8/tensor", "bf16"]),
       piece=st.integers(1, 600), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_packing_a_piece_at_a_time_equals_packing_whole(rows, cols, fmt, piece, transposed, seed):
    """Oracle: adaprec.formats.storage packing the whole tensor; pieces give the same values and bytes."""
    from adaprec.engine import saved
    from adaprec.formats.storage import pack, storage_format, unpack

    t = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 10
    t = t.t() if transposed else t
    spec = storage_format(fmt)
    whole = pack(t, spec)
    was, saved._PIECE = saved._PIECE, piece
    try:
        pieces = saved._pack_pieces(t, spec)
    finally:
        saved._PIECE = was
    assert sum(p.nbytes for p in pieces) == whole.nbytes
    assert torch.equal(saved._unpack_pieces(pieces, t.shape, t.dtype), unpack(whole))


def test_the_input_of_a_planned_fp32_linear_is_packed_like_any_ops_input():
    """The engine's own linear (monitored steps run every fp32 module through it) keeps its uncast input the way
    autograd keeps any op's input: packed by the storage, not beside it (it used to stay fp32 on those steps)."""
    from adaprec.engine.engine import _FP32_LINEAR
    from adaprec.engine.gemm import GemmContext, planned_linear

    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x0 = torch.randn(16, 64, requires_grad=True)
    gc = GemmContext("lin", None, None, {}, lambda role, t: t, lambda role, t: None, lambda role, a: None, {})

    def run(fmt, linear):
        lin.zero_grad()
        x0.grad = None
        storage = SavedTensorStorage(fmt, min_numel=0)
        with storage:
            h = x0 * 2  # a layer's input has autograd history
            y = linear(h)
            del h  # not alive anyway: only autograd holds it
        y.square().sum().backward()
        return lin.weight.grad.clone(), x0.grad.clone(), y.detach(), storage.stats()

    def planned(h):
        return planned_linear(h, lin.weight, lin.bias, _FP32_LINEAR, gc)

    ref_w, ref_x, ref_y, _ = run(None, lin)
    w, x, y, stats = run(None, planned)  # fp32 storage: torch's own linear, bit for bit
    assert torch.equal(y, ref_y) and torch.equal(x, ref_x) and torch.allclose(w, ref_w, rtol=1e-6, atol=1e-6)
    w, x, y, stats = run("bf16", planned)
    assert stats.by("reason")["packed"] == (16 * 64 * 4, 16 * 64 * 2)
    # the weight gradient reads the input as stored: bf16-rounded, against an independent computation
    h = (x0.detach() * 2).to(torch.bfloat16).float()
    assert torch.allclose(w, (2 * y).T @ h, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, ref_x)  # the input gradient needs only the weight
