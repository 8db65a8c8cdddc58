"""The controller narrows a module only where its own GEMM shapes pay, and a resume decides the same untimed.

Shapes are timed only under ``hardware="auto"``: a device report the caller gives is trusted as it is.
"""

from __future__ import annotations

import functools
import io
import warnings

import torch
from torch import nn

import adaprec
from _train import FAST_INT8_BF16, train_random
from adaprec.controller import setup as setup_mod
from adaprec.hardware import shapes


def _timer(run: shapes.GemmRun, number: int) -> float:
    """No clock: int8 (4x) and bf16 (3x) pay at the big layer's GEMMs and lose (0.5x) at the small layer's."""
    t32 = run.shape.macs * 1e-9
    if run.format == "fp32":
        return t32
    return t32 / ((4.0 if run.format == "int8" else 3.0) if run.shape.macs > 1e6 else 0.5)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 4))  # 64 rows: 2.1 M vs 131 k MACs


def _train(ap, model, opt, steps):
    train_random(ap, model, opt, steps, rows=64)


def _controller(model, tmp_path):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the speed check off: this test is about the shape measurement (tests/test_speed_check.py times steps)
        ap = adaprec.AdaptivePrecision(model, opt, {"name": "error-budget", "speed_check": False}, total_steps=30,
                                       monitor_every=2, count_bytes=False)
    return ap, opt


def test_a_module_whose_shapes_do_not_pay_stays_fp32(tmp_path, monkeypatch):
    # hardware="auto": the probe (fixed here: int8 and bf16 fast) and then this device's shapes, timed
    monkeypatch.setattr(setup_mod, "probe", lambda device: FAST_INT8_BF16)
    monkeypatch.setattr(setup_mod, "measure_gemms", functools.partial(shapes.measure_gemms, timer=_timer,
                                                                      cache_dir=tmp_path))
    model = _model()
    ap, opt = _controller(model, tmp_path)
    _train(ap, model, opt, 30)
    allowed, _ = ap.allowed_formats()
    assert {"int8", "bf16"} <= allowed["0"]  # the big layer: narrow formats pay at its shapes
    assert allowed["2"] == frozenset({"fp32"})  # the small one: they do not, so it is never narrowed
    assert ap.plan.get("2").weight.format == "fp32" and ap.plan.get("0").weight.format != "fp32"
    assert "2" in ap.setup.widened and "do not pay" in ap.report()
    # replay: a resumed controller decides from the saved measurements, without timing anything
    buf = io.BytesIO()
    torch.save({"ap": ap.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)

    def no_timing(*a, **k):
        raise AssertionError("measured again although the table was saved")

    monkeypatch.setattr(setup_mod, "measure_gemms", no_timing)
    model2 = _model()
    ap2, opt2 = _controller(model2, tmp_path)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    ap2.load_state_dict(ck["ap"])
    assert ap2.allowed_formats()[0] == allowed
    _train(ap2, model2, opt2, 4)
    assert ap2.plan.get("2").weight.format == "fp32"


def test_a_given_device_report_is_trusted_without_timing_shapes(tmp_path, monkeypatch):
    def no_timing(*a, **k):
        raise AssertionError("shapes timed although the caller gave the device report")

    monkeypatch.setattr(setup_mod, "measure_gemms", no_timing)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = adaprec.AdaptivePrecision(model, opt, "error-budget", hardware=FAST_INT8_BF16, total_steps=30,
                                       count_bytes=False)
    _train(ap, model, opt, 3)
    assert ap.setup.table is None and {"int8", "bf16"} <= ap.allowed_formats()[0]["2"]
