"""The fused (torch.compile) pack and unpack of scaled storage formats give the eager path's bits."""

from __future__ import annotations

import pytest
import torch

from adaprec.formats import compiled
from adaprec.formats.storage import pack, unpack


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("spec", ["int8", "fp8_e4m3/block128", "uint8/sqrt"])
def test_compiled_pack_and_unpack_equal_eager_bit_for_bit(spec):
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 700), (64, 256), (5,)]:
        x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])
        if spec.startswith("uint8"):
            x = x.abs()
        x.view(-1)[1] = float("nan")
        x.view(-1)[2] = float("inf")
        eager = pack(x, spec)
        with compiled():
            fused = pack(x, spec)
            back = unpack(fused)
        # the codes' bytes (NaN codes compare unequal as floats)
        assert torch.equal(_raw(fused.codes), _raw(eager.codes)) and torch.equal(fused.scales, eager.scales)
        assert torch.equal(back.nan_to_num(nan=7.0), unpack(eager).nan_to_num(nan=7.0))
