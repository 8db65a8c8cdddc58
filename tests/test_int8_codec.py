"""The C int8 codec (adaprec.formats.int8_codec) against the eager pack and unpack, bit for bit.

Oracle: adaprec.formats.storage's eager rule (``_encode_eager`` / ``_decode_eager``), itself tested against
torch's casts and ml-dtypes in test_storage_formats; the values of an unpack against torch's own bf16 cast.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from adaprec.formats import int8_codec
from adaprec.formats import storage as S

pytestmark = pytest.mark.skipif(not int8_codec.available()[0], reason="no C compiler here")


def _eager(x: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = S.storage_format(spec)
    g = S._grouped(x.float(), fmt)
    codes, scales = S._encode(g, 127.0, S._scale_cap(127.0, False), False, torch.int8, True, True, -128.0)
    return codes.reshape(-1), scales.reshape(-1)


def _eager_values(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    y = S._decode(codes, scales, False, -128.0)
    return y.reshape(-1)[: x.numel()].view(x.shape).to(x.dtype)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 700), spec=st.sampled_from(["int8/block256", "int8/row",
                                                                                "int8/block32", "int8/block4096"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e30]),
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_codes_scales_and_values_equal_the_eager_rule(rows, cols, spec, dtype, scale, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    x[0, 0] = 0.0
    if transposed:
        x = x.t()  # a strided view: the codec packs a contiguous copy, as the eager rule's reshape does
    fmt = S.storage_format(spec)
    got = int8_codec.encode(x, fmt)
    assert got is not None
    codes, scales = _eager(x, spec)
    assert torch.equal(got.codes.reshape(-1), codes) and torch.equal(got.scales, scales)
    values = int8_codec.decode(got)
    assert values.dtype == x.dtype and values.shape == x.shape
    assert torch.equal(values, _eager_values(codes, scales, x))


def test_every_bf16_value_round_trips_like_the_eager_rule():
    """All 65,536 bf16 bit patterns that are finite, in blocks of 256: one block per high byte."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.bfloat16)
    x = x[torch.isfinite(x.float())]
    fmt = S.storage_format("int8/block256")
    got = int8_codec.encode(x, fmt)
    codes, scales = _eager(x, "int8/block256")
    assert torch.equal(got.codes, codes) and torch.equal(got.scales, scales)
    assert torch.equal(int8_codec.decode(got), _eager_values(codes, scales, x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_is_left_to_the_general_rule(bad):
    x = torch.randn(3, 300)
    x[1, 7] = bad
    fmt = S.storage_format("int8/block256")
    assert int8_codec.encode(x, fmt) is None
    p = S.pack(x, fmt)  # the general rule: NaN's code, the block scale from the finite values
    y = S.unpack(p)  # decoded by the codec: the NaN code comes back NaN
    assert torch.isnan(y[1, 7]) and torch.isfinite(y[0]).all()
    torch.testing.assert_close(y[0], x[0], atol=float(x[0].abs().max()) / 127, rtol=0)


def test_pack_and_unpack_take_the_codec_and_give_what_the_eager_path_gives():
    x = torch.randn(4, 8, 512, 64).to(torch.bfloat16)
    fmt = S.storage_format("int8/block256")
    p = S.pack(x, fmt)
    codes, scales = _eager(x, "int8/block256")
    assert torch.equal(p.codes, codes) and torch.equal(p.scales, scales)
    assert torch.equal(S.unpack(p), _eager_values(codes, scales, x))


def test_large_tensors_split_between_threads_give_the_same_codes(monkeypatch):
    x = torch.randn(3 * (1 << 18) + 17)
    fmt = S.storage_format("int8/block256")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    threaded = int8_codec.encode(x, fmt)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    single = int8_codec.encode(x, fmt)
    assert torch.equal(threaded.codes, single.codes) and torch.equal(threaded.scales, single.scales)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert torch.equal(int8_codec.decode(threaded), int8_codec.decode(single))


def test_what_it_does_not_take():
    fmt = S.storage_format("int8/block256")
    assert not int8_codec.applies(torch.randn(8, 8, dtype=torch.float16), fmt)
    assert not int8_codec.applies(torch.randn(8, 8), S.storage_format("fp8_e4m3"))
    assert not int8_codec.applies(torch.randn(8, 8), S.storage_format("int8/block256/sqrt"))
    assert not int8_codec.applies(torch.empty(0), fmt)
    assert int8_codec.applies(torch.randn(8, 8), fmt)
