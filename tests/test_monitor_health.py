"""HealthMonitor: snapshots, loss trend, gradient diversity, distributed reduction, state."""

import io
import math

import pytest
import torch

from adaprec.errors import CheckpointError, PolicyError
from adaprec.monitor import HealthMonitor
from adaprec.plan import PrecisionPlan, TensorRecipe

PLAN = PrecisionPlan.uniform(["a", "b"])


def roundtrip(d):
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_should_sample_every_k_steps():
    m = HealthMonitor(every=5)
    assert [s for s in range(12) if m.should_sample(s)] == [0, 5, 10]


def test_snapshot_holds_tensor_stats_then_clears_them():
    m = HealthMonitor(candidates=("fp8_e4m3", "fp32"))
    m.observe_tensor("a", "weight", torch.randn(64, 64), TensorRecipe("bf16"))
    snap = m.snapshot(0, 0, PLAN)
    st = snap.stats("a", "weight")
    assert snap.sampled and st is not None
    assert set(st.sqnr_db) == {"bf16", "fp8_e4m3", "fp32"}
    assert st.sqnr_db["bf16"] > st.sqnr_db["fp8_e4m3"]
    assert not m.snapshot(1, 0, PLAN).sampled


def test_same_role_observed_twice_pools_the_sums():
    torch.manual_seed(0)
    x1, x2 = torch.randn(500), torch.randn(500) * 2
    x2[0] = x1.abs().max() * 2  # share nothing but make the pooled amax that of x2
    r = TensorRecipe("fp8_e4m3")  # unscaled: the error of each element does not depend on the other tensor
    pooled = HealthMonitor(candidates=("fp8_e5m2",))
    pooled.observe_tensor("a", "activation", x1, r)
    pooled.observe_tensor("a", "activation", x2, r)
    joint = HealthMonitor(candidates=("fp8_e5m2",))
    joint.observe_tensor("a", "activation", torch.cat([x1, x2]), r)
    p = pooled.snapshot(0, 0, PLAN).stats("a", "activation")
    j = joint.snapshot(0, 0, PLAN).stats("a", "activation")
    assert p.amax == j.amax
    assert p.sqnr_db["fp8_e4m3"] == pytest.approx(j.sqnr_db["fp8_e4m3"], abs=1e-5)  # float32 error sums


def test_loss_trend_excludes_the_latest_loss_and_nonfinite_losses():
    m = HealthMonitor(ema_beta=0.5)
    for _ in range(5):
        m.observe_loss(1.0)
    m.observe_loss(torch.tensor(10.0))
    snap = m.snapshot(5, 0, PLAN)
    assert snap.loss == 10.0 and snap.loss_ema == 1.0
    assert snap.loss_history[-1] == 10.0
    m.observe_loss(float("nan"))
    snap = m.snapshot(6, 0, PLAN)
    assert snap.nonfinite and math.isnan(snap.loss)
    assert snap.loss_ema == pytest.approx(5.5)  # 0.5*1 + 0.5*10, the NaN left it alone


def test_epoch_losses_from_end_epoch_and_from_epoch_boundary():
    m = HealthMonitor()
    for v in (1.0, 3.0):
        m.observe_loss(v)
    m.end_epoch()
    for v in (4.0, 6.0):
        m.observe_loss(v)
    snap = m.snapshot(3, 1, PLAN)
    assert snap.epoch_losses == (2.0,)
    snap = m.snapshot(4, 2, PLAN)  # no end_epoch(): the boundary closes epoch 1
    assert snap.epoch_losses == (2.0, 5.0)


def test_gradient_diversity_oracles():
    w = 4
    m = HealthMonitor(diversity_window=w)
    g = torch.randn(10)
    for i in range(w):
        m.observe_grads("a", g)  # identical gradients: W||g||^2 / ||W g||^2 = 1/W
        m.observe_grads("b", torch.eye(w)[i] * (i + 1))  # orthogonal gradients: diversity 1
    snap = m.snapshot(0, 0, PLAN)
    assert snap.grad_diversity["a"] == pytest.approx(1 / w)
    assert snap.grad_diversity["b"] == pytest.approx(1.0)
    num = w * float(g.square().sum()) + sum((i + 1) ** 2 for i in range(w))
    den = float((w * g).square().sum()) + sum((i + 1) ** 2 for i in range(w))
    assert snap.model_grad_diversity == pytest.approx(num / den)
    assert snap.grad_norm["a"] == pytest.approx(float(g.norm()), rel=1e-6)


def test_diversity_window_resets():
    m = HealthMonitor(diversity_window=2)
    m.observe_grads("a", torch.tensor([1.0, 0.0]))
    m.observe_grads("a", torch.tensor([1.0, 0.0]))  # window 1: identical -> 1/2
    m.observe_grads("a", torch.tensor([1.0, 0.0]))
    m.observe_grads("a", torch.tensor([0.0, 1.0]))  # window 2: orthogonal -> 1
    assert m.snapshot(0, 0, PLAN).grad_diversity["a"] == pytest.approx(1.0)


