"""Native kernels: int8 (``torch._int_mm``) and bf16 GEMMs agree with emulation, and the ledger says what ran.

Tolerances (the engine's contract):

* int8: native and emulated GEMMs multiply the same int8 codes under the same
  power-of-two scales (emulation in fp32). While the integer sums stay below
  2^24 both are exact, so the results are *equal*, bit for bit, for all three
  GEMMs, stochastic rounding of the output gradient included (same seeded noise).
* bf16: both read the same bf16 operands; native rounds each GEMM result to
  bf16 (and adds the bias in bf16 when the whole op runs in bf16), emulation
  keeps fp32. They agree within two bf16 roundings (2^-7 relative) of the
  output and of the bias, plus fp32 accumulation-order slack.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import adaprec
from _train import fake_report, same_state, state_diff
from adaprec.engine import Capabilities, PrecisionEngine
from adaprec.engine.quant import NoiseTable, Scratch, quantize_int8
from adaprec.plan import ModulePrecision, PrecisionPlan, TensorRecipe

_ALL = frozenset({"int8", "bf16"})
NATIVE = Capabilities(native={"gemm": _ALL, "conv": frozenset({"bf16"})}, fast={"gemm": _ALL, "conv": frozenset({"bf16"})})


def _int8(scaling: str, rounding: str = "nearest") -> TensorRecipe:
    return TensorRecipe("int8", rounding=rounding, scaling=scaling)


def int8_plan(scaling: str = "tensor", grad_scaling: str | None = None, grad_rounding: str = "stochastic",
              grad_weight: str = "fp32") -> ModulePrecision:
    return ModulePrecision(weight=_int8(scaling), activation=_int8(scaling),
                           grad_output=_int8(grad_scaling or scaling, grad_rounding), grad_weight=grad_weight)


BF16 = ModulePrecision(weight="bf16", activation="bf16", grad_output="bf16", grad_weight="bf16")  # one bf16 op
BF16_MIXED = ModulePrecision(weight="bf16", activation=_int8("tensor"), grad_output="bf16")  # bf16 GEMMs, int8 codes


@pytest.fixture(autouse=True)
def _quiet_emulation_notes():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="adaprec: backend='emulate'")
        yield


def _linear_step(backend: str, mp: ModulePrecision, lead: tuple[int, ...], k: int, n: int, *, seed: int = 0,
                 scales=(0, 0, 0), data_seed: int = 0, zero_x: bool = False, outlier: bool = False) -> dict:
    """One forward + backward of an nn.Linear(k, n) on input (*lead, k) under ``mp``.

    ``scales``: base-2 exponents multiplying x, the weight and the output gradient.
    """
    gen = torch.Generator().manual_seed(data_seed)
    lin = nn.Linear(k, n)
    ex, ew, eg = (2.0**e for e in scales)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * ew)
        lin.bias.copy_(torch.randn(n, generator=gen) * ex * ew)
    x = torch.randn(*lead, k, generator=gen) * ex
    if zero_x:
        x.zero_()
    if outlier:
        x.view(-1)[0] = 1000.0 * ex
    x.requires_grad_(True)
    g = torch.randn(*lead, n, generator=gen) * eg
    eng = PrecisionEngine(lin, backend=backend, capabilities=NATIVE, seed=seed)
    eng.discover(x)
    eng.set_plan(PrecisionPlan.uniform(eng.kinds, mp))
    eng.begin_step(0, False)
    with eng.activate():
        y = lin(x)
    y.backward(g)
    eng.commit_backward()
    cost = eng.pop_step_cost()
    assert eng.pop_faults() == []
    return {"y": y.detach(), "gx": x.grad, "gw": lin.weight.grad, "gb": lin.bias.grad, "x": x.detach(),
            "w": lin.weight.detach(), "b": lin.bias.detach(), "g": g, "cost": cost}


def _executed(cost) -> set[tuple[str, str, bool]]:
    return {(g.gemm, g.fmt, g.native) for m in cost.modules.values() for g in m.gemms}


GEMMS = ("forward", "input_grad", "weight_grad")
shapes = st.tuples(
    st.sampled_from([(1,), (2,), (7,), (1, 1), (3, 5), (2, 1, 3)]),  # 1-row, odd, 3-D and 4-D inputs
    st.integers(1, 40),  # K (in features)
    st.integers(1, 40),  # N (out features)
)
exponents = st.tuples(*(st.sampled_from([-50, -16, 0, 16, 50]) for _ in range(3)))  # tiny to huge magnitudes


@settings(max_examples=60, deadline=None, database=None)
@given(shape=shapes, scales=exponents, scaling=st.sampled_from(["tensor", "row"]),
       grad_scaling=st.sampled_from(["tensor", "row"]), rounding=st.sampled_from(["nearest", "stochastic"]),
       seed=st.integers(0, 2**31 - 1), zero_x=st.booleans(), outlier=st.booleans())
def test_native_int8_gemms_equal_emulation_bit_for_bit(shape, scales, scaling, grad_scaling, rounding, seed,
                                                       zero_x, outlier):
    lead, k, n = shape
    assert max(k, n, 15) * 127 * 127 < 2**24  # integer sums exact in fp32: emulation is exact too
    mp = int8_plan(scaling, grad_scaling, rounding)
    kw = dict(seed=seed, scales=scales, data_seed=seed % 1000, zero_x=zero_x, outlier=outlier)
    nat = _linear_step("native", mp, lead, k, n, **kw)
    emu = _linear_step("emulate", mp, lead, k, n, **kw)
    assert _executed(nat["cost"]) == {(gm, "int8", True) for gm in GEMMS}
    assert _executed(emu["cost"]) == {(gm, "int8", False) for gm in GEMMS}
    for key in ("y", "gx", "gw", "gb"):
        assert torch.equal(nat[key], emu[key]), key
    if not zero_x:
        assert not torch.equal(nat["y"], F.linear(nat["x"], nat["w"], nat["b"]))  # it did run in int8


def _slack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 accumulation-order slack of a @ b: 4 * contraction * 2^-24 * (|a| @ |b|)."""
    return 4 * a.shape[-1] * 2.0**-24 * (a.abs().double() @ b.abs().double()).float()


