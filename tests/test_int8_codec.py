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


def _codec(x: torch.Tensor, spec: str):
    fmt = S.storage_format(spec)
    group = x.shape[-1] if fmt.granularity == "row" else fmt.block_size
    return int8_codec.encode(x, group, 127.0, S._scale_cap(127.0, False)), group


def _codec_values(coded, group: int, x: torch.Tensor) -> torch.Tensor:
    return int8_codec.decode(coded[0], coded[1], x.shape, x.dtype, group, -128)


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
    got, group = _codec(x, spec)
    assert got is not None
    codes, scales = _eager(x, spec)
    assert torch.equal(got[0], codes) and torch.equal(got[1], scales)
    values = _codec_values(got, group, x)
    assert values.dtype == x.dtype and values.shape == x.shape
    assert torch.equal(values, _eager_values(codes, scales, x))


def test_every_bf16_value_round_trips_like_the_eager_rule():
    """All 65,536 bf16 bit patterns that are finite, in blocks of 256: one block per high byte."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.bfloat16)
    x = x[torch.isfinite(x.float())]
    got, group = _codec(x, "int8/block256")
    codes, scales = _eager(x, "int8/block256")
    assert torch.equal(got[0], codes) and torch.equal(got[1], scales)
    assert torch.equal(_codec_values(got, group, x), _eager_values(codes, scales, x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_is_left_to_the_general_rule(bad):
    x = torch.randn(3, 300)
    x[1, 7] = bad
    fmt = S.storage_format("int8/block256")
    assert _codec(x, "int8/block256")[0] is None
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
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    threaded, group = _codec(x, "int8/block256")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    single, _ = _codec(x, "int8/block256")
    assert torch.equal(threaded[0], single[0]) and torch.equal(threaded[1], single[1])
    one = _codec_values(single, group, x)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert torch.equal(_codec_values(threaded, group, x), one)


def test_what_it_does_not_take():
    assert not int8_codec.applies(torch.randn(8, 8, dtype=torch.float16))
    assert not int8_codec.applies(torch.empty(0))
    assert not int8_codec.applies(torch.tensor(1.0))
    assert int8_codec.applies(torch.randn(8, 8)) and int8_codec.applies(torch.randn(8, dtype=torch.bfloat16))
    for spec in ("fp8_e4m3", "int8/block256/sqrt", "uint8/block256", "int4/block128"):
        assert not S._codec_takes(torch.randn(8, 8), S.storage_format(spec))
    assert S._codec_takes(torch.randn(8, 8), S.storage_format("int8/row"))
