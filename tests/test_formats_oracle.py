"""quantize() against an independent oracle, ml-dtypes, bit for bit on every path.

ml-dtypes (the numpy dtypes behind JAX and XLA) rounds float32 to the OCP
formats in its own C++ code: it shares nothing with adaprec's bit kernel or
with torch's casts. Every nearest-rounding path of adaprec is compared with
it on float32 bit patterns (NaN equals any NaN):

- ``default``: ``quantize`` as a user calls it (a native torch cast where
  one gives the same bits, for E4M3/E5M2; the bit kernel otherwise);
- ``kernel``: the bit kernel forced (``NATIVE_FAST_PATH`` off);
- ``compiled``: the bit kernel fused by ``torch.compile`` (compiled once for the file);
- ``quantize_each``: the batched saturating kernel, with and without its native casts;

each with ``saturate=None``, ``True`` and ``False``, over random float32 bit
patterns and hypothesis floats and over an exhaustive sweep of every value of
each format, every midpoint between neighbours and the float32 neighbours of
both (``docs/formats.md`` gives the counts).

ml-dtypes has one overflow rule per type, adaprec three; the oracle maps them
explicitly (:func:`expected`), and ``test_documented_differences_from_ml_dtypes``
asserts each place where the two genuinely differ:

- E4M3FN: ml-dtypes never saturates (overflow and +-inf give NaN); that is
  adaprec's ``saturate=False``. adaprec's default saturates, as torch's cast does.
- E5M2: ml-dtypes overflows to inf, as adaprec's default and ``saturate=False``.
- FP6/FP4 (no inf, no NaN): ml-dtypes always saturates and turns NaN into a
  zero; adaprec keeps NaN (its output is float32) and, with ``saturate=False``,
  gives NaN where the value rounds beyond the largest finite value.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaprec.formats import compiled, get, quantize, quantize_each

# 0.5 is the first ml-dtypes with the MX types float6_e2m3fn, float6_e3m2fn and float4_e2m1fn
ml_dtypes = pytest.importorskip(
    "ml_dtypes", minversion="0.5", reason="the oracle needs ml-dtypes >= 0.5 (pip install -e '.[dev]')"
)
qmod = importlib.import_module("adaprec.formats.quantize")  # the module, not the function it exports

ORACLE = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}
FORMATS = list(ORACLE)
SATURATE = [None, True, False]
PATHS = ["default", "kernel", "compiled"]


# ---------------------------------------------------------------- the oracle


def _ml(x: np.ndarray, name: str) -> np.ndarray:
    """x (float32) through the ml-dtypes type and back to float32."""
    return x.astype(ORACLE[name]).astype(np.float32)


def _ml_has_inf(name: str) -> bool:
    return bool(np.isinf(_ml(np.array([np.inf], np.float32), name))[0])


def _ml_has_nan(name: str) -> bool:
    return bool(np.isnan(_ml(np.array([np.nan], np.float32), name))[0])


def _top_ulp(name: str) -> float:
    """Spacing of the format's values in its highest binade (from ml-dtypes' finfo)."""
    fi = ml_dtypes.finfo(ORACLE[name])
    return 2.0 ** (math.frexp(float(fi.max))[1] - 1 - fi.nmant)


def expected(x: np.ndarray, name: str, saturate: bool | None) -> np.ndarray:
    """What quantize(x, name, saturate=saturate) must give, from ml-dtypes and the documented rules.

    ``saturate=None`` follows the format: overflow to inf where it has inf, saturate where it has
    none. Saturating equals rounding the value clamped to +-max (rounding is monotonic). Without
    saturation ml-dtypes already gives inf (E5M2) or NaN (E4M3FN); for the formats without NaN
    ml-dtypes has no such mode, so the NaN adaprec documents is placed where the value rounds
    beyond max: from max + half a top ulp on (max's last mantissa bit is 1, so that tie goes up).
    """
    has_inf, has_nan = _ml_has_inf(name), _ml_has_nan(name)
    limit = np.float32(ml_dtypes.finfo(ORACLE[name]).max)
    sat = (not has_inf) if saturate is None else saturate
    with np.errstate(invalid="ignore"):
        if sat:
            y = _ml(np.clip(x, -limit, limit), name)  # np.clip keeps NaN
        else:
            y = _ml(x, name)
            if not has_nan:
                over = np.abs(x) >= np.float32(float(limit) + _top_ulp(name) / 2)
                y = np.where(over, np.float32(np.nan), y)
        if not has_nan:  # ml-dtypes turns NaN into a zero; adaprec keeps it
            y = np.where(np.isnan(x), x, y)
    return y.astype(np.float32)


# ---------------------------------------------------------------- adaprec's paths


@contextlib.contextmanager
def _fast_path(on: bool) -> Iterator[None]:
    old = qmod.NATIVE_FAST_PATH
    qmod.NATIVE_FAST_PATH = on
    try:
        yield
    finally:
        qmod.NATIVE_FAST_PATH = old


def run_path(path: str, x: np.ndarray, name: str, saturate: bool | None) -> np.ndarray:
    t = torch.from_numpy(x.copy())
    if path == "default":
        q = quantize(t, name, saturate=saturate)
    elif path == "kernel":
        with _fast_path(False):
            q = quantize(t, name, rounding="nearest", saturate=saturate)
    else:
        with compiled():
            q = quantize(t, name, saturate=saturate)
    assert q.dtype == torch.float32 and q.shape == t.shape
    return q.numpy()


def assert_same_bits(got: np.ndarray, want: np.ndarray, x: np.ndarray, what: str) -> None:
    both_nan = np.isnan(got) & np.isnan(want)
    bad = ~((got.view(np.uint32) == want.view(np.uint32)) | both_nan)
    if bad.any():
        i = np.flatnonzero(bad)[:8]
        rows = ", ".join(f"{x[j]!r} (0x{x.view(np.uint32)[j]:08x}) -> {got[j]!r}, want {want[j]!r}" for j in i)
        raise AssertionError(f"{what}: {int(bad.sum())} of {x.size} differ from ml-dtypes: {rows}")


# ---------------------------------------------------------------- the exhaustive sweep


def _f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32)


def _unique_bits(x: np.ndarray) -> np.ndarray:
    return np.unique(x.astype(np.float32).view(np.uint32)).view(np.float32)


def format_values(name: str) -> np.ndarray:
    """Every finite value of the format, both signs (from ml-dtypes, by decoding every code)."""
    dt = ORACLE[name]
    codes = np.arange(2 ** ml_dtypes.finfo(dt).bits, dtype=np.uint8).view(dt).astype(np.float32)
    return _unique_bits(codes[np.isfinite(codes)])


def sweep(name: str) -> np.ndarray:
    """Values, midpoints, the float32 neighbours of both, and the edges, both signs."""
    fi = ml_dtypes.finfo(ORACLE[name])
    mags = np.unique(np.abs(format_values(name)).astype(np.float64))  # 0 .. max, sorted
    top, ulp = float(fi.max), _top_ulp(name)
    mids = (mags[:-1] + mags[1:]) / 2  # exact in float32: one bit more than the format's
    edges = [
        float(fi.smallest_subnormal) / 2,  # the tie between 0 and min_sub (also a midpoint)
        float(fi.smallest_subnormal) / 4,
        2.0**-149,  # float32's smallest subnormal
        2.0**-126,  # float32's smallest normal
        top + ulp / 2,  # the overflow tie
        top + ulp,  # the first value of the unbounded format beyond max
        top + 1.5 * ulp,
        2 * top,
        2.0 ** (math.frexp(top)[1] + 1),
        1e30,
        float(np.finfo(np.float32).max),
    ]
    anchors = _f32(np.concatenate([mags, mids, edges]))
    with np.errstate(over="ignore"):  # float32 max steps up to inf, which is wanted
        up, down = np.nextafter(anchors, np.float32(np.inf)), np.nextafter(anchors, np.float32(-np.inf))
    near = np.concatenate([anchors, up, down])
    specials = _f32([np.inf, np.nan])
    full = np.concatenate([near, -near, specials, -specials])
    return _unique_bits(full)


SWEEPS = {name: sweep(name) for name in FORMATS}


def test_ml_dtypes_describes_the_same_formats() -> None:
    for name, dt in ORACLE.items():
        f, fi = get(name), ml_dtypes.finfo(dt)
        assert (f.max_finite, f.min_normal, f.min_subnormal) == (
            float(fi.max), float(fi.smallest_normal), float(fi.smallest_subnormal)
        ), name
        assert (f.mbits, f.ebits, f.bits) == (fi.nmant, fi.nexp, fi.bits), name
        assert f.has_inf == _ml_has_inf(name), name
        assert f.has_nan == _ml_has_nan(name), name


@pytest.mark.parametrize("name", FORMATS)
def test_sweep_covers_every_value_every_tie_and_the_edges(name: str) -> None:
    x, vals = SWEEPS[name], format_values(name)
    fi = ml_dtypes.finfo(ORACLE[name])
    got = set(x.view(np.uint32).tolist())
    assert set(vals.view(np.uint32).tolist()) <= got  # every value, +-0 included
    mags = np.unique(np.abs(vals).astype(np.float64))
    mids = _f32((mags[:-1] + mags[1:]) / 2)
    for m in (mids, -mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))):
        assert set(m.view(np.uint32).tolist()) <= got
    half_sub = np.float32(float(fi.smallest_subnormal) / 2)
    assert {half_sub, -half_sub, np.float32(np.inf), np.float32(-np.inf)} <= set(x[~np.isnan(x)].tolist())
    assert np.isnan(x).sum() == 2 and (np.abs(x[np.isfinite(x)]) > float(fi.max)).any()
    # the sweep reaches every value of the format as a result, too
    assert set(vals.view(np.uint32).tolist()) <= set(expected(x, name, True).view(np.uint32).tolist())


@pytest.mark.parametrize("saturate", SATURATE)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", FORMATS)
def test_exhaustive_sweep_matches_ml_dtypes(name: str, path: str, saturate: bool | None) -> None:
    x = SWEEPS[name]
    got = run_path(path, x, name, saturate)
    assert_same_bits(got, expected(x, name, saturate), x, f"{name} {path} saturate={saturate}")


@pytest.mark.parametrize("fast", [True, False])
def test_exhaustive_sweep_quantize_each_matches_ml_dtypes(fast: bool) -> None:
    """Every row sees the union of all sweeps; quantize_each saturates, as saturate=True."""
    x = _unique_bits(np.concatenate(list(SWEEPS.values())))
    names = FORMATS + FORMATS[::-1]  # repeated formats share a group
    with _fast_path(fast):
        q = quantize_each(torch.from_numpy(np.tile(x, (len(names), 1))), names).numpy()
    for row, name in enumerate(names):
        assert_same_bits(q[row], expected(x, name, True), x, f"quantize_each row {row} {name} fast={fast}")


# ---------------------------------------------------------------- random patterns


def _patterns_to_f32(patterns: list[int]) -> np.ndarray:
    return np.array(patterns, dtype=np.uint32).view(np.float32)


# padding keeps every compiled call 1-D with more than one element (a size-1 call would recompile)
_PAD = _f32([0.0, -0.0, 1.5, 0.75, 0.1875, 0.0029296875])
_random_inputs = st.tuples(
    st.lists(st.integers(0, 2**32 - 1), max_size=200),
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True), max_size=100),
)


@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=40, deadline=None)
@given(data=_random_inputs)
def test_random_patterns_match_ml_dtypes_on_every_path(name: str, data: tuple[list[int], list[float]]) -> None:
    x = np.concatenate([_patterns_to_f32(data[0]), _f32(data[1]), _PAD])
    for saturate in SATURATE:
        want = expected(x, name, saturate)
        for path in PATHS:
            assert_same_bits(run_path(path, x, name, saturate), want, x, f"{name} {path} saturate={saturate}")


@settings(max_examples=40, deadline=None)
@given(data=_random_inputs, fast=st.booleans())
def test_random_patterns_quantize_each_matches_ml_dtypes(data: tuple[list[int], list[float]], fast: bool) -> None:
    x = np.concatenate([_patterns_to_f32(data[0]), _f32(data[1]), _PAD])
    with _fast_path(fast):
        q = quantize_each(torch.from_numpy(np.tile(x, (len(FORMATS), 1))), FORMATS).numpy()
    for row, name in enumerate(FORMATS):
        assert_same_bits(q[row], expected(x, name, True), x, f"quantize_each {name} fast={fast}")


def test_a_million_random_patterns_match_ml_dtypes() -> None:
    x = np.random.default_rng(11).integers(0, 2**32, size=1 << 20, dtype=np.uint32).view(np.float32)
    for name in FORMATS:
        for saturate in SATURATE:
            want = expected(x, name, saturate)
            for path in ("default", "kernel"):
                assert_same_bits(run_path(path, x, name, saturate), want, x, f"{name} {path} saturate={saturate}")


# ---------------------------------------------------------------- the examples


def test_ties_at_one_and_a_half_min_subnormal_round_to_even() -> None:
    """Issue 11: the tie between min_sub and 2 min_sub goes to 2 min_sub (even significand)."""
    assert quantize(torch.tensor([0.0029296875]), "fp8_e4m3", saturate=False).item() == 0.00390625
    assert quantize(torch.tensor([0.75]), "fp4_e2m1").item() == 1.0
    assert quantize(torch.tensor([0.1875]), "fp6_e2m3").item() == 0.25
    for name, tie in (("fp8_e4m3", 0.0029296875), ("fp4_e2m1", 0.75), ("fp6_e2m3", 0.1875), ("fp6_e3m2", 0.09375)):
        x = torch.tensor([tie, -tie, 3 * tie, -3 * tie])  # 3 tie = 4.5 min_sub: down to 4 min_sub
        ms = get(name).min_subnormal
        want = [2 * ms, -2 * ms, 4 * ms, -4 * ms]
        for saturate in SATURATE:
            assert quantize(x, name, saturate=saturate).tolist() == want
            with _fast_path(False):
                assert quantize(x, name, saturate=saturate).tolist() == want
            with compiled():
                assert quantize(x, name, saturate=saturate).tolist() == want
        assert quantize_each(x.expand(2, 4), [name, name]).tolist() == [want, want]


def test_exm0_ties_round_up_like_ml_dtypes_e8m0() -> None:
    """With no mantissa bits every binade is a shift-23 binade: 1.5 * 2^k ties to 2^(k+1).

    adaprec's ``e8m0`` is IEEE-style (zero, inf, NaN; smallest value 2^-126); ml-dtypes'
    ``float8_e8m0fnu`` (the MX scale type) has no zero, no inf and a smallest value 2^-127.
    On [2^-126, 2^127] they are the same set and round the same way.
    """
    e8m0fnu = getattr(ml_dtypes, "float8_e8m0fnu", None)
    if e8m0fnu is None:
        pytest.skip("this ml-dtypes has no float8_e8m0fnu")
    k = np.arange(-126, 127, dtype=np.float64)
    anchors = _f32(np.concatenate([2.0**k, 1.5 * 2.0**k, [2.0**127]]))
    x = np.concatenate([anchors, np.nextafter(anchors, np.float32(0)), np.nextafter(anchors, np.float32(np.inf))])
    x = x[(x >= 2.0**-126) & (x <= 2.0**127)]
    want = x.astype(e8m0fnu).astype(np.float32)
    for path in PATHS:
        assert_same_bits(run_path(path, x, "e8m0", None), want, x, f"e8m0 {path}")
    assert quantize(torch.tensor([1.5, 3.0, 6.0, 2.0**-127, 1.5 * 2.0**-127]), "e8m0").tolist() == [
        2.0, 4.0, 8.0, 0.0, 2.0**-126
    ]


# ---------------------------------------------------------------- where the semantics differ


def test_documented_differences_from_ml_dtypes() -> None:
    big = _f32([np.inf, -np.inf, 1e30, -1e30])
    nan = _f32([np.nan])
    # E4M3FN: ml-dtypes is non-saturating (NaN); adaprec saturates unless saturate=False, as torch does
    assert np.isnan(_ml(big, "fp8_e4m3")).all()
    for saturate in (None, True):
        assert quantize(torch.from_numpy(big), "fp8_e4m3", saturate=saturate).tolist() == [448, -448, 448, -448]
    assert torch.from_numpy(big).to(torch.float8_e4m3fn).float().tolist() == [448, -448, 448, -448]
    assert quantize(torch.from_numpy(big), "fp8_e4m3", saturate=False).isnan().all()
    assert quantize(torch.tensor([464.0, 464.01]), "fp8_e4m3", saturate=False)[0] == 448  # the tie goes down
    # E5M2: the same overflow to inf; saturate=True clamps (inf too), which ml-dtypes cannot
    assert _ml(big, "fp8_e5m2").tolist() == [np.inf, -np.inf, np.inf, -np.inf]
    assert quantize(torch.from_numpy(big), "fp8_e5m2", saturate=True).tolist() == [57344, -57344, 57344, -57344]
    for name in ("fp6_e2m3", "fp6_e3m2", "fp4_e2m1"):
        limit = get(name).max_finite
        # ml-dtypes saturates always and maps NaN to a zero; adaprec keeps NaN ...
        assert _ml(big, name).tolist() == [limit, -limit, limit, -limit]
        assert _ml(nan, name)[0] == 0
        assert quantize(torch.from_numpy(nan), name).isnan().all()
        # ... and gives NaN with saturate=False from the overflow tie on (max's last bit is odd)
        tie = np.float32(limit + _top_ulp(name) / 2)
        below = np.nextafter(tie, np.float32(0))
        q = quantize(torch.from_numpy(_f32([tie, below, -tie, math.inf])), name, saturate=False)
        assert q.isnan().tolist() == [True, False, True, True]
        assert _ml(_f32([tie]), name)[0] == limit


def test_fixed_point_is_symmetric_and_rounds_unlike_ml_dtypes_int4() -> None:
    """ml-dtypes' int4 spans [-8, 7] and its float cast truncates toward zero (a C cast); adaprec's
    intN spans [-(2^(N-1)-1), 2^(N-1)-1], rounds half to even and saturates (or NaN). ml-dtypes is an
    oracle only where a C cast is defined: values inside its range. Out of range (9.0, say) the cast is
    undefined behaviour (0.6 wrapped 9.0 to -7, 0.7 gives 0 with a warning), so nothing is asserted there."""
    assert (int(ml_dtypes.iinfo(ml_dtypes.int4).min), int(ml_dtypes.iinfo(ml_dtypes.int4).max)) == (-8, 7)
    # every integer both formats hold comes through both unchanged
    shared = _f32(list(range(-7, 8)))
    assert _ml_int4(shared).tolist() == shared.tolist()
    assert quantize(torch.from_numpy(shared), "int4").tolist() == shared.tolist()
    # in range, ml-dtypes truncates toward zero; adaprec rounds to nearest, ties to even
    x = _f32([-8.0, -2.7, -2.5, 2.5, 2.7, 3.5, 6.9])
    assert _ml_int4(x).tolist() == [-8.0, -2.0, -2.0, 2.0, 2.0, 3.0, 6.0]
    assert quantize(torch.from_numpy(x), "int4").tolist() == [-7.0, -3.0, -2.0, 2.0, 3.0, 4.0, 7.0]
    # adaprec's own range: -8 and 9 saturate to -7 and 7, or become NaN without saturation
    edges = _f32([-8.0, 7.0, 9.0])
    assert quantize(torch.from_numpy(edges), "int4").tolist() == [-7.0, 7.0, 7.0]
    assert quantize(torch.from_numpy(edges), "int4", saturate=False).isnan().tolist() == [True, False, True]


def _ml_int4(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.int4).astype(np.float32)