@settings(max_examples=40, deadline=None, database=None)
@given(shape=shapes, scales=exponents, mixed=st.booleans(), data_seed=st.integers(0, 999))
def test_native_bf16_gemms_agree_with_emulation_within_output_rounding(shape, scales, mixed, data_seed):
    """``mixed``: int8 activation codes times a bf16 weight, run as bf16 GEMMs; else the whole op in bf16."""
    lead, k, n = shape
    mp = BF16_MIXED if mixed else BF16
    nat = _linear_step("native", mp, lead, k, n, scales=scales, data_seed=data_seed)
    emu = _linear_step("emulate", mp, lead, k, n, scales=scales, data_seed=data_seed)
    assert _executed(nat["cost"]) == {(gm, "bf16", True) for gm in GEMMS}
    assert _executed(emu["cost"]) == {(gm, "bf16", False) for gm in GEMMS}
    x = nat["x"].reshape(-1, k)
    x = 2 * x  # |an operand as the GEMMs read it| <= 2|x| (bf16 or int8 rounding), for the slack term only
    w, g = nat["w"], nat["g"].reshape(-1, n)
    b = nat["b"]
    product = (emu["y"] - b).reshape(-1, n).abs()  # the forward GEMM's result, before the bias
    bounds = {
        "y": 2.0**-7 * (product + b.abs()) + _slack(x, w.t()),
        "gx": 2.0**-7 * emu["gx"].reshape(-1, k).abs() + _slack(g, w),
        "gw": 2.0**-7 * emu["gw"].abs() + _slack(g.t(), x),
    }
    for key, bound in bounds.items():
        diff = (nat[key] - emu[key]).reshape(bound.shape).abs()
        assert (diff <= bound).all(), (key, (diff - bound).max())
    if mixed:  # the bias gradient: the output gradient summed in fp32 on both paths
        assert torch.equal(nat["gb"], emu["gb"])
    else:  # the whole op in bf16: autograd sums the bf16 output gradient in bf16
        assert ((nat["gb"] - emu["gb"]).abs() <= 2.0**-7 * g.abs().sum(0) + _slack(g.t(), g.new_ones(len(g), 1))[:, 0]).all()


