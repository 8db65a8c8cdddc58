"""The training loops people write, each compared with plain PyTorch and with a dispatch-level GEMM count.

One test per pattern of issue 21: activation checkpointing, evaluation under the
plan, a refused state, torch.func, several optimizers, the ledger against what
was dispatched, and the small ones (differentiable quantize, checkpoint files).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import adaprec
from _train import FAST_INT8_BF16  # the plans' formats run natively whatever this CPU has
from adaprec.errors import AdaprecError, CheckpointError

aten = torch.ops.aten
_FMT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
        torch.int8: "int8"}


class GemmCount(TorchDispatchMode):
    """MACs per dtype of every GEMM that reached the dispatcher (mm, addmm, bmm, _int_mm, convolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        p = func.overloadpacket
        if p in (aten.mm, aten._int_mm):
            a, b = args[0], args[1]
            self.macs[_FMT[b.dtype]] += a.shape[0] * a.shape[1] * b.shape[1]
        elif p is aten.addmm:
            a, b = args[1], args[2]
            self.macs[_FMT[b.dtype]] += a.shape[0] * a.shape[1] * b.shape[1]
        elif p is aten.bmm:
            a, b = args[0], args[1]
            self.macs[_FMT[b.dtype]] += a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        return out


def _ledger(ap) -> list:
    """The StepCost of every step, as the engine hands it to the ledger."""
    costs: list = []
    pop = ap.engine.pop_step_cost

    def spy():
        c = pop()
        costs.append(c)
        return c

    ap.engine.pop_step_cost = spy
    return costs


def _executed(cost) -> Counter:
    out: Counter[str] = Counter()
    for m in cost.modules.values():
        for g in m.gemms:
            out[g.executed] += g.macs
    return out


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Net(nn.Module):
    def __init__(self, ckpt: str | None = None) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.blk = Block()
        self.head = nn.Linear(16, 4)
        self.ckpt = ckpt

    def forward(self, x):
        h = self.inp(x)
        if self.ckpt is None:
            h = self.blk(h)
        else:
            h = cp.checkpoint(self.blk, h, use_reentrant=self.ckpt == "reentrant")
        return self.head(h)


def _data(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def _run(model, policy, steps=3, ap_kwargs=None, loop=None):
    """Train ``steps`` under adaprec; returns (ap, per-step dispatch counts, per-step ledger costs)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = adaprec.AdaptivePrecision(model, opt, policy=policy, **{"hardware": FAST_INT8_BF16, **(ap_kwargs or {})})
    costs = _ledger(ap)
    counts = []
    x, y = _data()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with GemmCount() as gc:
            if loop is None:
                with ap.autocast():
                    loss = nn.functional.cross_entropy(model(x), y)
                ap.backward(loss)
            else:
                loop(ap, model, x, y)
        ap.step()
        counts.append(dict(gc.macs))
    return ap, counts, costs


def _plain(model, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _close(a: nn.Module, b: nn.Module, atol: float) -> float:
    worst = 0.0
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        worst = max(worst, float((p - q).detach().abs().max()))
    assert worst <= atol, worst
    return worst


# --- 1. activation checkpointing ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("policy", ["fp32", "bf16", "error-budget"])
def test_checkpointing_recomputes_under_the_plan(mode, policy):
    torch.manual_seed(0)
    base = Net()
    ref = _plain(copy.deepcopy(base))  # plain PyTorch, no checkpointing
    straight = copy.deepcopy(base)
    _, _, costs_straight = _run(straight, policy)
    ck = copy.deepcopy(base)
    ck.ckpt = mode
    ap, counts, costs = _run(ck, policy)
    # the recompute runs in the same formats (and noise) as the first forward: same values as without it
    for p, q in zip(ck.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)
    if policy == "fp32":
        for p, q in zip(ck.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, q)  # bit for bit with plain PyTorch
    else:
        _close(ck, ref, atol=0.05)  # within bf16's error after 3 SGD steps
    # the ledger counts what ran, the recompute included, in the format it ran in
    for count, cost in zip(counts, costs, strict=True):
        assert dict(_executed(cost)) == count
    # the recompute is in it: the whole block (reentrant) or up to its last saved tensor (non-reentrant stops early)
    extra = costs[0].macs - costs_straight[0].macs
    assert extra == (16 * 16 * 32 * 2 if mode == "reentrant" else 16 * 16 * 32)


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_checkpointing_replays_the_stochastic_rounding_noise(mode):
    """Stochastically rounded activations (emulated): the recompute must draw the first run's noise."""
    from adaprec import ModulePrecision, PrecisionPlan, TensorRecipe

    sr = TensorRecipe("bf16", rounding="stochastic")
    mp = ModulePrecision(weight=sr, activation=sr, grad_output=sr, grad_weight=TensorRecipe("bf16"))
    plan = PrecisionPlan.uniform(["inp", "blk.a", "blk.b", "head"], mp)
    torch.manual_seed(0)
    base = Net()
    straight, ck = copy.deepcopy(base), copy.deepcopy(base)
    ck.ckpt = mode
    kw = {"backend": "emulate", "guard": False}
    _, _, costs_straight = _run(straight, plan, ap_kwargs=kw)
    _, counts, costs = _run(ck, plan, ap_kwargs=kw)
    for p, q in zip(ck.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)
    for count, cost in zip(counts, costs, strict=True):
        assert sum(count.values()) == cost.macs  # emulated: fp32 arithmetic at the dispatcher
    ref = _plain(copy.deepcopy(base))
    _close(ck, ref, atol=0.05)


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_exception_in_backward_does_not_wedge_the_controller(mode):
    torch.manual_seed(0)
    model = Net(ckpt=mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = adaprec.AdaptivePrecision(model, opt, policy="bf16", hardware=FAST_INT8_BF16)
    x, y = _data()
    h = model.head.weight.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("boom")))
    with ap.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    with pytest.raises(RuntimeError, match="boom"):
        ap.backward(loss)
    h.remove()
    with ap.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    ap.backward(loss)
    assert ap.step().stepped


# --- 2. evaluation under the plan ------------------------------------------------------------------
def test_evaluation_under_the_plan_leaves_training_alone():
    torch.manual_seed(0)
    base = Net()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    x, y = _data()

    def evaluating(ap, model, x, y):
        for _ in range(2):  # evaluation before and in between, any number of times
            with ap.autocast(), torch.no_grad():
                model(x)
        with ap.inference():
            out = model(x)
        with ap.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        with torch.no_grad(), ap.autocast():
            ev = model(x)
        assert torch.equal(ev, out)  # the same formats as the training forward, the same values each time
        ap.backward(loss)

    ap_a, _, costs_a = _run(a, "bf16")
    ap_b, _, costs_b = _run(b, "bf16", loop=evaluating)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [c.macs for c in costs_a] == [c.macs for c in costs_b]  # evaluation is not charged to steps
    assert ap_b.inference_macs["bf16"] == 3 * 4 * 16 * (12 * 16 + 16 * 32 * 2 + 16 * 4)
    assert ap_b.step_count == ap_a.step_count == 3


# --- 3. a refused state changes nothing --------------------------------------------------------------
@pytest.mark.parametrize("guard", [True, False])
def test_refused_state_is_all_or_nothing(guard):
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
    ap_o, _, _ = _run(other, "bf16", steps=2, ap_kwargs={"guard": guard})
    saved = ap_o.state_dict()
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))  # same names, other shapes
    ref = copy.deepcopy(model)
    ap_r, _, _ = _run(ref, "bf16", steps=3, ap_kwargs={"guard": guard})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = adaprec.AdaptivePrecision(model, opt, policy="bf16", guard=guard, hardware=FAST_INT8_BF16)
    costs = _ledger(ap)
    x, y = _data()
    for i in range(3):
        if i == 1:
            before = ap.state_dict()
            with pytest.raises(CheckpointError, match="nothing was changed"):
                ap.load_state_dict(saved)
            assert ap.state_dict()["engine"] == before["engine"]
        opt.zero_grad(set_to_none=True)
        with ap.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ap.backward(loss)
        ap.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    assert costs[-1].covered_macs == costs[-1].macs > 0  # the plan still covers every module
    # the advice adaprec gives after the first step is one that works then: prepare() is refused with a reason
    with pytest.raises(AdaprecError, match="prepare"):
        ap.prepare(x)


