"""Storage formats (adaprec.formats.storage) against independent oracles.

The oracle is written here in numpy, sharing nothing with the module: per
group, the absmax of the finite values, an fp32 scale ``absmax / max_code``
(``1`` for an all-zero group), then numpy's float32 division and ``np.rint``
(round half to even) for integer codes, ``ml_dtypes`` for fp8 codes and
torch's own ``.to(bfloat16)`` / ``.to(float16)`` for the plain casts.
Codes and unpacked values must match bit for bit; on top, every format's
round trip stays within its own error bound, and ``nbytes`` is the bytes the
tensors really hold.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaprec.errors import AdaprecError, FormatSpecError, UnknownFormatError
from adaprec.formats.storage import (
    PackedTensor,
    pack,
    storage_bases,
    storage_format,
    storage_nbytes,
    unpack,
)

ml_dtypes = pytest.importorskip("ml_dtypes", minversion="0.5", reason="the fp8 oracle needs ml-dtypes")

SCALED = [
    "int8", "int8/row", "int8/tensor", "int8/block128", "int8/block7", "uint8", "uint8/sqrt",
    "int4", "int4/block32", "uint4/sqrt", "fp8_e4m3", "fp8_e4m3/row", "fp8_e5m2", "fp8_e5m2/block64/sqrt",
    "fp16/block256", "fp16/block256/sqrt", "int8/sqrt",
]
ALL = ["fp32", "bf16", "fp16", "bf16/sqrt", "fp16/sqrt", *SCALED]
_ML = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
_MAXCODE = {"int8": 127, "uint8": 254, "int4": 7, "uint4": 14, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0,
            "fp16": 65504.0}
_NP_TINY = np.finfo(np.float32).tiny


# ---------------------------------------------------------------- the oracle (numpy only)

def _sqrt(a: np.ndarray) -> np.ndarray:
    """sqrt(|a|) as torch computes it: torch's fp32 sqrt on CPU is not always correctly rounded
    (measured: 1 ulp off on about 20 % of inputs here), so the map's sqrt comes from torch and
    the oracle tests the quantization; the error-bound test checks the map itself."""
    return torch.from_numpy(np.array(np.abs(a), np.float32, copy=True)).sqrt().numpy()


def _cap(mc: np.float32, mapping: str) -> np.float32:
    """Largest float32 scale with max_code*scale finite (and its square, for the sqrt map)."""
    big = np.finfo(np.float32).max
    with np.errstate(over="ignore"):
        limit = np.float32(np.sqrt(np.float64(big))) if mapping == "sqrt" else big
        while not np.isfinite(limit * limit if mapping == "sqrt" else limit):
            limit = np.nextafter(limit, np.float32(0))
        cap = np.float32(limit / mc)
        while cap * mc > limit:
            cap = np.nextafter(cap, np.float32(0))
    return cap


def _groups(x: np.ndarray, fmt) -> tuple[np.ndarray, int]:
    n = x.size
    if fmt.granularity == "row":
        cols = x.shape[-1] if x.ndim else 1
        return x.reshape(-1, cols) if cols else x.reshape(0, 0), n
    flat = x.reshape(-1)
    if fmt.granularity == "tensor":
        return flat.reshape(1, n), n
    b = fmt.block_size
    return np.concatenate([flat, np.zeros(-n % b, np.float32)]).reshape(-1, b), n


def oracle(x: torch.Tensor, spec: str) -> np.ndarray:
    """The values pack/unpack must give back (float32, same shape), computed in numpy."""
    fmt = storage_format(spec)
    a = x.detach().float().numpy().astype(np.float32)
    if not fmt.scaled:
        v = a
        if fmt.mapping == "sqrt":
            v = np.where(a == 0, a, _sqrt(v) * np.sign(v)).astype(np.float32)  # keep the zero's sign
        with np.errstate(over="ignore"):
            c = torch.from_numpy(np.array(v, np.float32, copy=True)).to(fmt.code_dtype).float().numpy()
        if fmt.mapping == "sqrt":
            with np.errstate(over="ignore"):
                c = c * np.abs(c)
        return c
    g, n = _groups(a, fmt)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if fmt.mapping == "sqrt":
            g = np.where(g == 0, g, _sqrt(g) * np.sign(g)).astype(np.float32)
        fin = np.where(np.isfinite(g), np.abs(g), 0).astype(np.float32)
        amax = fin.max(axis=1, keepdims=True) if g.shape[1] else np.zeros((g.shape[0], 1), np.float32)
        mc = np.float32(_MAXCODE[fmt.base])
        scale = np.where(amax > 0, np.clip(amax / mc, _NP_TINY, _cap(mc, fmt.mapping)), 1).astype(np.float32)
        y = (g / scale).astype(np.float32)
        if fmt.kind == "int":
            q = np.clip(np.rint(y), -fmt.max_code if fmt.signed else 0, fmt.max_code)
            bad = ~np.isfinite(y) | ((y < 0) if not fmt.signed else False)
            deq = np.where(bad, np.nan, (q + 0.0).astype(np.float32) * scale)  # integer codes have no -0
        elif fmt.base == "fp16":
            deq = y.astype(np.float16).astype(np.float32) * scale
        else:
            yy = np.where(np.isinf(y), np.nan, y) if fmt.base == "fp8_e4m3" else y
            deq = yy.astype(_ML[fmt.base]).astype(np.float32) * scale
        deq = deq.astype(np.float32)
        if fmt.mapping == "sqrt":
            deq = deq * np.abs(deq)
    return deq.reshape(-1)[:n].reshape(a.shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float32 bit patterns, any NaN equal to any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
        return False
    na, nb = np.isnan(a), np.isnan(b)
    return bool((na == nb).all() and (a.view(np.uint32)[~na] == b.view(np.uint32)[~nb]).all())


def roundtrip(x: torch.Tensor, spec: str) -> torch.Tensor:
    p = pack(x, spec)
    y = unpack(p)
    assert y.shape == x.shape and y.dtype == x.dtype
    return y


# ---------------------------------------------------------------- strategies

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


@st.composite
def tensors(draw, specials: bool = False):
    shape = draw(shapes)
    n = math.prod(shape)
    elem = st.floats(width=32, allow_nan=specials, allow_infinity=specials) if specials else finite32
    vals = draw(st.lists(elem, min_size=n, max_size=n))
    scale = draw(st.sampled_from([1.0, 1e-30, 1e-8, 1e5, 1e30]))
    with np.errstate(over="ignore"):
        arr = (np.array(vals, np.float32) * np.float32(scale)).astype(np.float32)
    if not specials:  # the scaling may overflow: keep the values finite
        arr = np.nan_to_num(arr, posinf=np.finfo(np.float32).max, neginf=-np.finfo(np.float32).max)
    return torch.from_numpy(arr.reshape(shape))


# ---------------------------------------------------------------- bit-exact against the oracle

@pytest.mark.parametrize("spec", ALL)
@settings(max_examples=60, deadline=None)
@given(x=tensors(specials=True))
def test_matches_the_numpy_oracle_bit_for_bit(spec, x):
    fmt = storage_format(spec)
    if not fmt.signed:
        x = x.abs()
    assert same_bits(roundtrip(x, spec).numpy(), oracle(x, spec))


@pytest.mark.parametrize("spec", ["int8", "int8/row", "fp8_e4m3", "fp8_e5m2/tensor", "uint8/sqrt", "int4", "bf16"])
def test_matches_the_oracle_on_random_fp32_bit_patterns(spec):
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (64, 96), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    if not storage_format(spec).signed:
        x = x.abs()
    assert same_bits(roundtrip(x, spec).numpy(), oracle(x, spec))


# ---------------------------------------------------------------- exhaustive sweeps

@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_every_fp8_code_survives_pack_and_unpack(name):
    """All 256 codes in one block: its absmax is the format's max, so the scale is 1 and each code is kept."""
    vals = torch.arange(256, dtype=torch.uint8).view(storage_format(name).code_dtype).float()
    p = pack(vals, name)
    assert float(p.scales[0]) == 1.0
    got = unpack(p)
    ref = np.arange(256, dtype=np.uint8).view(_ML[name]).astype(np.float32)
    assert same_bits(got.numpy(), ref)
    finite = torch.isfinite(vals)  # and the bytes themselves, where the value has one code
    assert torch.equal(p.codes.view(torch.uint8)[finite], torch.arange(256, dtype=torch.uint8)[finite])