def test_diversity_window_keeps_fp32_sums_and_float64_norms():
    """The running sum is the monitor's largest buffer: fp32 (4 bytes per sampled coordinate, in memory and in the
    checkpoint), while the squared norms are summed in float64, so nearly cancelling gradients keep the oracle's
    diversity."""
    torch.manual_seed(0)
    w, n = 4, 4096
    base = torch.randn(n)
    grads = [base * (1 if i % 2 == 0 else -1) + 1e-3 * torch.randn(n) for i in range(w)]  # cancel pairwise
    m = HealthMonitor(diversity_window=w, grad_sample=n)
    for g in grads[:-1]:
        m.observe_grads("a", g)
    window = m.state_dict()["div_window"]["a"]["sum"]
    assert window.dtype == torch.float32 and window.numel() == n
    m.observe_grads("a", grads[-1])
    g64 = [g.double() for g in grads]
    oracle = sum(float(g.square().sum()) for g in g64) / float(sum(g64).square().sum())
    assert oracle > 1e4  # the case float32 squares of a small sum would blur
    assert m.snapshot(0, 0, PLAN).grad_diversity["a"] == pytest.approx(oracle, rel=1e-4)


def test_reduce_distributed_is_a_noop_without_a_process_group():
    m = HealthMonitor()
    m.observe_loss(1.0)
    assert m.reduce_distributed() is False


def test_reduce_distributed_with_a_fake_two_rank_reduce():
    torch.manual_seed(0)
    x0, x1 = torch.randn(1000), torch.randn(1000) * 0.5
    peak = max(x0.abs().max(), x1.abs().max())
    x0[0], x1[0] = peak, peak  # same amax on both ranks, so per-tensor scales agree
    r = TensorRecipe("fp32")
    ranks = [HealthMonitor(candidates=("fp8_e4m3", "fp4_e2m1")) for _ in range(2)]
    for m, x, loss in zip(ranks, (x0, x1), (1.0, 3.0), strict=True):
        m.observe_tensor("a", "activation", x, r)
        m.observe_loss(loss)

    captured = {}

    def pack(m):  # what rank 1 contributes to each collective, in call order
        seen = []
        m.reduce_distributed(lambda t, op: seen.append(t.clone()))
        return seen

    other = pack(ranks[1])
    calls = iter(other)

    def fake(t, op):
        o = next(calls)
        captured.setdefault("ops", []).append(op)
        if op == "max":
            torch.maximum(t, o, out=t)
        elif op == "sum":
            t.add_(o)
        else:
            t.add_(o).div_(2)

    assert ranks[0].reduce_distributed(fake) is True
    assert captured["ops"] == ["max", "sum", "mean"]
    snap = ranks[0].snapshot(0, 0, PLAN)
    joint = HealthMonitor(candidates=("fp8_e4m3", "fp4_e2m1"))
    joint.observe_tensor("a", "activation", torch.cat([x0, x1]), r)
    want = joint.snapshot(0, 0, PLAN).stats("a", "activation")
    got = snap.stats("a", "activation")
    assert got.amax == want.amax
    for f in ("fp8_e4m3", "fp4_e2m1"):
        assert got.sqnr_db[f] == pytest.approx(want.sqnr_db[f], abs=1e-5)  # float32 error sums
        assert got.underflow_frac[f] == pytest.approx(want.underflow_frac[f])
    assert snap.loss == 2.0


def test_state_dict_round_trip_continues_identically():
    a = HealthMonitor(diversity_window=3)
    torch.manual_seed(0)
    grads = [torch.randn(20) for _ in range(5)]
    for v in (1.0, 2.0, 3.0):
        a.observe_loss(v)
    a.end_epoch()
    a.observe_loss(4.0)
    for g in grads[:2]:
        a.observe_grads("a", g)  # mid-window
    b = HealthMonitor(diversity_window=3)
    b.load_state_dict(roundtrip(a.state_dict()))
    for m in (a, b):
        m.observe_grads("a", grads[2])
        m.observe_loss(5.0)
    sa, sb = a.snapshot(9, 1, PLAN), b.snapshot(9, 1, PLAN)
    assert sa.to_dict() == sb.to_dict()
    assert "a" in sa.grad_diversity


def test_bad_arguments_and_state_raise_adaprec_errors():
    with pytest.raises(PolicyError, match="every"):
        HealthMonitor(every=0)
    with pytest.raises(CheckpointError, match="state_dict"):
        HealthMonitor().load_state_dict({"loss_ema": 1.0})


def test_shadow_audit_reaches_the_next_snapshot_only():
    m = HealthMonitor()
    m.observe_shadow({"a": (0.99, 0.05)})
    assert m.snapshot(0, 0, PLAN).shadow == {"a": (0.99, 0.05)}
    assert m.snapshot(1, 0, PLAN).shadow == {}


def test_role_candidates_limit_what_each_role_is_measured_against():
    m = HealthMonitor(candidates=("fp8_e4m3", "int8", "bf16"), role_candidates={"grad_weight": ("bf16",)})
    x = torch.randn(256)
    m.observe_tensor("a", "weight", x, TensorRecipe("fp32"))
    m.observe_tensor("a", "grad_weight", x, TensorRecipe("fp32"))
    snap = m.snapshot(0, 0, PLAN)
    assert set(snap.stats("a", "weight").sqnr_db) == {"fp32", "fp8_e4m3", "int8", "bf16"}
    assert set(snap.stats("a", "grad_weight").sqnr_db) == {"fp32", "bf16"}  # the current format, then its own