# --- stochastic rounding: seeded, reproducible, unbiased ------------------------------------------------
SR = int8_plan("tensor", grad_rounding="stochastic")


def test_stochastic_rounding_same_seed_same_bits_other_seed_other_bits():
    a = _linear_step("native", SR, (6,), 12, 5, seed=11, data_seed=3)
    b = _linear_step("native", SR, (6,), 12, 5, seed=11, data_seed=3)
    c = _linear_step("native", SR, (6,), 12, 5, seed=12, data_seed=3)
    assert torch.equal(a["gx"], b["gx"]) and torch.equal(a["gw"], b["gw"])
    assert not torch.equal(a["gx"], c["gx"]) and not torch.equal(a["gw"], c["gw"])
    assert torch.equal(a["y"], c["y"])  # the forward rounds to nearest: the seed does not touch it
    near = _linear_step("native", int8_plan("tensor", grad_rounding="nearest"), (6,), 12, 5, seed=11, data_seed=3)
    assert not torch.equal(near["gx"], a["gx"])


def test_stochastic_rounding_is_unbiased():
    """E[SR(x)] = x: codes averaged over many noise draws approach x * scale, and the engine's input
    gradient averaged over many steps' draws approaches G @ Wq (Wq: the weight's nearest int8 codes)."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    exact = x * 2.0**5  # amax < 4 here, so the per-tensor scale is 2^5
    assert x.abs().max() * 2**5 <= 127 < x.abs().max() * 2**6
    tables = [NoiseTable(seed) for seed in range(4)]
    scratch = Scratch()
    n = 2000
    total = torch.zeros_like(x)
    for i in range(n):
        q = quantize_int8(x, None, True, scratch, tables[i % 4], offset=i * 7919)
        assert q.inv_scale == 2.0**-5
        c = q.codes.float()
        assert ((c == exact.floor()) | (c == exact.floor() + 1)).all()  # one of the two neighbours
        total += c
    mean = total / n
    # each code is Bernoulli on its two neighbours: sd <= 0.5 / sqrt(n); 6 sd over 256 values
    assert (mean - exact).abs().max() < 6 * 0.5 / n**0.5
    nearest = quantize_int8(x, None, False, scratch).codes.float()
    assert (nearest - exact).abs().mean() > 10 * (mean - exact).abs().mean()

    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    eng = PrecisionEngine(lin, backend="native", capabilities=NATIVE, seed=9)
    xin = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    g = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    eng.discover(xin)
    eng.set_plan(PrecisionPlan.uniform(eng.kinds, SR))
    steps = 400
    acc = torch.zeros(5, 6, dtype=torch.float64)
    draws = set()
    for step in range(steps):
        eng.begin_step(step, False)  # each step draws its own noise (seed, step, module, role, call)
        xin.grad = None
        with eng.activate():
            y = lin(xin)
        y.backward(g)
        acc += xin.grad.double()
        draws.add(xin.grad.numpy().tobytes())
    assert len(draws) > steps // 2  # the draws really differ from step to step
    wq = quantize_int8(lin.weight.detach(), None, False, Scratch()).dequantize().double()
    want = g.double() @ wq
    sg = 2.0 ** torch.floor(torch.log2(127 / g.abs().max())).item()
    sd = 0.5 / sg * wq.square().sum(0).sqrt() / steps**0.5  # per element of dX: independent rounding errors
    err = (acc / steps - want).abs()
    assert (err <= 6 * sd + 1e-6).all()
    assert err.max() > 0


# --- the ledger records what ran -------------------------------------------------------------------------
class _KernelLog(TorchDispatchMode):
    """Every GEMM kernel that runs, as (format it computed in, MACs)."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = func.overloadpacket
        if op in (torch.ops.aten.mm, torch.ops.aten._int_mm, torch.ops.aten.addmm):
            a, b = (args[0], args[1]) if op is not torch.ops.aten.addmm else (args[1], args[2])
            fmt = {torch.int8: "int8", torch.bfloat16: "bf16", torch.float32: "fp32"}[a.dtype]
            assert b.dtype == a.dtype
            self.ran[(fmt, a.shape[0] * a.shape[1] * b.shape[1])] += 1
        elif op in (torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten.convolution):
            raise AssertionError(f"unexpected kernel {op}")
        return func(*args, **kwargs)