@pytest.mark.parametrize("name,lo,hi,nan", [("int8", -127, 127, -128), ("uint8", 0, 254, 255),
                                            ("int4", -7, 7, -8), ("uint4", 0, 14, 15)])
def test_every_integer_code_survives_pack_and_unpack(name, lo, hi, nan):
    vals = torch.arange(lo, hi + 1, dtype=torch.float32)
    p = pack(vals, f"{name}/block{2 * len(vals)}")
    assert float(p.scales[0]) == 1.0
    assert torch.equal(unpack(p), vals)
    # and the reserved code is NaN, never a value
    bad = pack(torch.tensor([float(hi), float("nan")]), f"{name}/block2")
    codes = bad.codes if storage_format(name).bits == 8 else bad.codes
    out = unpack(bad)
    assert out[0] == hi and math.isnan(out[1])
    if storage_format(name).bits == 8:
        assert int(codes[1]) == nan


# ---------------------------------------------------------------- error bounds, any shape

def _bound(x: torch.Tensor, spec: str) -> torch.Tensor:
    """Each element's allowed |error|, from the format's own rounding (not from the code under test)."""
    fmt = storage_format(spec)
    a = x.float().abs()
    if not fmt.scaled:
        rel = {"fp32": 0.0, "bf16": 2.0**-8, "fp16": 2.0**-11}[fmt.base]
        sub = {"fp32": 0.0, "bf16": 2.0**-134, "fp16": 2.0**-25}[fmt.base]  # half the smallest subnormal
        if fmt.mapping == "sqrt":  # (r(1+d))^2: relative 2d + d^2, and the subnormal step squared
            return a * (2 * rel + rel * rel) * 1.0001 + 2 * a.sqrt() * sub + sub * sub
        return a * rel + sub
    g, n = _groups(x.float().numpy(), fmt)
    g = np.where(np.isfinite(g), np.abs(g), 0)
    if fmt.mapping == "sqrt":
        g = np.sqrt(g)
    amax = g.max(axis=1, keepdims=True) if g.shape[1] else np.zeros((g.shape[0], 1))
    step = np.maximum(amax / _MAXCODE[fmt.base], _NP_TINY)
    if fmt.kind == "int":
        half = 0.5 * step * (1 + 2.0**-20) + np.abs(g) * 2.0**-22  # half a code, and the division's rounding
    else:
        mbits = {"fp8_e4m3": 3, "fp8_e5m2": 2, "fp16": 10}[fmt.base]
        sub = {"fp8_e4m3": 2.0**-9, "fp8_e5m2": 2.0**-16, "fp16": 2.0**-24}[fmt.base]
        half = (np.abs(g) * 2.0 ** -(mbits + 1) + sub * step) * (1 + 2.0**-20)
    half = np.broadcast_to(half, g.shape)
    if fmt.mapping == "sqrt":
        half = 2 * g * half + half * half
    return torch.from_numpy(np.ascontiguousarray(half).reshape(-1)[:n].reshape(x.shape).astype(np.float64))


