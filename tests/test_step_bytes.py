"""The controller's byte count: on only inside adaprec's calls, counted then replayed, priced in the ledger."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

import adaprec


def _setup(count_bytes: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = adaprec.AdaptivePrecision(model, opt, "fp32", count_bytes=count_bytes)
    return model, opt, ap


def _step(model, opt, ap, x, y):
    opt.zero_grad(set_to_none=True)
    with ap.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    assert _get_current_dispatch_mode_stack() == []  # the loop's own code runs with no mode of adaprec's
    ap.backward(loss)
    assert _get_current_dispatch_mode_stack() == []
    return ap.step()


def test_no_counting_mode_is_left_behind_by_a_loop_that_stops_half_way():
    model, opt, ap = _setup()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with ap.autocast():
        model(x)  # a counted forward; the loop stops here (an exception, a break): no backward, no step
    assert _get_current_dispatch_mode_stack() == []
    ap.close()
    model, opt, ap = _setup()
    with ap.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    with pytest.raises(RuntimeError):
        ap.backward(loss.detach())  # backward raises (no graph): the step is abandoned
    assert _get_current_dispatch_mode_stack() == []
    for _ in range(3):  # the next steps start afresh
        assert _step(model, opt, ap, x, y)
    assert _get_current_dispatch_mode_stack() == []


def test_counted_steps_then_replayed_ones_price_the_same_bytes():
    model, opt, ap = _setup()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    for _ in range(8):
        _step(model, opt, ap, x, y)
    rows = ap.energy.steps()
    sources = [r.get("bytes_source") for r in rows]
    assert "counted" in sources and "replayed" in sources
    steady = [r["bytes_moved"] for r in rows[3:]]
    assert len(set(steady)) == 1  # a step's bytes, counted or replayed, once the optimizer's state exists
    assert ap.energy.summary()["byte_coverage"] == 1.0
    _, _, off = _setup(count_bytes=False)
    assert off.bytes.enabled is False
