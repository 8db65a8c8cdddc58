"""Stochastic rounding: outputs are neighbours, unbiased in the mean, reproducible by seed."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _format_oracle import neighbours
from adaprec.formats import get, quantize
from adaprec.formats.quantize import _hash32, _seed_keys

N = 20_000  # samples per value: the standard error is at most ulp / (2 sqrt(N))
K = 5.0  # standard errors of slack: a false alarm has probability ~6e-7 per check

FORMATS = ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp4_e2m1", "e3m4", "int8", "fixed8_4"]


def _in_range(f, v: float) -> bool:
    return abs(v) <= f.max_finite and math.isfinite(v)


@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=12, deadline=None)
@given(v=st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
       seed=st.integers(0, 2**40))
def test_outputs_are_neighbours_and_the_mean_converges(name: str, v: float, seed: int) -> None:
    f = get(name)
    lo, hi = neighbours(v, f)
    if not (_in_range(f, lo) and _in_range(f, hi)):
        return  # overflow region: saturation, not rounding, decides
    x = torch.full((N,), v, dtype=torch.float32)
    q = quantize(x, f, "stochastic", seed=seed)
    assert bool(((q == lo) | (q == hi)).all()), (v, lo, hi, q.unique())
    if hi == lo:
        return
    # per-sample std of a two-point variable with gap (hi - lo) is at most (hi - lo) / 2
    tol = K * (hi - lo) / (2 * math.sqrt(N))
    assert abs(q.double().mean().item() - v) <= tol


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp4_e2m1", "bf16", "fp16"])
def test_values_below_the_smallest_subnormal_are_unbiased(name: str) -> None:
    f = get(name)
    for frac in (0.3, 0.5, 0.9, 0.01):
        v = frac * f.min_subnormal
        q = quantize(torch.full((N,), v), f, "stochastic", seed=3)
        assert set(q.unique().tolist()) <= {0.0, f.min_subnormal}
        tol = K * f.min_subnormal / (2 * math.sqrt(N))
        assert abs(q.double().mean().item() - v) <= tol


def test_probability_of_rounding_up_equals_the_fraction() -> None:
    # 1 + k/8 of the way between 1 and 1.125 in fp8_e4m3 (spacing 1/8)
    for k in (1, 3, 4, 7):
        v = 1.0 + k / 64
        q = quantize(torch.full((N,), v), "fp8_e4m3", "stochastic", seed=k)
        p_up = (q == 1.125).double().mean().item()
        p = k / 8
        assert abs(p_up - p) <= K * math.sqrt(p * (1 - p) / N)


def test_same_seed_same_bits_different_seed_different_bits() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    for name in ("fp8_e4m3", "bf16", "int4", "fixed8_4"):
        a = quantize(x, name, "stochastic", seed=42)
        b = quantize(x, name, "stochastic", seed=42)
        c = quantize(x, name, "stochastic", seed=43)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        assert not torch.equal(a, c)


def test_seed_none_follows_torch_manual_seed() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    a = quantize(x, "fp8_e5m2", "stochastic")
    torch.manual_seed(5)
    b = quantize(x, "fp8_e5m2", "stochastic")
    assert torch.equal(a, b)


def test_hash_bits_are_uniform_and_seeds_are_not_shifted_streams() -> None:
    n = 1 << 16
    idx = torch.arange(n, dtype=torch.int64)
    keys = torch.tensor(_seed_keys(9), dtype=torch.int64)
    h = _hash32(idx, keys)
    assert int(h.min()) >= 0 and int(h.max()) < 2**32
    # each of the 32 bits is set about half the time (binomial sd = 128 at n = 65536)
    for bit in range(32):
        ones = int(((h >> bit) & 1).sum())
        assert abs(ones - n / 2) < 6 * 128, bit
    # low 8 bits: chi-square over 256 bins stays within a wide band
    counts = torch.bincount((h & 0xFF), minlength=256).double()
    chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
    assert 150 < chi2 < 400
    # another seed's stream is no shifted copy of this one
    other = _hash32(idx, torch.tensor(_seed_keys(10), dtype=torch.int64))
    common = len(set(h.tolist()) & set(other.tolist()))
    assert common < 10  # two independent 2^16 draws from 2^32 share ~1 value


def test_fixed_point_stochastic_is_unbiased() -> None:
    f = get("fixed8_4")  # step 1/16
    for v in (0.03, -1.51, 2.2, 7.9):
        q = quantize(torch.full((N,), v), f, "stochastic", seed=8)
        lo, hi = math.floor(v * 16) / 16, math.ceil(v * 16) / 16
        assert set(q.unique().tolist()) <= {lo, hi}
        assert abs(q.double().mean().item() - v) <= K * (1 / 16) / (2 * math.sqrt(N))
    # saturation at the range limit still applies
    assert quantize(torch.tensor([100.0]), f, "stochastic", seed=1).item() == 127 / 16
