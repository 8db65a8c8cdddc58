"""The error a storage format's round trip puts into a tensor, measured with the real codes on whole blocks.

What autograd keeps for backward is stored block-scaled (``int8/block256``:
one absmax scale per 256 elements), and per-tensor scaled statistics
understate such storage by 10-20 dB on activations with outliers (measured on
the bench GPT: int8 per tensor 20-30 dB, block-scaled about 40 dB). So the
``saved`` role is measured here by packing a strided subset of whole blocks
of the tensor with :func:`adaprec.formats.storage.pack` and unpacking it:
the error is the storage's own, not a model of it.

The result is a :class:`~adaprec.monitor.stats.Pending` whose every format
row is precomputed, so the step's other samples and this one are measured,
pooled over calls and exchanged between ranks alike (keyed by storage spec).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adaprec.formats.storage import pack, storage_format, unpack
from adaprec.monitor.stats import MAX_SAMPLE, Pending, _amax_t, _sample_blocks

__all__ = ["prepare_storage"]


def prepare_storage(x: torch.Tensor, specs: Sequence[str], max_elems: int = MAX_SAMPLE) -> Pending:
    """Sample ``x`` in whole blocks and measure each storage spec's round trip on them (no host sync).

    The sample's blocks are as long as the largest block of ``specs`` (256 for
    the default ladder) and run along the last dimension, as the storage's
    blocks do where that dimension is a multiple of the block. Nonfinite
    values are zeroed first (they are the guard's business). Overflow is 0
    (absmax scales never saturate); underflow counts nonzero values stored
    as zero.
    """
    fmts = [storage_format(s, role="activation") for s in specs]
    block = max([f.block_size or 1 for f in fmts] + [1])
    with torch.no_grad():
        blocks = _sample_blocks(x.detach(), block, max_elems).to(torch.float32)  # sample, then widen: no full copy
        blocks = torch.where(torch.isfinite(blocks), blocks, torch.zeros_like(blocks))
        xs = blocks.reshape(-1)
        pending = Pending(xs, _amax_t(x.detach()), tuple(f.spec for f in fmts), ("block",) * len(fmts))
        x64 = xs.to(torch.float64)
        for i, f in enumerate(fmts):
            q = unpack(pack(xs, f)).reshape(-1)
            err = (x64 - q.to(torch.float64)).square().sum()
            under = ((q == 0) & (xs != 0)).sum().to(torch.float64)
            pending.block_rows[i] = torch.stack([err, torch.zeros_like(err), under])
        return pending
