"""The fused 8-bit Adam kernel (adaprec.optim.fused_adam) against the eager update and torch's own cast.

The kernel is C built at run time; where no compiler works the module says why and adaprec keeps the
eager update, which these tests check too. The eager update is the oracle: it runs torch's own Adam ops
between unpack and pack (bit for bit, tests/test_narrow_optimizer.py); the kernel may round a fused
multiply-add differently, so it is held to the eager result within a few float ulps and one code step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adaprec
from _train import FAST_INT8_BF16, train_random
from adaprec.optim import NarrowOptimizerState, fused_adam
from adaprec.optim.narrow_state import fused_takes

pytestmark = pytest.mark.skipif(not fused_adam.available()[0], reason=f"no fused kernel: {fused_adam.available()[1]}")


def _grads(shape, steps, seed=0, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(torch.randn(shape, generator=g) * 2)  # a spread of magnitudes, as real gradients have
    return [torch.randn(shape, generator=g) * mag * scale for _ in range(steps)]


# ---------------------------------------------------------------- the E4M3 cast, exhaustively near every code

def _codes_and_neighbours() -> torch.Tensor:
    """Every E4M3 value, the midpoints between neighbours, and one float ulp either side of each."""
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[torch.isfinite(vals)].unique()
    mids = (vals[1:].double() + vals[:-1].double()) / 2  # exact in fp64, and in fp32 (one more bit)
    pts = torch.cat([vals, mids.float()])
    up, down = torch.nextafter(pts, torch.tensor(float("inf"))), torch.nextafter(pts, torch.tensor(-float("inf")))
    specials = torch.tensor([0.0, -0.0, 448.0, 464.0, 479.99, 480.0, 1e30, float("inf"), -float("inf"),
                             float("nan"), 2.0**-9, 2.0**-10, 3 * 2.0**-11, 1e-45, 2.0**-6])
    return torch.cat([pts, up, down, specials])


def test_the_kernel_casts_to_e4m3_as_torch_does_around_every_code():
    x = _codes_and_neighbours()
    ours, torch_cast = fused_adam.to_e4m3(x).view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8)
    bad = (ours != torch_cast).nonzero().flatten()
    assert bad.numel() == 0, [(x[i].item(), ours[i].item(), torch_cast[i].item()) for i in bad[:5]]


def test_the_kernel_casts_to_e4m3_as_torch_does_over_a_sweep_of_all_float32_bit_patterns():
    bits = torch.arange(0, 2**32, 4099, dtype=torch.int64).to(torch.int32)  # ~1 M patterns, every exponent
    x = bits.view(torch.float32)
    assert torch.equal(fused_adam.to_e4m3(x).view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-448, max_value=448, width=32), min_size=1, max_size=64))
def test_the_e4m3_cast_agrees_with_ml_dtypes_in_range(xs):
    x = torch.tensor(xs, dtype=torch.float32)
    oracle = np.asarray(xs, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    assert fused_adam.to_e4m3(x).view(torch.uint8).numpy().tolist() == oracle.tolist()


# ---------------------------------------------------------------- the update against the eager update

def _pair(shape, opts, spec="int8", contiguous=True):
    p0 = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    out = []
    for fused in (True, False):
        p = nn.Parameter(p0.clone() if contiguous else p0.clone().t().contiguous().t())
        opt = torch.optim.Adam([p], **opts)
        ns = NarrowOptimizerState(opt, fused=fused)
        ns.set_formats({p: spec})
        out.append((p, opt, ns))
    return out


def _codes(opt, p, name):
    """The codes the moment ``name`` of ``p`` is held in (their own dtype)."""
    ns = NarrowOptimizerState(opt)  # reads the formats back from the optimizer's state
    return ns._packs(p, opt.state[p], ns._want[p])[name].codes


@pytest.mark.parametrize("opts", [
    {"lr": 1e-2},
    {"lr": 1e-2, "weight_decay": 0.1},  # L2 added to the gradient
    {"lr": 3e-3, "decoupled_weight_decay": True, "weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.95)},
    {"lr": 1e-3, "betas": (0.3, 0.99)},  # lerp weight >= 0.5: torch's other lerp branch
])
@pytest.mark.parametrize("shape", [(97, 131), (4096,), (300, 257)])  # padded last blocks, exact blocks
def test_the_fused_update_follows_the_eager_update(opts, shape):
    """Each step from the same state: the parameters within a few ulps, the codes within one step (a value
    at a rounding tie may round the other way). Then a whole run: the two stay within a code step."""
    (pf, of, nf), (pe, oe, ne) = _pair(shape, opts)
    for g in _grads(shape, 6, seed=2):
        pf.grad, pe.grad = g.clone(), g.clone()
        assert fused_adam.applies(pf, nf._want[pf].first, nf._want[pf].second)
        nf.step()
        ne.step()
        gap = torch.linalg.vector_norm(pe.detach() - pf.detach(), ord=float("inf")).item()
        assert gap <= 4 * torch.finfo(torch.float32).eps * max(1.0, pe.detach().abs().max().item())
        for name in ("exp_avg", "exp_avg_sq"):  # int8 codes, and E4M3 codes (ordered as integers within a sign)
            a, b = _codes(of, pf, name), _codes(oe, pe, name)
            if a.dtype != torch.int8:
                a, b = a.view(torch.uint8), b.view(torch.uint8)
            diff = (a.int() - b.int()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 1e-3
        with torch.no_grad():  # the next step starts from the same state again
            pf.copy_(pe)
            for k, v in oe.state[pe].items():
                of.state[pf][k].copy_(v)
    (pf, of, nf), (pe, oe, ne) = _pair(shape, opts)
    for g in _grads(shape, 12, seed=3):
        pf.grad, pe.grad = g.clone(), g.clone()
        nf.step()
        ne.step()
    lr = opts["lr"]
    assert torch.allclose(pf.detach(), pe.detach(), rtol=0, atol=0.05 * lr * 12)
    mf, me = nf._moments_fp32(pf, of.state[pf]), ne._moments_fp32(pe, oe.state[pe])
    for k in mf:
        scale = me[k].abs().amax()
        assert (mf[k] - me[k]).abs().amax() <= 0.05 * scale, k


def test_a_strided_parameter_takes_the_fused_path_in_its_logical_order():
    (pf, of, nf), (pe, oe, ne) = _pair((64, 96), {"lr": 1e-2})
    q = nn.Parameter(pf.detach().t().contiguous().t())  # same values, column-major storage
    oq = torch.optim.Adam([q], lr=1e-2)
    nq = NarrowOptimizerState(oq)
    nq.set_formats({q: "int8"})
    for g in _grads((64, 96), 4):
        pf.grad, q.grad = g.clone(), g.clone().t().contiguous().t()
        nf.step()
        nq.step()
    assert not q.is_contiguous() and torch.equal(q.detach(), pf.detach())
    assert torch.equal(_codes(oq, q, "exp_avg"), _codes(of, pf, "exp_avg"))


def test_an_inf_or_nan_gradient_gives_the_nan_codes_the_eager_update_gives():
    (pf, of, nf), (pe, oe, ne) = _pair((64, 100), {"lr": 1e-2})
    g = _grads((64, 100), 1)[0]
    g[3, 5], g[7, 1] = float("nan"), float("inf")
    pf.grad, pe.grad = g.clone(), g.clone()
    nf.step()
    ne.step()
    assert torch.equal(torch.isnan(pf.detach()), torch.isnan(pe.detach()))
    for name, nan in (("exp_avg", -128), ("exp_avg_sq", None)):
        a, b = _codes(of, pf, name), _codes(oe, pe, name)
        if nan is not None:
            assert torch.equal(a == nan, b == nan) and (a == nan).sum() == 2
        else:
            fa, fb = a.float(), b.float()
            assert torch.equal(torch.isnan(fa), torch.isnan(fb)) and torch.isnan(fa).sum() >= 1


def test_the_fused_step_holds_two_bytes_a_parameter_and_splits_its_blocks_between_threads():
    n = 1 << 18  # 1,024 blocks: more than one thread's share
    gen = torch.Generator().manual_seed(4)
    p = nn.Parameter(torch.randn(n, generator=gen))
    ref = nn.Parameter(p.detach().clone())
    opt, opt_ref = torch.optim.AdamW([p], lr=1e-3), torch.optim.AdamW([ref], lr=1e-3)
    ns = NarrowOptimizerState(opt)
    ns.set_formats({p: "int8"})
    p.grad = torch.randn(n, generator=gen)
    ref.grad = p.grad.clone()
    ns.step()
    opt_ref.step()
    tag = opt.state[p]["adaprec_format"].numel()  # the formats' name, kept as bytes beside the codes
    assert sum(ns.nbytes().values()) == 2 * n + 2 * 4 * (n // 256) + tag + 4  # codes, scales, torch's step count
    # step 1 starts from zero moments, which every format holds exactly: every block, the last thread's too,
    # takes torch's fp32 step (within the ulps of a multiply-add rounded twice)
    assert torch.allclose(p.detach(), ref.detach(), rtol=0, atol=4 * torch.finfo(torch.float32).eps * 8)


def test_a_resumed_fused_run_repeats_the_uninterrupted_one_bit_for_bit_in_a_fresh_process(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        from torch import nn
        from adaprec.optim import NarrowOptimizerState
        path, mode = sys.argv[1], sys.argv[2]
        g = torch.Generator().manual_seed(0)
        grads = [torch.randn(300, 257, generator=g) * 1e-2 for _ in range(6)]
        p = nn.Parameter(torch.randn(300, 257, generator=torch.Generator().manual_seed(1)))
        opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1)
        ns = NarrowOptimizerState(opt)
        ns.set_formats({p: "int8"})
        todo = range(6)
        if mode == "resume":
            st = torch.load(path + "/half.pt", weights_only=True)
            p.data.copy_(st["p"]); opt.load_state_dict(st["opt"]); todo = range(3, 6)
        for i in todo:
            p.grad = grads[i].clone(); ns.step()
            if mode == "first" and i == 2:
                torch.save({"p": p.detach(), "opt": opt.state_dict()}, path + "/half.pt"); break
        if mode != "first":
            torch.save({"p": p.detach(), "opt": opt.state_dict()}, path + f"/{mode}.pt")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for mode in ("whole", "first", "resume"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path), mode], check=True, env=env)
    a, b = (torch.load(tmp_path / f"{m}.pt", weights_only=True) for m in ("whole", "resume"))
    assert torch.equal(a["p"], b["p"])
    for k, v in a["opt"]["state"][0].items():
        assert torch.equal(v, b["opt"]["state"][0][k]), k


# ---------------------------------------------------------------- where it applies, and the default that uses it

def test_only_the_int8_pair_on_fp32_cpu_adam_takes_the_kernel():
    assert fused_takes("int8") and fused_takes("int8/block128")
    assert not fused_takes("bf16") and not fused_takes("int8/row") and not fused_takes("fp8_e4m3")
    assert not fused_takes("int8/block8192")  # more than a block the kernel holds on its stack
    p = nn.Parameter(torch.randn(64, 64))
    assert fused_adam.covers(torch.optim.AdamW([p]))
    assert not fused_adam.covers(torch.optim.AdamW([p], amsgrad=True))
    assert not fused_adam.covers(torch.optim.AdamW([p], fused=True))  # torch's fused fp32 step is faster
    assert not fused_adam.covers(torch.optim.SGD([p], lr=0.1, momentum=0.9))
    assert not fused_adam.covers(torch.optim.AdamW([nn.Parameter(torch.randn(4, 4).bfloat16())]))


def test_without_a_compiler_the_kernel_says_why_and_the_eager_update_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPREC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    fused_adam._library.cache_clear()
    try:
        ok, why = fused_adam.available()
        assert not ok and "could not be built" in why or "did not build" in why
        p = nn.Parameter(torch.randn(64, 100))
        opt = torch.optim.AdamW([p], lr=1e-2)
        assert not fused_adam.covers(opt)
        ns = NarrowOptimizerState(opt)
        ns.set_formats({p: "int8"})
        p.grad = torch.randn_like(p)
        before = p.detach().clone()
        ns.step()  # the eager update
        assert not torch.equal(before, p.detach())
    finally:
        fused_adam._library.cache_clear()


@pytest.mark.parametrize("make_opt, narrow", [
    (lambda ps: torch.optim.AdamW(ps, lr=1e-3), True),
    (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), False),  # no fused kernel: moments stay fp32
])
def test_the_default_keeps_8bit_moments_where_the_kernel_covers_the_optimizer(make_opt, narrow):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 4))
    opt = make_opt(list(model.parameters()))
    policy = {"name": "error-budget", "warmup_steps": 2, "speed_check": False}
    ap = adaprec.AdaptivePrecision(model, opt, policy, hardware=FAST_INT8_BF16)
    train_random(ap, model, opt, steps=4, rows=32)
    held = ap.update.states.narrow.formats()
    big, small = model[2].weight, model[0].weight  # 1 Mi elements; 64 Ki, where the kernel's call costs more
    assert (held[big] != "fp32") == narrow and held[small] == "fp32", held
    # the plan says what is held: 8-bit moments only for the module the kernel updates
    assert (ap.plan.get("2").optimizer_state != "fp32") == narrow and ap.plan.get("0").optimizer_state == "fp32"
    assert ("fused kernel" in ap.policy.storage_note()) == narrow
    assert ap.policy.moments_min_numel() == 1 << 20
    ap.close()