@pytest.mark.parametrize("spec", ALL)
@settings(max_examples=60, deadline=None)
@given(x=tensors())
def test_round_trip_is_within_the_formats_error(spec, x):
    if not storage_format(spec).signed:
        x = x.abs()
    y = roundtrip(x, spec)
    err = (y.double() - x.double()).abs()
    fmt = storage_format(spec)
    finite = torch.ones_like(x, dtype=torch.bool)
    if not fmt.scaled:  # a plain cast overflows to inf where torch's own cast does
        finite = torch.isfinite(torch.as_tensor(oracle(x, spec)))
    assert torch.isfinite(y)[finite].all()  # a finite value never comes back inf or NaN (scaled codes)
    assert (err[finite] <= _bound(x, spec)[finite]).all()


def test_fp32_storage_is_the_tensor_itself_bit_for_bit():
    bits = torch.randint(-(2**31), 2**31 - 1, (1000,), dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)[::3]  # NaN payloads, -0, inf, subnormals, a strided view
    p = pack(x, "fp32")
    assert p.codes.data_ptr() == x.data_ptr()
    assert torch.equal(unpack(p).view(torch.int32), x.view(torch.int32))


@pytest.mark.parametrize("spec", ["bf16", "fp16"])
@settings(max_examples=100, deadline=None)
@given(x=tensors(specials=True))
def test_plain_casts_equal_torchs_own_cast(spec, x):
    dt = storage_format(spec).code_dtype
    assert same_bits(roundtrip(x, spec).numpy(), x.to(dt).float().numpy())