# --- 4. torch.func ----------------------------------------------------------------------------------
def test_torch_func_transforms_on_sampled_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = adaprec.AdaptivePrecision(model, opt, policy="bf16", monitor_every=1, hardware=FAST_INT8_BF16)
    x, y = _data()
    params = {k: v.detach() for k, v in model.named_parameters()}
    with ap.autocast():
        assert ap.engine.sampling
        per_sample = torch.func.vmap(lambda xi: torch.func.functional_call(model, params, (xi,)))(x)
        loss = nn.functional.cross_entropy(model(x), y)
    with torch.no_grad():
        plain = model(x)
    assert (per_sample - plain).abs().max() < 0.05  # bf16 error
    ap.backward(loss)
    assert ap.step().stepped
    assert set(ap.engine.sites) == {"0", "2"}  # functional_call's ops are the layers', not <root>'s
    with ap.autocast():
        jac = torch.func.jacrev(lambda xi: model(xi))(x[:2])
        loss = nn.functional.cross_entropy(model(x), y)
    plain_jac = torch.func.jacrev(lambda xi: model(xi))(x[:2])
    assert jac.shape == (2, 4, 2, 12)
    assert (jac - plain_jac).abs().max() < 0.05
    ap.backward(loss)
    assert ap.step().stepped
    assert set(ap.engine.sites) == {"0", "2"}


