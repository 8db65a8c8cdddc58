"""The ``saved`` role is chosen from the storage format's own round-trip error, measured on whole blocks.

Oracle: the numpy reference of every storage format (``test_storage_formats.oracle``: absmax per
block, float32 division, ``np.rint``, ml_dtypes codes), applied to the same tensor.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adaprec
from _train import FAST_INT8_BF16
from adaprec.experiments.tasks import get_task
from adaprec.monitor.stats import finish, stats_from_sums
from adaprec.monitor.storage_error import prepare_storage
from test_storage_formats import oracle

SPECS = ("int8/block256", "fp8_e4m3/block256", "bf16")


def _measured(x: torch.Tensor) -> dict[str, float]:
    p = prepare_storage(x, SPECS)
    sums = finish([p])[0].tolist()
    return stats_from_sums(p.formats, p.scalings, p.formats[0], float(p.amax), sums).sqnr_db


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), width=st.sampled_from([256, 512, 1024]), exp=st.integers(-20, 20),
       outliers=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_the_measured_sqnr_is_the_storage_round_trips_own(rows, width, exp, outliers, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * 2.0**exp
    idx = torch.randint(0, x.numel(), (outliers,), generator=g)
    x.view(-1)[idx] *= 100.0  # a few large values, as activations have: block scales keep the rest precise
    measured = _measured(x)  # whole tensor sampled (at most 4096 elements): the same blocks as the storage's
    xs = x.numpy().astype(np.float64)
    for spec in SPECS:
        err = ((xs - oracle(x, spec).astype(np.float64)) ** 2).sum()
        want = math.inf if err == 0 else 10 * math.log10((xs**2).sum() / err)
        if want == math.inf:
            assert measured[spec] == math.inf, spec
        else:
            assert abs(measured[spec] - want) < 1e-6, (spec, measured[spec], want)


def test_error_budget_keeps_block_int8_where_the_per_tensor_proxy_would_refuse_it():
    """On the char transformer, the saved tensors go to int8 blocks after warm-up where their round trip keeps
    30 dB, including modules whose activation's per-tensor int8 SQNR is under 30 dB (kept bf16 before)."""
    task = get_task("char-transformer")
    model = task.make_model(0)
    opt = task.make_optimizer(model)
    ap = adaprec.AdaptivePrecision(model, opt, {"name": "error-budget", "warmup_steps": 2, "patience": 1,
                                                "storage": "narrow"}, hardware=FAST_INT8_BF16, monitor_every=2)
    snaps = []
    take = ap.monitor.snapshot
    ap.monitor.snapshot = lambda *a, **k: snaps.append(take(*a, **k)) or snaps[-1]  # keep what the policy read
    for x, y in itertools.islice(task.train_loader(0), 8):
        opt.zero_grad(set_to_none=True)
        with ap.autocast():
            loss = task.loss_fn(model(x), y)
        ap.backward(loss)
        ap.step()
    snap = next(s for s in reversed(snaps) if s.modules)
    saved = {m: ap.plan.get(m).saved for m in ap.plan.modules if m not in ap.plan.pinned}
    assert saved and "int8/block256" in saved.values(), saved
    proxy_refused = []
    for m, spec in saved.items():
        block = snap.stats(m, "saved").sqnr_db
        per_tensor = snap.stats(m, "activation").sqnr_db["int8"]
        assert (spec == "int8/block256") == (block["int8/block256"] >= 30.0), (m, spec, block)
        if spec == "int8/block256" and per_tensor < 30.0:
            proxy_refused.append(m)
    assert proxy_refused, "no module that the per-tensor proxy would have kept in bf16"
