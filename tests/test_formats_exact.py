"""quantize(..., "nearest") against torch's casts bit for bit, and the rounding laws for every format."""

from __future__ import annotations

import contextlib
import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _format_oracle import nearest
from adaprec.errors import RoundingError
from adaprec.formats import compiled, get, names, quantize, quantize_each

qmod = importlib.import_module("adaprec.formats.quantize")  # the module, not the function it exports

NATIVE = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
# every registered format plus spellings that register on first use
ALL_FORMATS = sorted(set(names()) | {"e3m4", "e5m3", "fixed8_4", "fixed12_10", "tf32"})

bit_patterns = st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=300)
specials = [0.0, -0.0, math.inf, -math.inf, math.nan, 2.0**-149, -(2.0**-149), 3.4e38, 1e-45, 448.0, 464.0,
            465.0, 65504.0, 65520.0, 57344.0, 61440.0, 2.0**-10, 2.0**-17, 2.0**-25, 2.0**-24]


@contextlib.contextmanager
def _fast_path(on: bool):
    """Switch the eager native-cast shortcut, so the bit kernel itself is tested against torch."""
    old = qmod.NATIVE_FAST_PATH
    qmod.NATIVE_FAST_PATH = on
    try:
        yield
    finally:
        qmod.NATIVE_FAST_PATH = old


def _from_bits(values: list[int]) -> torch.Tensor:
    return torch.tensor([v - 2**32 if v >= 2**31 else v for v in values], dtype=torch.int32).view(torch.float32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that any NaN equals any NaN (payloads are not specified)."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | both_nan).all())


@pytest.mark.parametrize("name", list(NATIVE))
@settings(max_examples=60, deadline=None)
@given(patterns=bit_patterns)
def test_nearest_matches_torch_cast_bit_for_bit(name: str, patterns: list[int]) -> None:
    x = torch.cat([_from_bits(patterns), torch.tensor(specials), -torch.tensor(specials)])
    with _fast_path(False):
        assert _same_bits(quantize(x, name), x.to(NATIVE[name]).to(torch.float32))


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("name", list(NATIVE))
def test_nearest_matches_torch_cast_on_a_million_patterns(name: str, fast: bool) -> None:
    g = torch.Generator().manual_seed(1234)
    x = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    x = x.view(torch.float32)
    with _fast_path(fast):
        assert _same_bits(quantize(x, name), x.to(NATIVE[name]).to(torch.float32))
        for sat in (True, False):  # the shortcut must follow the overflow rules too
            with _fast_path(False):
                kernel = quantize(x, name, saturate=sat)
            assert _same_bits(quantize(x, name, saturate=sat), kernel)


def test_e4m3_default_saturates_like_torch() -> None:
    x = torch.tensor([math.inf, -math.inf, 1e30, 500.0])
    assert quantize(x, "fp8_e4m3").tolist() == [448.0, -448.0, 448.0, 448.0]
    assert x.to(torch.float8_e4m3fn).float().tolist() == [448.0, -448.0, 448.0, 448.0]


@pytest.mark.parametrize("name", ALL_FORMATS)
@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64))
def test_nearest_matches_the_python_oracle(name: str, values: list[float]) -> None:
    f = get(name)
    x = torch.tensor(values + specials, dtype=torch.float32)
    with _fast_path(False):
        got = quantize(x, f)
    want = torch.tensor([nearest(v, f) for v in x.tolist()], dtype=torch.float32)
    assert _same_bits(got, want), [(a, b, c) for a, b, c in zip(x.tolist(), got.tolist(), want.tolist(), strict=True) if a == a and b != c][:5]


@pytest.mark.parametrize("name", ALL_FORMATS)
@settings(max_examples=25, deadline=None)
@given(patterns=bit_patterns)
def test_rounding_laws_for_every_format(name: str, patterns: list[int]) -> None:
    x = _from_bits(patterns)
    x = torch.cat([x, torch.tensor(specials)])
    x = x[~torch.isnan(x)]
    for sat in (None, True):
        q = quantize(x, name, saturate=sat)
        # idempotent: representable values stay put
        assert _same_bits(quantize(q, name, saturate=sat), q)
        # sign symmetric, including the sign of zero
        assert _same_bits(quantize(-x, name, saturate=sat), -q)
        # monotone: sorting the input sorts the output
        xs, _ = torch.sort(x)
        qs = quantize(xs, name, saturate=sat)
        assert bool((qs[1:] >= qs[:-1]).all())