class _Four(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(16, 24), nn.Linear(24, 8), nn.Linear(8, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


@pytest.mark.parametrize("backend", ["native", "emulate"])
def test_ledger_formats_are_the_kernels_that_ran(backend, monkeypatch):
    torch.manual_seed(0)
    model = _Four()
    x = torch.randn(10, 16)
    plan = PrecisionPlan({"a": int8_plan("row", "tensor"), "b": BF16, "c": ModulePrecision(), "d": BF16_MIXED})
    eng = PrecisionEngine(model, backend=backend, capabilities=NATIVE, seed=3)
    eng.discover(x)
    eng.set_plan(plan)
    int_mm_calls = []
    real_int_mm = torch._int_mm

    def spy(a, b, **kw):
        int_mm_calls.append((a.shape[0], a.shape[1], b.shape[1]))
        return real_int_mm(a, b, **kw)

    monkeypatch.setattr(torch, "_int_mm", spy)
    log = _KernelLog()
    eng.begin_step(0, False)
    with log:
        with eng.activate():
            y = model(x)
        y.square().sum().backward()
    eng.commit_backward()
    cost = eng.pop_step_cost()
    recorded = Counter((g.executed, g.macs) for mc in cost.modules.values() for g in mc.gemms)
    assert recorded == log.ran
    int8 = [g for mc in cost.modules.values() for g in mc.gemms if g.executed == "int8"]
    assert len(int_mm_calls) == len(int8)
    assert sorted(m * k * n for m, k, n in int_mm_calls) == sorted(g.macs for g in int8)
    by_module = {n: {(g.gemm, g.fmt, g.native) for g in mc.gemms} for n, mc in cost.modules.items()}
    nat = backend == "native"
    assert by_module["a"] == {("forward", "int8", nat), ("weight_grad", "int8", nat)}  # x needs no gradient
    assert by_module["b"] == {(gm, "bf16", nat) for gm in GEMMS}
    assert by_module["c"] == {(gm, "fp32", True) for gm in GEMMS}
    assert by_module["d"] == {(gm, "bf16", nat) for gm in GEMMS}
    if nat:
        assert {f for f, _ in log.ran} == {"int8", "bf16", "fp32"}
    else:
        assert {f for f, _ in log.ran} == {"fp32"} and not int_mm_calls


def test_auto_backend_runs_native_formats_and_emulates_the_rest_saying_so():
    """auto: a format the probe found native runs natively even when it is not faster (policies just never pick
    it); a format it did not find native (here int8) is emulated, with a one-time warning and the measured reason."""
    caps = Capabilities(native={"gemm": frozenset({"bf16"})}, fast={"gemm": frozenset()}, reasons={"int8": "measured 0.8x"})
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    eng = PrecisionEngine(model, backend="auto", capabilities=caps)
    eng.discover(x)
    eng.set_plan(PrecisionPlan.uniform(eng.kinds, int8_plan()))
    eng.begin_step(0, False)
    log = _KernelLog()
    with pytest.warns(UserWarning, match=r"int8, which this device can only emulate \(measured 0.8x\)"):
        with log, eng.activate():
            model(x).sum().backward()
    eng.commit_backward()
    cost = eng.pop_step_cost()
    assert {f for f, _ in log.ran} == {"fp32"}
    assert cost.macs_by_format() == {"int8 (emulated)": 2 * 3 * 8 * 4}
    eng.set_plan(PrecisionPlan.uniform(eng.kinds, "bf16"))  # native, not faster: still runs natively
    eng.begin_step(1, False)
    log = _KernelLog()
    with log, eng.activate():
        model(x).sum().backward()
    eng.commit_backward()
    assert "bf16" in {f for f, _ in log.ran}
    assert eng.pop_step_cost().macs_by_format() == {"bf16": 2 * 3 * 8 * 4}


# --- hardware-aware policies choose only what the device runs natively and fast ---------------------------
class _Attn(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.attn = _Attn()
        self.mlp = nn.Linear(16, 32)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        h = self.conv(x).transpose(1, 2)
        h = h + self.attn(h)
        return self.head(torch.relu(self.mlp(h))).squeeze(-1)


@pytest.mark.parametrize("fast", [("bf16",), ("int8", "bf16")], ids=["bf16-only", "int8-and-bf16"])
def test_error_budget_never_picks_a_format_the_device_only_emulates(fast):
    report = fake_report(fast, ("bf16",), ("bf16",))
    torch.manual_seed(0)
    net = _Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    steps = 7
    policy = {"name": "error-budget", "warmup_steps": 2, "patience": 1}
    ap = adaprec.AdaptivePrecision(net, opt, policy, hardware=report, monitor_every=2, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(steps, 8, 4, 8, generator=gen)
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        with ap.autocast():
            loss = F.mse_loss(net(xs[i]), xs[i].sum(1))
        ap.backward(loss)
        assert ap.step().stepped
    kinds = ap.engine.kinds
    assert kinds == {"conv": "conv", "attn.qkv": "linear", "attn": "attention", "attn.proj": "linear",
                     "mlp": "linear", "head": "linear"}
    linear_ok = set(report.fast_formats("gemm"))
    sixteen_ok = {"bf16", "fp32"} & (set(report.fast_formats("conv")) | {"fp32"})
    plans = [ap.timeline.initial] + [ap.timeline.plans_at(s) for s in range(steps)]
    used = set()
    for plan in plans:
        for name, kind in kinds.items():
            mp = plan.get(name)
            fmts = {mp.recipe(r).format for r in ("weight", "activation", "grad_output", "grad_weight")}
            used |= {mp.recipe(r).format for r in ("weight", "activation", "grad_output")}
            if kind == "linear":
                assert fmts <= linear_ok, (name, fmts)
            else:  # conv and attention: one 16-bit dtype for the op, so the three operand roles move together
                assert fmts <= sixteen_ok, (name, fmts)
                assert len({mp.weight.format, mp.activation.format, mp.grad_output.format}) == 1, (name, mp)
    assert used - {"fp32"}, "the policy narrowed nothing: the test would prove nothing"
    if "int8" in fast:
        assert "int8" in used
    s = ap.energy.summary()
    assert s["emulated_formats"] == [] and s["emulated_mac_fraction"] == 0.0
    assert set(s["native_formats"]) <= set(fast)


# --- a non-finite activation under int8 is an incident, not clipped away ----------------------------------
class _Poison(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.value: float | None = None

    def forward(self, x):
        if self.value is None:
            return x
        x = x.clone()
        x[0, 0] = self.value
        return x


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_nonfinite_activation_under_int8_skips_the_step_and_names_module_and_role(bad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), _Poison(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ap = adaprec.AdaptivePrecision(model, opt, int8_plan(), hardware=fake_report(), guard=False)
    x = torch.randn(5, 8)
    model[1].value = bad
    before = [p.detach().clone() for p in model.parameters()]
    with ap.autocast():
        out = model(x)
        loss = out.square().mean()
    assert torch.isfinite(out).all()  # the int8 cast clipped it: the loss alone would never tell
    ap.backward(loss)
    res = ap.step()
    assert not res.stepped
    assert "activation of 2" in res.reason and "inf/NaN" in res.reason
    assert "2" in res.overflowed
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    model[1].value = None  # the next, clean step trains again
    opt.zero_grad(set_to_none=True)
    with ap.autocast():
        loss = model(x).square().mean()
    ap.backward(loss)
    assert ap.step().stepped
    assert ap.energy.summary()["macs_by_format"].keys() == {"int8"}


# --- resume stays bit-exact with native kernels and seeded stochastic rounding -----------------------------
SETUP = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import adaprec
    from _train import fake_report
    from adaprec.plan import ModulePrecision, TensorRecipe

    PLAN = ModulePrecision(weight=TensorRecipe("int8", scaling="row"), activation=TensorRecipe("int8", scaling="tensor"),
                           grad_output=TensorRecipe("int8", rounding="stochastic", scaling="tensor"), grad_weight="fp32")
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(96, 12, generator=gen)
    Y = X[:, :3].sum(1, keepdim=True)

    def make(seed=5):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ap = adaprec.AdaptivePrecision(model, opt, PLAN, hardware=fake_report(), seed=seed, monitor_every=3)
        return model, opt, ap

    def run(model, opt, ap, start, stop):
        for i in range(start, stop):
            j = (i * 16) % 96
            opt.zero_grad(set_to_none=True)
            with ap.autocast():
                loss = F.mse_loss(model(X[j:j + 16]), Y[j:j + 16])
            ap.backward(loss)
            res = ap.step()
            assert res.stepped, res.reason
""")

RESUME = SETUP + textwrap.dedent("""
    import sys
    torch.manual_seed(12345)  # whatever the global RNG holds in a fresh process must not matter
    model, opt, ap = make()
    ck = torch.load(sys.argv[1], weights_only=True)
    model.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"]); ap.load_state_dict(ck["ap"])
    run(model, opt, ap, int(sys.argv[3]), int(sys.argv[4]))
    torch.save({"model": model.state_dict(), "ap": ap.state_dict()}, sys.argv[2])
""")


def _strip_wall_time(state):
    """The adaprec state without measured wall times (a clock reading differs between any two runs)."""
    rows = state["energy"]["rows"]  # columns: one list per field
    columns = dict(rows["columns"], wall_s=[None] * len(rows["columns"]["wall_s"]))
    return dict(state, energy=dict(state["energy"], rows=dict(rows, columns=columns)))


def test_resume_in_a_fresh_process_is_bit_exact_with_native_int8_and_stochastic_rounding(tmp_path):
    env = {}
    exec(SETUP, env)  # noqa: S102 - the very code the child process runs
    n = 8
    model_a, opt_a, ap_a = env["make"]()
    env["run"](model_a, opt_a, ap_a, 0, n)
    s = ap_a.energy.summary()
    assert set(s["macs_by_format"]) == {"int8"} and s["native_formats"] == ["int8"]
    model_b, opt_b, ap_b = env["make"]()
    env["run"](model_b, opt_b, ap_b, 0, n // 2)
    ckpt = tmp_path / "half.pt"
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "ap": ap_b.state_dict()}, buf)
    ckpt.write_bytes(buf.getvalue())
    out = tmp_path / "end.pt"
    tests = Path(__file__).parent
    pythonpath = os.pathsep.join([str(tests), str(tests.parent / "src"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", RESUME, str(ckpt), str(out), str(n // 2), str(n)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env=dict(os.environ, PYTHONPATH=pythonpath))
    assert proc.returncode == 0, proc.stderr[-3000:]
    end = torch.load(out, weights_only=True)
    for name, p in model_a.state_dict().items():
        assert torch.equal(p, end["model"][name]), name
    resumed, whole = _strip_wall_time(end["ap"]), _strip_wall_time(ap_a.state_dict())
    assert same_state(resumed, whole), state_diff(resumed, whole)[:10]
    assert resumed["engine"]["seed"] == 5 and resumed["step"] == n
    # and the seed mattered: the same run with another stochastic-rounding seed ends elsewhere
    model_c, opt_c, ap_c = env["make"](seed=6)
    env["run"](model_c, opt_c, ap_c, 0, n)
    assert not all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_c.parameters(), strict=True))
