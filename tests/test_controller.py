"""The training face: protocol, exactness against plain PyTorch, loss scaling, resume."""

from __future__ import annotations

import io

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import adaprec
from adaprec.errors import CheckpointError, UsageError
from adaprec.optim import moment_formats
from adaprec.policies import StaticPolicy


def _digits(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32) / 16.0
    y = torch.tensor(d.target[:n], dtype=torch.long)
    return x, y


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _batches(x, y, steps, bs=64):
    for i in range(steps):
        j = (i * bs) % (len(x) - bs)
        yield x[j : j + bs], y[j : j + bs]


def _train(model, opt, ap, x, y, steps, loss_fn=nn.functional.cross_entropy):
    results = []
    for xb, yb in _batches(x, y, steps):
        opt.zero_grad(set_to_none=True)
        with ap.autocast():
            loss = loss_fn(model(xb), yb)
        ap.backward(loss)
        results.append(ap.step())
    return results


def test_fp32_plan_is_bit_identical_to_plain_pytorch():
    x, y = _digits()
    plain = _mlp()
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    for xb, yb in _batches(x, y, 30):
        opt_p.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(plain(xb), yb).backward()
        opt_p.step()
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ap = adaprec.AdaptivePrecision(model, opt, "fp32", monitor_every=7)
    res = _train(model, opt, ap, x, y, 30)
    assert all(r.stepped for r in res)
    for a, b in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_misuse_is_a_clear_error():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ap = adaprec.AdaptivePrecision(model, opt, "bf16")
    with pytest.raises(UsageError, match="backward"):
        ap.step()
    x, y = _digits(64)
    with pytest.raises(UsageError, match="autocast"):
        ap.backward(nn.functional.cross_entropy(model(x), y))
    with ap.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    ap.backward(loss)
    with pytest.raises(UsageError, match="twice"):
        ap.backward(loss)
    assert ap.step().stepped
    with pytest.raises(UsageError, match="Optimizer"):
        adaprec.AdaptivePrecision(model, "sgd", "fp32")  # type: ignore[arg-type]


def test_fp16_loss_scaling_rescues_gradients_that_underflow():
    """Tiny gradients flush to zero in fp16; the loss scale lifts them into range.

    The loss is multiplied by 1e-6 so that every gradient is below fp16's
    smallest subnormal (2^-24 ~ 6e-8) before scaling.
    """
    x, y = _digits(256)

    def loss_fn(out, target):
        return 1e-6 * nn.functional.cross_entropy(out, target)

    outcome = {}
    for scaling in (False, True):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=5e5)
        ap = adaprec.AdaptivePrecision(model, opt, "fp16", loss_scaling=scaling, guard=False)
        xb, yb = x[:64], y[:64]
        with ap.autocast():
            loss = loss_fn(model(xb), yb)
        ap.backward(loss)
        g = model[0].weight.grad
        zero_frac = float((g == 0).float().mean())
        ap.step()
        _train(model, opt, ap, x, y, 40, loss_fn)
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean())
        outcome[scaling] = (zero_frac, acc)
    (zero_off, acc_off), (zero_on, acc_on) = outcome[False], outcome[True]
    assert zero_off == 1.0, "without loss scaling every fp16 gradient underflows to zero"
    assert zero_on < 0.5
    assert acc_on > acc_off + 0.3


def test_step_result_reports_skipped_nonfinite_step():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ap = adaprec.AdaptivePrecision(model, opt, "fp32", guard=False)
    x, y = _digits(64)
    before = [p.detach().clone() for p in model.parameters()]
    with ap.autocast():
        loss = nn.functional.cross_entropy(model(x), y) * float("inf")
    ap.backward(loss)
    res = ap.step()
    assert not res and "inf/NaN" in res.reason
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _run_steps(ap, model, opt, x, y, start, stop):
    for i, (xb, yb) in enumerate(_batches(x, y, stop)):
        if i < start:
            continue
        opt.zero_grad(set_to_none=True)
        with ap.autocast():
            loss = nn.functional.cross_entropy(model(xb), yb)
        ap.backward(loss)
        ap.step()