@pytest.mark.parametrize(
    "name, big, none, true, false",
    [
        ("fp16", 1e6, math.inf, 65504.0, math.inf),
        ("bf16", math.inf, math.inf, get("bf16").max_finite, math.inf),
        ("fp8_e5m2", 1e6, math.inf, 57344.0, math.inf),
        ("fp8_e4m3", 1e6, 448.0, 448.0, math.nan),
        ("fp6_e3m2", 100.0, 28.0, 28.0, math.nan),
        ("fp4_e2m1", math.inf, 6.0, 6.0, math.nan),
        ("int8", 1000.0, 127.0, 127.0, math.nan),
    ],
)
def test_saturate_semantics(name: str, big: float, none: float, true: float, false: float) -> None:
    x = torch.tensor([big, -big])
    for sat, want in ((None, none), (True, true), (False, false)):
        got = quantize(x, name, saturate=sat)
        if math.isnan(want):
            assert torch.isnan(got).all()
        else:
            assert got.tolist() == [want, -want]
    # in-range values never change with the overflow rule
    y = torch.tensor([0.75, -1.5, 3.0])
    assert torch.equal(quantize(y, name, saturate=False), quantize(y, name, saturate=True))


def test_nan_stays_nan_and_shape_dtype_kept() -> None:
    x = torch.tensor([[math.nan, 1.0], [2.0, -math.nan]], dtype=torch.float16)
    for name in ("fp4_e2m1", "int4", "fp8_e4m3", "fp32"):
        q = quantize(x, name)
        assert q.dtype == torch.float32 and q.shape == x.shape
        assert torch.isnan(q).tolist() == [[True, False], [False, True]]
    assert quantize(torch.empty(0, 3), "bf16").shape == (0, 3)


def test_bad_arguments_raise_adaprec_errors() -> None:
    with pytest.raises(RoundingError, match="nearest"):
        quantize(torch.ones(2), "bf16", rounding="up")
    with pytest.raises(RoundingError, match="floating"):
        quantize(torch.ones(2, dtype=torch.int32), "bf16")
    with pytest.raises(RoundingError, match="seed"):
        quantize(torch.ones(2), "bf16", rounding="stochastic", seed=1.5)  # type: ignore[arg-type]


def test_compiled_path_gives_identical_bits() -> None:
    """One test for the compile path (it costs seconds): several formats, both modes, two shapes, two seeds."""
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-(2**31), 2**31 - 1, (50_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = torch.cat([x.view(torch.float32), torch.tensor(specials)])
    cases = [(f, r, s) for f in ("fp8_e4m3", "fp6_e3m2", "bf16", "fixed8_4") for r, s in
             (("nearest", None), ("stochastic", 11), ("stochastic", 12))]
    for name, rnd, seed in cases:
        for t in (x, x[:777].reshape(7, 111)):
            eager = quantize(t, name, rnd, seed=seed)
            with compiled():
                fused = quantize(t, name, rnd, seed=seed)
            assert fused.shape == t.shape
            assert _same_bits(eager, fused), (name, rnd, seed, t.shape)


@pytest.mark.parametrize("fast", [True, False])
@settings(max_examples=40, deadline=None)
@given(patterns=st.lists(st.integers(0, 2**32 - 1), min_size=len(ALL_FORMATS), max_size=len(ALL_FORMATS) * 40))
def test_quantize_each_equals_quantize_row_by_row(fast: bool, patterns: list[int]) -> None:
    """The monitor's batched rounding (one format per row) is quantize(..., saturate=True) on each row,
    with native casts for the formats torch has (fast) and with the bit kernels only."""
    cols = len(patterns) // len(ALL_FORMATS)
    x = _from_bits(patterns[: cols * len(ALL_FORMATS)])
    x = x.reshape(len(ALL_FORMATS), cols)
    x = torch.cat([x, torch.tensor(specials).expand(len(ALL_FORMATS), -1)], dim=1)
    with _fast_path(fast):
        got = quantize_each(x, ALL_FORMATS)
    for i, name in enumerate(ALL_FORMATS):
        assert _same_bits(got[i], quantize(x[i], name, saturate=True)), name