def test_planned_kernels_under_torch_func_raise_a_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = adaprec.AdaptivePrecision(model, opt, policy="fp8", backend="emulate")
    x, _ = _data()
    ap.prepare(x)
    with ap.autocast(), pytest.raises(AdaprecError, match="torch.func"):
        torch.func.jacrev(lambda xi: model(xi))(x[:2])


# --- 5. several optimizers --------------------------------------------------------------------------
def test_second_optimizer_is_unscaled_or_warned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    body, head = list(model[0].parameters()), list(model[2].parameters())
    opt, opt2 = torch.optim.SGD(body, lr=0.1), torch.optim.SGD(head, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = adaprec.AdaptivePrecision(model, opt, policy="fp16")
    x, y = _data()
    with ap.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    ap.backward(loss)
    assert ap._scale > 1
    ap.unscale_()
    ap.unscale_(opt2)  # as GradScaler: one unscale_ per optimizer
    ref = copy.deepcopy(model)
    nn.functional.cross_entropy(ref(x), y).backward()
    assert (head[0].grad - ref[2].weight.grad).abs().max() < 1e-2 * ref[2].weight.grad.abs().max()
    opt2.step()
    ap.step()
    # without unscale_(opt2): warned once, naming the parameters outside the optimizer adaprec knows
    for i in range(2):
        with ap.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ap.backward(loss)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ap.step()
        msgs = [str(m.message) for m in w if "optimizer" in str(m.message)]
        assert (len(msgs) == 1 and "unscale_(" in msgs[0]) if i == 0 else not msgs


# --- 6. the ledger against what was dispatched ---------------------------------------------------------
@pytest.mark.parametrize("policy", ["fp32", "bf16"])
def test_ledger_equals_dispatch_count_fgsm(policy):
    torch.manual_seed(0)
    model = Net()

    def loop(ap, model, x, y):
        xa = x.clone().requires_grad_(True)
        with ap.autocast():
            loss = nn.functional.cross_entropy(model(xa), y)
            (gx,) = torch.autograd.grad(loss, xa)  # the attack: no weight-gradient GEMM runs
            out = model((x + 0.01 * gx.sign()).detach())
            loss = nn.functional.cross_entropy(out, y)
        ap.backward(loss)

    _, counts, costs = _run(model, policy, ap_kwargs=None, loop=loop)
    for count, cost in zip(counts, costs, strict=True):
        assert dict(_executed(cost)) == count


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_ledger_labels_the_real_dtype_of_the_model(dtype):
    torch.manual_seed(0)
    model = Net().to(dtype)
    x, y = _data()

    def loop(ap, model, x_, y_):
        with ap.autocast():
            loss = nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
        ap.backward(loss)

    _, counts, costs = _run(model, "fp32", loop=loop)
    for count, cost in zip(counts, costs, strict=True):
        assert dict(_executed(cost)) == count


def test_fp64_layer_is_never_narrowed_silently():
    torch.manual_seed(0)
    model = Net().double()
    x, y = _data()

    def loop(ap, model, x_, y_):
        with ap.autocast():
            loss = nn.functional.cross_entropy(model(x.double()), y)
        ap.backward(loss)

    with pytest.warns(UserWarning, match="float64"):
        _run(model, "bf16", steps=1, loop=loop)


# --- 7. small --------------------------------------------------------------------------------------
def test_quantize_is_differentiable_straight_through():
    x = torch.randn(64, requires_grad=True)
    q = adaprec.quantize(x, "bf16")
    assert q.grad_fn is not None
    assert torch.equal(q.detach(), adaprec.quantize(x.detach(), "bf16"))
    (q * torch.arange(64.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(64.0))  # straight-through: the gradient passes unchanged


def test_checkpoint_files_are_checked(tmp_path):
    from adaprec.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = Net()
    ap, _, _ = _run(model, "bf16", steps=2)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": model.state_dict(), "adaprec": ap.state_dict()})
    back = load_checkpoint(path)
    assert back["adaprec"]["step"] == 2
    assert torch.equal(back["model"]["head.weight"], model.head.weight)
    raw = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x01
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum|corrupt"):
        load_checkpoint(tmp_path / "flip.pt")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("policy", ["fp32", "bf16"])
def test_ledger_equals_dispatch_count_gradient_penalty(policy):
    torch.manual_seed(0)
    model = Net()

    def loop(ap, model, x, y):
        xa = x.clone().requires_grad_(True)
        with ap.autocast():
            loss = nn.functional.cross_entropy(model(xa), y)
            (gx,) = torch.autograd.grad(loss, xa, create_graph=True)
            loss = loss + gx.square().sum()
        ap.backward(loss)

    _, counts, costs = _run(model, policy, loop=loop)
    for count, cost in zip(counts, costs, strict=True):
        assert dict(_executed(cost)) == count