@pytest.mark.parametrize("spec", SCALED)
def test_zeros_stay_zero_with_no_nan(spec):
    for shape in [(0,), (3, 0), (0, 5), (), (1,), (300,), (4, 300)]:
        x = torch.zeros(shape)
        y = roundtrip(x, spec)
        assert torch.equal(y, x), (spec, shape)
        assert torch.isfinite(pack(x, spec).scales).all()


@pytest.mark.parametrize("spec", ALL)
def test_non_contiguous_input_packs_like_its_contiguous_copy(spec):
    x = torch.randn(40, 70, generator=torch.Generator().manual_seed(1))
    if not storage_format(spec).signed:
        x = x.abs()
    t = x.t()
    assert not t.is_contiguous()
    assert torch.equal(roundtrip(t, spec), roundtrip(t.contiguous(), spec))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("spec", ["int8", "fp8_e4m3", "bf16", "fp32"])
def test_unpack_gives_back_the_original_dtype(dtype, spec):
    x = torch.randn(5, 300).to(dtype)
    y = roundtrip(x, spec)
    assert torch.allclose(y.double(), x.double(), rtol=0.07, atol=0.05)


# ---------------------------------------------------------------- inf and NaN, defined

def _special_block(name):
    return torch.tensor([1.0, -2.0, float("nan"), float("inf"), -float("inf"), 0.5, 0.0, 3.0])


@pytest.mark.parametrize("spec,inf_kept", [("fp32", True), ("bf16", True), ("fp16", True), ("fp8_e5m2", True),
                                           ("fp16/block256", True), ("fp8_e4m3", False), ("int8", False),
                                           ("int8/row", False), ("int4", False)])
def test_inf_and_nan_are_kept_or_become_nan_never_a_number(spec, inf_kept):
    x = _special_block(spec)
    y = roundtrip(x, spec)
    assert math.isnan(y[2])
    if inf_kept:
        assert y[3] == math.inf and y[4] == -math.inf
    else:
        assert math.isnan(y[3]) and math.isnan(y[4])
    # the finite neighbours keep their scale: one inf does not wipe out its block
    finite = [0, 1, 5, 6, 7]
    assert torch.allclose(y[finite], x[finite], atol=3.0 / 14)


@pytest.mark.parametrize("spec", ["uint8", "uint4", "uint8/sqrt"])
def test_unsigned_codes_give_nan_for_negative_values(spec):
    y = roundtrip(torch.tensor([-1.0, 2.0, 0.0, -0.0]), spec)
    assert math.isnan(y[0]) and abs(float(y[1]) - 2.0) < 2 / 14 and y[2] == 0 and y[3] == 0


def test_a_block_of_tiny_values_comes_back_finite_within_half_the_smallest_scale():
    """The scale is at least float32's smallest normal (a subnormal divisor loses bits)."""
    x = torch.tensor([1e-40, -3e-41, 5e-45, 0.0, 2e-37])
    y = roundtrip(x, "int8")
    assert torch.isfinite(y).all()
    assert (y - x).abs().max() <= torch.finfo(torch.float32).tiny / 2


# ---------------------------------------------------------------- bytes

@pytest.mark.parametrize("spec", ALL)
@settings(max_examples=30, deadline=None)
@given(shape=shapes)
def test_nbytes_is_what_the_codes_and_scales_occupy(spec, shape):
    x = torch.rand(shape)
    p = pack(x, spec)
    real = p.codes.untyped_storage().nbytes() if not storage_format(spec).identity else x.numel() * 4
    if p.scales is not None:
        real += p.scales.untyped_storage().nbytes()
    assert p.nbytes == real
    last = shape[-1] if shape else None
    assert storage_nbytes(spec, x.numel(), last_dim=last) == p.nbytes