@pytest.mark.parametrize("policy", ["fp8-hybrid", "error-budget"])
def test_resume_is_bit_exact(policy):
    x, y = _digits()
    n = 12

    def make():
        model = _mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        ap = adaprec.AdaptivePrecision(model, opt, policy, monitor_every=3, seed=7)
        return model, opt, ap

    m1, o1, a1 = make()
    _run_steps(a1, m1, o1, x, y, 0, 2 * n)

    m2, o2, a2 = make()
    _run_steps(a2, m2, o2, x, y, 0, n)
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "ap": a2.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m3, o3, a3 = make()
    m3.load_state_dict(ck["model"])
    o3.load_state_dict(ck["opt"])
    a3.load_state_dict(ck["ap"])
    _run_steps(a3, m3, o3, x, y, n, 2 * n)
    for p, q in zip(m1.parameters(), m3.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a1.plan == a3.plan
    assert a1.energy.summary()["modeled_j"] == pytest.approx(a3.energy.summary()["modeled_j"], rel=1e-12)


def test_bad_state_dict_names_missing_keys():
    model = _mlp()
    ap = adaprec.AdaptivePrecision(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp32")
    with pytest.raises(CheckpointError, match="lacks"):
        ap.load_state_dict({"step": 3})


def test_optimizer_state_is_kept_narrow_for_real():
    """A bf16 optimizer-state plan keeps the moments in 2 bytes each (no fp32 storage rounded in place), small
    tensors in fp32, and the update stays within bf16's error of fp32 Adam's."""
    x, y = _digits()
    models, held = [], {}
    for spec in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))  # 8192 weights: narrow
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        plan = adaprec.PrecisionPlan.uniform(["0", "2"], adaprec.plan.ModulePrecision(optimizer_state=spec))
        ap = adaprec.AdaptivePrecision(model, opt, plan, guard=False)
        _train(model, opt, ap, x, y, 5)
        models.append(model)
        held = ap.update.states.nbytes()
    # 2 moments x 8192 elements x 2 bytes; the rest (biases, the 1280-weight head) stays fp32 (under 4096 elements)
    moments = moment_formats("bf16").nbytes(64 * 128)
    assert moments == 2 * 2 * 64 * 128
    assert moments <= held["bf16"] <= moments + 64  # and the step count and format tag
    small = 128 + 1280 + 10
    assert 2 * 4 * small <= held["fp32"] <= 2 * 4 * small + 3 * 8  # two fp32 moments (and a step) per small tensor
    w_fp32, w_bf16 = models[0][0].weight, models[1][0].weight
    assert not torch.equal(w_fp32, w_bf16)  # the narrow state really changed the update
    assert (w_fp32 - w_bf16).abs().max() < 5e-3 * 5  # within bf16 rounding of five updates of lr 1e-2


class _RollbackAt(StaticPolicy):
    """fp32 throughout; asks for a rollback at one step."""

    may_roll_back = True

    def __init__(self, at: int) -> None:
        super().__init__("fp32")
        self.at = at
        self.rollback_requested = False

    def decide(self, snapshot, step):
        self.rollback_requested = step == self.at
        return super().decide(snapshot, step)


def test_rollback_restores_weights_and_optimizer_state_of_before_the_bad_update():
    """A policy that asks for a rollback at step k undoes the update of step k-1 and skips step k."""
    x, y = _digits()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ap = adaprec.AdaptivePrecision(model, opt, _RollbackAt(6), guard=False, rollback=True)
    snapshots = []
    for i, (xb, yb) in enumerate(_batches(x, y, 8)):
        snapshots.append(([p.detach().clone() for p in model.parameters()],
                          {k: v.clone() for k, v in opt.state[model[0].weight].items()} if opt.state else {}))
        opt.zero_grad(set_to_none=True)
        with ap.autocast():
            loss = nn.functional.cross_entropy(model(xb), yb)
        ap.backward(loss)
        res = ap.step()
        if i == 6:
            assert res.rolled_back and not res.stepped
            weights, state = snapshots[5]  # before the update of step 5
            assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
            assert all(torch.equal(v, opt.state[model[0].weight][k]) for k, v in state.items())


def test_resume_keeps_the_rollback_copy():
    """A rollback asked for on the first step after a resume undoes the step before the save, as without one."""
    x, y = _digits()
    batches = list(_batches(x, y, 10))

    def run(start, stop, model, opt, ap):
        for xb, yb in batches[start:stop]:
            opt.zero_grad(set_to_none=True)
            with ap.autocast():
                loss = nn.functional.cross_entropy(model(xb), yb)
            ap.backward(loss)
            ap.step()

    def fresh():
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, opt, adaprec.AdaptivePrecision(model, opt, _RollbackAt(6), guard=False, rollback=True)

    whole = fresh()
    run(0, 10, *whole)
    first = fresh()
    run(0, 6, *first)
    saved = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(), "ap": first[2].state_dict()}, saved)
    saved.seek(0)
    ckpt = torch.load(saved, weights_only=True)
    second = fresh()
    second[0].load_state_dict(ckpt["model"])
    second[1].load_state_dict(ckpt["opt"])
    second[2].load_state_dict(ckpt["ap"])
    run(6, 10, *second)
    for a, b in zip(whole[0].parameters(), second[0].parameters(), strict=True):
        assert torch.equal(a, b)
    assert second[2].timeline == whole[2].timeline
