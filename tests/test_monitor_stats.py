"""Monitor statistics against simple oracles."""

import math

import pytest
import torch

from adaprec import quantize
from adaprec.formats import get
from adaprec.monitor import candidate_scaling, evaluate, overflow_frac, pow2_scale, sqnr_db, underflow_frac
from adaprec.monitor.stats import MAX_SAMPLE, finish, measure, prepare
from adaprec.plan import TensorRecipe


def test_sqnr_of_known_noise_is_exact():
    x = torch.ones(1000)
    noise = torch.tensor([0.1, -0.1]).repeat(500)
    assert sqnr_db(x, x + noise) == pytest.approx(20.0, abs=1e-5)  # 10*log10(1 / 0.01)
    noise = torch.full((1000,), 0.5)
    assert sqnr_db(x, x + noise) == pytest.approx(10 * math.log10(4.0), abs=1e-5)


def test_sqnr_is_inf_when_exact():
    x = torch.randn(100)
    assert sqnr_db(x, x.clone()) == math.inf


def test_overflow_fraction_counts_values_beyond_max_finite():
    x = torch.tensor([1.0, 500.0, -1000.0, 2.0, 448.0, 449.0])  # e4m3 max is 448
    assert overflow_frac(x, "fp8_e4m3") == pytest.approx(3 / 6)
    # a scale of 1/4 brings all of them in range
    assert overflow_frac(x, "fp8_e4m3", scale=0.25) == 0.0


def test_underflow_fraction_counts_nonzero_values_flushed_to_zero():
    tiny = get("fp8_e4m3").min_subnormal  # 2^-9
    x = torch.tensor([tiny / 4, tiny, 0.0, 1.0])  # tiny/4 rounds to 0; 0 is not counted
    assert underflow_frac(x, "fp8_e4m3") == pytest.approx(1 / 3)


def test_pow2_scale_fits_amax_with_a_power_of_two():
    for amax in (3.0, 0.01, 700.0, 1e-6):
        for fmt in ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "int8"):
            s = float(pow2_scale(amax, fmt))
            mx = get(fmt).max_finite
            assert math.log2(s) == int(math.log2(s))
            assert amax * s <= mx < amax * 2 * s
    assert float(pow2_scale(0.0, "fp8_e4m3")) == 1.0


def test_evaluate_matches_direct_quantization_with_tensor_scale():
    torch.manual_seed(0)
    x = torch.randn(2000) * 3
    st = evaluate(
        x, TensorRecipe("fp8_e4m3", scaling="tensor"), candidates=("fp4_e2m1", "int8", "fp32"), max_elems=x.numel()
    )
    for fmt in ("fp8_e4m3", "fp4_e2m1", "int8"):
        s = pow2_scale(x.abs().max(), fmt)
        q = quantize(x * s, fmt, saturate=True) / s
        # the monitor squares errors in float32 (relative to the amax) and sums them in float32
        assert st.sqnr_db[fmt] == pytest.approx(sqnr_db(x, q), abs=1e-4)
        assert st.overflow_frac[fmt] == 0.0
        assert st.scaling[fmt] == "tensor"
    assert st.sqnr_db["fp32"] == math.inf
    assert st.amax == pytest.approx(float(x.abs().max()))
    assert st.current == "fp8_e4m3"
    # more mantissa bits, less noise
    assert st.sqnr_db["int8"] > st.sqnr_db["fp4_e2m1"]


def test_unscaled_current_format_reports_its_real_overflow():
    x = torch.linspace(-2000, 2000, 1001)
    st = evaluate(x, TensorRecipe("fp8_e4m3"), candidates=("fp8_e5m2", "bf16"))
    expected = float((x.abs() > 448).float().mean())
    assert st.overflow_frac["fp8_e4m3"] == pytest.approx(expected)
    assert st.scaling["fp8_e4m3"] == "none"
    # a candidate is measured with the scaling it would run under: no overflow
    assert st.scaling["fp8_e5m2"] == "tensor" and st.overflow_frac["fp8_e5m2"] == 0.0
    assert candidate_scaling("bf16", "tensor") == "none"


def test_large_tensors_are_sampled():
    x = torch.randn(100_000)
    st = evaluate(x, TensorRecipe("fp32"), candidates=("fp8_e4m3",), max_elems=4096)
    assert 0 < st.numel <= 4096
    assert st.amax == pytest.approx(float(x.abs().max()))  # amax is over the whole tensor


def test_block_scaling_helps_rows_of_very_different_magnitude():
    torch.manual_seed(1)
    x = torch.randn(8, 64)
    x[::2] *= 1e-4
    tensor = evaluate(x, TensorRecipe("fp4_e2m1", scaling="tensor"), candidates=())
    block = evaluate(x, TensorRecipe("fp4_e2m1", scaling="block", block_size=32), candidates=())
    assert block.underflow_frac["fp4_e2m1"] < tensor.underflow_frac["fp4_e2m1"] - 0.3
    assert block.scaling["fp4_e2m1"] == "block"


def test_nonfinite_values_do_not_poison_statistics():
    x = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    st = evaluate(x, TensorRecipe("bf16"), candidates=("fp8_e4m3",))
    assert st.amax == 2.0
    assert all(math.isfinite(v) or v == math.inf for v in st.sqnr_db.values())


def test_default_sample_estimates_the_whole_tensor_sqnr():
    """The strided default sample (MAX_SAMPLE elements) gives the SQNR of the whole tensor within 0.5 dB."""
    torch.manual_seed(3)
    x = torch.randn(64, 2048) * torch.rand(64, 1) * 5  # rows of different scale, like activations
    for fmt in ("int4", "int8", "fp8_e4m3", "fp8_e5m2", "bf16"):
        full = evaluate(x, TensorRecipe(fmt, scaling="tensor"), candidates=(), max_elems=x.numel())
        sampled = evaluate(x, TensorRecipe(fmt, scaling="tensor"), candidates=())
        assert sampled.numel == MAX_SAMPLE
        assert sampled.sqnr_db[fmt] == pytest.approx(full.sqnr_db[fmt], abs=0.5)


def test_batched_measurement_equals_one_tensor_at_a_time():
    """finish() over a step's samples gives each tensor the sums measure() gives it alone."""
    torch.manual_seed(4)
    cases = [
        (torch.randn(3000) * 7, TensorRecipe("int8", scaling="tensor"), ("int8", "int4", "fp8_e4m3", "bf16", "fp32")),
        (torch.randn(50) * 1e-30, TensorRecipe("bf16"), ("bf16", "fp8_e5m2", "fp16", "fp32")),
        (torch.randn(8, 64), TensorRecipe("fp8_e4m3", scaling="block", block_size=32), ("fp8_e4m3", "fp4_e2m1", "int6")),
        (torch.tensor([0.0, float("inf"), 1.0, -3.0]), TensorRecipe("fp32"), ("fp32", "fp6_e3m2", "tf32")),
        (torch.zeros(10), TensorRecipe("fp16"), ("fp16", "int8")),
    ]
    alone = [measure(x, r, f) for x, r, f in cases]
    batched = finish([prepare(x, r, f) for x, r, f in cases])
    for (_, sums, _), got in zip(alone, batched, strict=True):
        counts = [0, 1] + [i for i in range(3, sums.numel()) if (i - 3) % 3 != 0]
        assert torch.equal(got[counts], sums[counts])  # element, nonzero, overflow, underflow counts exactly
        # squared errors are float32 sums: the padded batch may add them in another order
        torch.testing.assert_close(got, sums, rtol=1e-6, atol=0.0)