def test_nbytes_figures():
    n = 1 << 20
    assert storage_nbytes("fp32", n) == 4 * n
    assert storage_nbytes("bf16", n) == 2 * n
    assert storage_nbytes("int8", n) == n + 4 * n // 256
    assert storage_nbytes("fp8_e4m3/block128", n) == n + 4 * n // 128
    assert storage_nbytes("int4", n) == n // 2 + 4 * n // 128
    assert storage_nbytes("int8/row", 12, last_dim=4) == 12 + 3 * 4
    assert storage_nbytes("int8", 257) == 512 + 8  # the last block is padded


# ---------------------------------------------------------------- specs

def test_specs_parse_to_their_canonical_names():
    assert storage_format("int8").spec == "int8/block256"
    assert storage_format("INT8/Block256").spec == "int8/block256"
    assert storage_format("int4").spec == "int4/block128"
    assert storage_format("fp8_e4m3").spec == "fp8_e4m3/block256"
    assert storage_format("uint8/sqrt").spec == "uint8/block256/sqrt"
    assert storage_format("bf16").spec == "bf16" and not storage_format("bf16").scaled
    assert storage_format("int8/row").granularity == "row"
    assert storage_format(storage_format("int8")) is storage_format("int8")
    assert set(storage_bases()) >= {"fp32", "bf16", "fp16", "int8", "fp8_e4m3", "fp8_e5m2"}
    for spec in ALL:
        f = storage_format(spec)
        assert storage_format(f.spec) == f


@pytest.mark.parametrize("spec,err,words", [
    ("int9", UnknownFormatError, ["int8", "fp8_e4m3", "bf16"]),
    ("fp8", UnknownFormatError, ["fp8_e4m3", "fp8_e5m2"]),
    ("int4/tensor", FormatSpecError, ["block scales", "int4/block128"]),
    ("int4/row", FormatSpecError, ["block scales", "int4/block128"]),
    ("uint4/none", FormatSpecError, ["block scales"]),
    ("int8/block0", FormatSpecError, [">= 1", "int8/block256"]),
    ("int8/block-3", FormatSpecError, [">= 1"]),
    ("int8/blockx", FormatSpecError, [">= 1"]),
    ("int8/none", FormatSpecError, ["need a scale", "int8/block256"]),
    ("fp8_e4m3/none", FormatSpecError, ["need a scale"]),
    ("fp32/block64", FormatSpecError, ["plain 'fp32'"]),
    ("bf16/row", FormatSpecError, ["plain 'bf16'"]),
    ("fp32/sqrt", FormatSpecError, ["exactly"]),
    ("int4/block9", FormatSpecError, ["even", "int4/block10"]),
    ("int8/row/block64", FormatSpecError, ["two scale granularities"]),
    ("int8/sqrt/linear", FormatSpecError, ["two maps"]),
    ("int8/log", FormatSpecError, ["unknown modifier", "/sqrt"]),
])
def test_bad_specs_name_the_problem_and_the_fix(spec, err, words):
    with pytest.raises(err) as e:
        storage_format(spec)
    assert isinstance(e.value, AdaprecError)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_roles_add_their_rules():
    assert storage_format("int8", role="optimizer_state").spec == "int8/block256"
    assert storage_format("int8/tensor", role="activation").granularity == "tensor"
    with pytest.raises(FormatSpecError, match="int8/block256"):
        storage_format("int8/tensor", role="optimizer_state")
    with pytest.raises(FormatSpecError, match="roles"):
        storage_format("int8", role="weights")


def test_pack_refuses_integer_tensors():
    with pytest.raises(FormatSpecError, match="floating-point"):
        pack(torch.arange(4), "int8")


# ---------------------------------------------------------------- state views

@pytest.mark.parametrize("spec", ALL)
def test_state_views_are_integers_and_give_back_the_same_packed_tensor(spec):
    x = torch.randn(3, 300).abs()
    p = pack(x, spec)
    st_ = p.to_state()
    assert all(not t.is_floating_point() for t in st_.values())
    # what Optimizer.load_state_dict does to floating state: cast to the param dtype (here bf16)
    cast = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in st_.items()}
    q = PackedTensor.from_state(spec, pickle.loads(pickle.dumps(cast)), x.shape, x.dtype)
    assert same_bits(unpack(q).numpy(), unpack(p).numpy())
    assert q.nbytes == p.nbytes

