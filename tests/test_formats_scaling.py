"""Per-tensor scalers, MX block quantization and dynamic loss scaling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _format_oracle import nearest
from adaprec.errors import AdaprecError, CheckpointError
from adaprec.formats import (
    CurrentScaler,
    DelayedScaler,
    DynamicLossScaler,
    ScalingError,
    get,
    pow2_scale,
    quantize,
    quantize_mx,
)

# --- per-tensor scaling -------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(amax=st.floats(min_value=2.0**-100, max_value=2.0**100, width=32), name=st.sampled_from(["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "int8"]))
def test_pow2_scale_is_the_largest_power_of_two_that_fits(amax: float, name: str) -> None:
    f = get(name)
    s = pow2_scale(torch.tensor(amax), f).item()
    k = math.log2(s)
    assert k == int(k)
    assert amax * s <= f.max_finite < amax * s * 2  # float64 products of float32 values: exact


def test_pow2_scale_margin_and_degenerate_amax() -> None:
    assert pow2_scale(torch.tensor(1.0), "fp8_e4m3").item() == 256.0
    assert pow2_scale(torch.tensor(1.0), "fp8_e4m3", margin=2).item() == 64.0
    for bad in (0.0, math.inf, math.nan):
        assert pow2_scale(torch.tensor(bad), "fp8_e4m3").item() == 1.0


def test_current_scaler_quantizes_x_times_scale() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e-3
    s = CurrentScaler("fp8_e4m3")
    q = s.quantize(x)
    scale = s.last_scale
    assert scale.item() == pow2_scale(x.abs().amax(), "fp8_e4m3").item()
    assert torch.equal(q, quantize(x * scale, "fp8_e4m3", saturate=True) / scale)
    # scaled, values within 2^6 of amax are normal e4m3: relative error <= half an ulp (2^-4);
    # unscaled, those same values fall below e4m3's normal range
    big = x.abs() > x.abs().amax() / 64
    assert ((q - x).abs() / x.abs())[big].max() <= 2.0**-4
    assert ((quantize(x, "fp8_e4m3") - x).abs() / x.abs())[big].max() > 0.25
    assert (x.abs().amax() * scale) <= 448


def test_current_scaler_margin_and_state_dict() -> None:
    x = torch.tensor([3.0, -1.0])
    a, b = CurrentScaler("fp8_e5m2"), CurrentScaler("fp8_e5m2", margin=3)
    a.quantize(x)
    b.quantize(x)
    assert a.last_scale.item() == 8 * b.last_scale.item()
    c = CurrentScaler("bf16")
    c.load_state_dict(b.state_dict())
    assert c.fmt.name == "fp8_e5m2" and c.margin == 3 and c.last_scale.item() == b.last_scale.item()
    with pytest.raises(ScalingError):
        CurrentScaler("fp8_e4m3", margin=-1)
    with pytest.raises(CheckpointError, match="missing"):
        c.load_state_dict({"fmt": "bf16"})


def _expected_delayed_scales(amaxes, history, reduce):
    """Reference: plain Python list, scale for step t from the finite amaxes seen before t."""
    seen: list[float] = []
    out = []
    for a in amaxes:
        past = (max(seen[-history:]) if reduce == "max" else seen[-1]) if seen else 0.0
        used = past if past > 0 else a
        out.append(pow2_scale(torch.tensor(used), "fp8_e4m3").item())
        seen.append(a if math.isfinite(a) else (seen[-1] if seen else 0.0))
    return out


@pytest.mark.parametrize("reduce", ["max", "most_recent"])
def test_delayed_scaler_uses_history_before_this_step(reduce: str) -> None:
    amaxes = [1.0, 2.0, 100.0, 0.5, math.inf, 0.25, 0.25, 0.25, 0.25, 3.0]
    d = DelayedScaler("fp8_e4m3", history=3, reduce=reduce)
    got = []
    for a in amaxes:
        x = torch.tensor([a, -a / 2])
        q = d.quantize(x)
        got.append(d.last_scale.item())
        s = d.last_scale
        assert torch.equal(q, quantize(x * s, "fp8_e4m3", saturate=True) / s)
    assert got == _expected_delayed_scales(amaxes, 3, reduce)
    # first call had no history: it used its own amax
    assert got[0] == pow2_scale(torch.tensor(1.0), "fp8_e4m3").item()


def test_delayed_scaler_state_dict_round_trip_resumes_exactly() -> None:
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(64, generator=g) * 2.0**k for k in range(-4, 6)]
    a = DelayedScaler("fp6_e3m2", history=4)
    for x in xs[:5]:
        a.quantize(x)
    b = DelayedScaler("fp6_e3m2", history=4)
    b.load_state_dict(a.state_dict())
    for x in xs[5:]:
        assert torch.equal(a.quantize(x, "stochastic", seed=1), b.quantize(x, "stochastic", seed=1))
        assert a.last_scale.item() == b.last_scale.item()
    bad = a.state_dict()
    bad["amax_history"] = torch.zeros(2)
    with pytest.raises(CheckpointError):
        b.load_state_dict(bad)


@pytest.mark.parametrize("kwargs", [{"history": 0}, {"reduce": "mean"}, {"margin": 1.5}])
def test_delayed_scaler_bad_arguments(kwargs) -> None:
    with pytest.raises(ScalingError):
        DelayedScaler("fp8_e4m3", **kwargs)


# --- MX blocks ------------------------------------------------------------------------


def _mx_reference(row: list[float], elem: str, block: int) -> list[float]:
    """Per-block loop in plain Python floats following the OCP MX v1.0 conversion."""
    f = get(elem)
    emax = f.emax if f.kind == "float" else math.frexp(f.max_finite)[1] - 1
    out: list[float] = []
    for start in range(0, len(row), block):
        vals = row[start:start + block]
        if any(math.isnan(v) or math.isinf(v) for v in vals):
            out += [math.nan] * len(vals)
            continue
        amax = max(abs(v) for v in vals)
        e = math.frexp(amax)[1] - 1 - emax if amax > 0 else -127
        e = min(max(e, -127), 127)
        for v in vals:
            out.append(nearest(v / 2.0**e, f, saturate=True) * 2.0**e)
    return out


@pytest.mark.parametrize("elem", ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_mx_matches_a_per_block_reference(elem: str, data) -> None:
    block = data.draw(st.sampled_from([32, 8, 5]))
    cols = data.draw(st.integers(1, 80))  # includes partial last blocks
    vals = data.draw(st.lists(st.floats(width=32, min_value=-1e4, max_value=1e4), min_size=2 * cols, max_size=2 * cols))
    x = torch.tensor(vals, dtype=torch.float32).reshape(2, cols)
    x[1, : min(cols, block)] = 0.0  # a zero block
    got = quantize_mx(x, elem, block_size=block)
    want = torch.tensor([_mx_reference(r, elem, block) for r in x.tolist()], dtype=torch.float32)
    assert torch.equal(got, want), (x, got, want)


def test_mx_special_values_zero_blocks_and_names() -> None:
    x = torch.zeros(3, 40)
    x[0] = torch.linspace(-5, 5, 40)
    x[1, 3] = math.nan
    x[2, 35] = math.inf
    q = quantize_mx(x, "mxfp4_e2m1")
    assert torch.isnan(q[1, :32]).all() and not torch.isnan(q[1, 32:]).any()
    assert torch.isnan(q[2, 32:]).all() and (q[2, :32] == 0).all()
    assert torch.equal(q[0], quantize_mx(x[0], "fp4_e2m1"))
    # elements of a block are E2M1 values times one power of two
    blk = q[0, :32] / (2.0 ** (math.floor(math.log2(5.0)) - 2))
    assert set(blk.abs().unique().tolist()) <= {0, 0.5, 1, 1.5, 2, 3, 4, 6}
    assert quantize_mx(torch.zeros(0), "mxfp8_e4m3").numel() == 0
    with pytest.raises(ScalingError):
        quantize_mx(x, "fp8_e4m3", block_size=0)


def test_mx_stochastic_is_seeded() -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    a = quantize_mx(x, "fp6_e2m3", rounding="stochastic", seed=5)
    assert torch.equal(a, quantize_mx(x, "fp6_e2m3", rounding="stochastic", seed=5))
    assert not torch.equal(a, quantize_mx(x, "fp6_e2m3", rounding="stochastic", seed=6))


# --- dynamic loss scaling --------------------------------------------------------------


def _gradscaler_reference(found: list[bool], init: float, growth: float, backoff: float, interval: int):
    """The rule of torch.amp.GradScaler.update written out step by step."""
    scale, tracker, out = init, 0, []
    for inf in found:
        if inf:
            scale, tracker = scale * backoff, 0
        else:
            tracker += 1
            if tracker == interval:
                scale, tracker = scale * growth, 0
        out.append(scale)
    return out


@settings(max_examples=50, deadline=None)
@given(found=st.lists(st.booleans(), max_size=60), interval=st.integers(1, 5))
def test_loss_scaler_follows_gradscaler_rule(found: list[bool], interval: int) -> None:
    ls = DynamicLossScaler(init_scale=2.0**10, growth_interval=interval, min_scale=2.0**-20)
    got = []
    for inf in found:
        skipped = ls.update(inf)
        assert skipped == {"default": inf}
        got.append(ls.scale())
    assert got == _gradscaler_reference(found, 2.0**10, 2.0, 0.5, interval)


def test_loss_scaler_matches_torch_gradscaler_on_cpu() -> None:
    from torch.amp import GradScaler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.0)
    ref = GradScaler("cpu", init_scale=64.0, growth_interval=3)
    ours = DynamicLossScaler(init_scale=64.0, growth_interval=3)
    for inf in [False, False, False, True, False, True, True, False, False, False, False]:
        p.grad = torch.tensor([math.inf if inf else 1.0])
        ref.scale(torch.ones(()))
        ref.step(opt)
        ref.update()
        ours.update(inf)
        assert ours.scale() == ref.get_scale()


def test_loss_scaler_groups_are_independent_and_min_scale_holds() -> None:
    ls = DynamicLossScaler(init_scale=8.0, growth_interval=2, groups=("body", "head"), min_scale=2.0)
    assert ls.update({"body": True, "head": False}) == {"body": True, "head": False}
    assert (ls.scale("body"), ls.scale("head")) == (4.0, 8.0)
    ls.update({"head": False})  # body did not step: unchanged
    assert (ls.scale("body"), ls.scale("head"), ls.growth_tracker("body")) == (4.0, 16.0, 0)
    ls.update(True)
    ls.update(True)
    assert ls.scale("body") == 2.0 and ls.at_min_scale("body") and not ls.at_min_scale("head")
    with pytest.raises(ScalingError, match="body, head"):
        ls.scale("tail")
    with pytest.raises(ScalingError):
        ls.update({"tail": True})


def test_loss_scaler_state_dict_round_trip_and_disabled() -> None:
    a = DynamicLossScaler(init_scale=16.0, growth_interval=3, groups=("a", "b"))
    for f in [False, {"a": True}, False, False]:
        a.update(f)
    b = DynamicLossScaler(groups=("a", "b"))
    b.load_state_dict(a.state_dict())
    for f in [False, True, False, False, False]:
        assert a.update(f) == b.update(f)
        assert (a.scale("a"), a.scale("b")) == (b.scale("a"), b.scale("b"))
    with pytest.raises(CheckpointError, match="groups"):
        DynamicLossScaler(groups=("x",)).load_state_dict(a.state_dict())
    with pytest.raises(CheckpointError, match="missing"):
        b.load_state_dict({"scale": {}})
    off = DynamicLossScaler(enabled=False)
    assert off.scale() == 1.0 and off.update(True) == {"default": False}


@pytest.mark.parametrize(
    "kwargs",
    [{"growth_factor": 1.0}, {"growth_factor": 0.5}, {"backoff_factor": 1.0}, {"backoff_factor": 0.0},
     {"growth_interval": 0}, {"init_scale": -1.0}, {"init_scale": math.inf}, {"groups": ()},
     {"groups": ("a", "a")}, {"min_scale": 1e9}],
)
def test_loss_scaler_bad_arguments(kwargs) -> None:
    with pytest.raises(ScalingError) as info:
        DynamicLossScaler(**kwargs)
    assert isinstance(info.value, AdaprecError)
