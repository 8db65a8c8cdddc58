"""NarrowOptimizerState: optimizer moments kept in storage formats, stepped for real.

The oracles are torch's own optimizers: fp32 storage must be the optimizer's
own step bit for bit; a narrow step must equal "unpack the moments, run
torch's single-tensor Adam/SGD on them, pack them again" bit for bit (the
whole tensor at once, so the chunking is checked too); and the trajectory
of each narrow format stays within its error of the fp32 one.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adaprec.errors import AdaprecError, CheckpointError, FormatSpecError, OptimizerStateError
from adaprec.formats.storage import pack, storage_nbytes, unpack
from adaprec.optim import NarrowOptimizerState, adam_update_, moment_formats, sgd_update_

NARROW = ["bf16", "fp16", "int8", "int8/row", "int8/block128", "fp8_e4m3", "fp8_e5m2", "int4"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.int16 if t.element_size() == 2 else torch.int32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _grads(shape, steps, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    # a spread of magnitudes per element, as real gradients have (a few large, many small)
    mag = torch.exp(torch.randn(shape, generator=g) * 2)
    return [torch.randn(shape, generator=g) * mag * scale for _ in range(steps)]


# ---------------------------------------------------------------- the update rules against torch

ADAM_OPTIONS = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"amsgrad": True},
    {"maximize": True, "betas": (0.8, 0.95), "eps": 1e-6},
]


@pytest.mark.parametrize("opts", ADAM_OPTIONS)
def test_adam_update_is_torchs_single_tensor_adam_bit_for_bit(opts):
    torch.manual_seed(0)
    p0 = torch.randn(33, 17)
    ref = nn.Parameter(p0.clone())
    o = torch.optim.Adam([ref], lr=3e-3, foreach=False, **opts)
    p = p0.clone()
    m, v, mx = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    b1, b2 = opts.get("betas", (0.9, 0.999))
    for step, g in enumerate(_grads(p.shape, 6), start=1):
        ref.grad = g.clone()
        o.step()
        adam_update_(p, g, m, v, mx if opts.get("amsgrad") else None, step=float(step), lr=3e-3, beta1=b1,
                     beta2=b2, eps=opts.get("eps", 1e-8), weight_decay=opts.get("weight_decay", 0.0),
                     decoupled=opts.get("decoupled_weight_decay", False), maximize=opts.get("maximize", False))
        assert _same(p, ref.detach()) and _same(m, o.state[ref]["exp_avg"]) and _same(v, o.state[ref]["exp_avg_sq"])


@pytest.mark.parametrize("opts", [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
                                  {"momentum": 0.5, "dampening": 0.3, "maximize": True}])
def test_sgd_update_is_torchs_single_tensor_sgd_bit_for_bit(opts):
    torch.manual_seed(0)
    p0 = torch.randn(40)
    ref = nn.Parameter(p0.clone())
    o = torch.optim.SGD([ref], lr=0.1, foreach=False, **opts)
    p, buf = p0.clone(), torch.zeros_like(p0)
    for i, g in enumerate(_grads(p.shape, 5)):
        ref.grad = g.clone()
        o.step()
        sgd_update_(p, g, buf, first=i == 0, lr=0.1, momentum=opts["momentum"],
                    dampening=opts.get("dampening", 0.0), nesterov=opts.get("nesterov", False),
                    weight_decay=opts.get("weight_decay", 0.0), maximize=opts.get("maximize", False))
        assert _same(p, ref.detach()) and _same(buf, o.state[ref]["momentum_buffer"])


# ---------------------------------------------------------------- fp32 is the optimizer's own step

def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 96), nn.Tanh(), nn.Linear(96, 80), nn.Tanh(), nn.Linear(80, 5)).to(dtype)


def _train(model, step, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 48, generator=g).to(next(model.parameters()).dtype)
        opt.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
        step()


@pytest.mark.parametrize("cls,opts", [(torch.optim.Adam, {}), (torch.optim.AdamW, {"weight_decay": 0.05}),
                                      (torch.optim.Adam, {"amsgrad": True, "foreach": True}),
                                      (torch.optim.SGD, {"momentum": 0.9, "lr": 0.01})])
def test_fp32_state_is_the_optimizers_own_step_bit_for_bit(cls, opts):
    a, b = _mlp(), _mlp()
    oa, ob = cls(a.parameters(), **{"lr": 1e-3, **opts}), cls(b.parameters(), **{"lr": 1e-3, **opts})
    ns = NarrowOptimizerState(ob)
    assert set(ns.set_formats({p: "fp32" for p in b.parameters()}).values()) == {"fp32"}
    _train(a, oa.step, oa, 5)
    _train(b, ns.step, ob, 5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert _same(pa, pb)
        for k, v in oa.state[pa].items():
            assert _same(v, ob.state[pb][k])


# ---------------------------------------------------------------- narrow = unpack, torch's step, pack

class _Oracle:
    """One parameter stepped by torch's own Adam on the unpacked moments, packed again after each step."""

    def __init__(self, p0, mf, opts):
        self.p = nn.Parameter(p0.clone())
        self.opt = torch.optim.Adam([self.p], foreach=False, **opts)
        self.mf, self.step_n = mf, 0
        self.m = pack(torch.zeros_like(p0), mf.first)
        self.v = pack(torch.zeros_like(p0), mf.second)
        self.mx = pack(torch.zeros_like(p0), mf.second) if opts.get("amsgrad") else None

    def step(self, g):
        st_ = {"step": torch.tensor(float(self.step_n)), "exp_avg": unpack(self.m), "exp_avg_sq": unpack(self.v)}
        if self.mx is not None:
            st_["max_exp_avg_sq"] = unpack(self.mx)
        self.opt.state[self.p] = st_
        self.p.grad = g.clone()
        self.opt.step()
        self.step_n += 1
        self.m, self.v = pack(st_["exp_avg"], self.mf.first), pack(st_["exp_avg_sq"], self.mf.second)
        if self.mx is not None:
            self.mx = pack(st_["max_exp_avg_sq"], self.mf.second)


@pytest.mark.parametrize("spec", [*NARROW, ("int8", "bf16"), ("fp32", "int8/sqrt")])
@pytest.mark.parametrize("opts", [{"lr": 1e-2}, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1},
                                  {"lr": 1e-2, "decoupled_weight_decay": True, "weight_decay": 0.1,
                                   "maximize": True}])
def test_narrow_step_is_unpack_torch_step_pack_bit_for_bit(spec, opts):
    shape = (97, 131)  # not a multiple of any block: the last block is padded
    p0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    mf = moment_formats(spec)
    oracle = _Oracle(p0, mf, opts)
    p = nn.Parameter(p0.clone())
    opt = torch.optim.Adam([p], **opts)
    ns = NarrowOptimizerState(opt, chunk_numel=1000, fused=False)  # eager: torch's ops; many chunks
    assert ns.set_formats({p: spec})[p] == mf.name
    for g in _grads(shape, 4, seed=1, scale=1e-2):
        oracle.step(g)
        p.grad = g.clone()
        ns.step()
        assert _same(p.detach(), oracle.p.detach())
        held = ns._packs(p, opt.state[p], mf)
        assert torch.equal(unpack(held["exp_avg"]).nan_to_num(), unpack(oracle.m).nan_to_num())
        assert torch.equal(unpack(held["exp_avg_sq"]), unpack(oracle.v))
        assert p.grad is not None  # given back after the step


def test_the_first_step_is_the_fp32_step_for_every_format():
    """The moments start at zero, which every format holds exactly: step 1 cannot differ."""
    p0 = torch.randn(64, 100)
    g = torch.randn(64, 100)
    ref = nn.Parameter(p0.clone())
    o = torch.optim.AdamW([ref], lr=1e-2)
    ref.grad = g
    o.step()
    for spec in NARROW:
        p = nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([p], lr=1e-2)
        ns = NarrowOptimizerState(opt, fused=False)  # torch's own ops (the fused kernel: its own test)
        ns.set_formats({p: spec})
        p.grad = g.clone()
        ns.step()
        assert _same(p.detach(), ref.detach()), spec


@pytest.mark.parametrize("spec", ["int8", "int8/row", "fp8_e4m3", "int4"])
def test_chunk_size_does_not_change_a_bit(spec):
    outs = []
    for chunk in (256, 1 << 20):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(200, 300))
        opt = torch.optim.Adam([p], lr=1e-2)
        ns = NarrowOptimizerState(opt, chunk_numel=chunk)
        ns.set_formats({p: spec})
        for g in _grads(p.shape, 3):
            p.grad = g
            ns.step()
        outs.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    assert _same(outs[0][0], outs[1][0])
    assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])


def test_sgd_momentum_narrow_is_unpack_torch_step_pack():
    p0 = torch.randn(70, 90)
    p, q = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    opt = torch.optim.SGD([p], lr=0.05, momentum=0.9, nesterov=True)
    ref = torch.optim.SGD([q], lr=0.05, momentum=0.9, nesterov=True, foreach=False)
    ns = NarrowOptimizerState(opt)
    ns.set_formats({p: "int8"})
    buf = None
    for g in _grads(p.shape, 4, scale=0.1):
        if buf is not None:
            ref.state[q]["momentum_buffer"] = unpack(buf)
        q.grad = g.clone()
        ref.step()
        buf = pack(ref.state[q]["momentum_buffer"], moment_formats("int8").first)
        p.grad = g.clone()
        ns.step()
        assert _same(p.detach(), q.detach())
    assert "momentum_buffer" not in opt.state[p] and "adaprec_momentum_buffer_codes" in opt.state[p]


def test_plain_sgd_keeps_nothing_and_narrow_is_a_no_op():
    a, b = _mlp(), _mlp()
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    ns = NarrowOptimizerState(ob)
    ns.set_formats({p: "int8" for p in b.parameters()})
    _train(a, oa.step, oa, 3)
    _train(b, ns.step, ob, 3)
    assert all(_same(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert ns.nbytes() == {} and not ob.state


# ---------------------------------------------------------------- each format tracks fp32 within its error

def _track(spec, seed: int, rows: int = 64, lr: float = 1e-3, steps: int = 12) -> float:
    """|narrow - fp32| / |fp32 - start| after Adam steps on a quadratic pull plus noise of mixed magnitude.

    The noise spans several decades within each block (exp of a normal with
    sd 2), as gradients of rarely-active features do: the hard case for a
    block-scaled 8-bit code.
    """
    p0 = torch.randn(rows, 257, generator=torch.Generator().manual_seed(seed))
    ref, p = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    oref, opt = torch.optim.Adam([ref], lr=lr), torch.optim.Adam([p], lr=lr)
    ns = NarrowOptimizerState(opt)
    ns.set_formats({p: spec})
    target = torch.randn(rows, 257, generator=torch.Generator().manual_seed(seed + 1))
    noise = _grads(p0.shape, steps, seed=seed, scale=0.05)
    for i in range(steps):
        for w, s in ((ref, oref.step), (p, ns.step)):
            w.grad = (w.detach() - target) + noise[i]
            s()
    return float((p.detach() - ref.detach()).norm() / (ref.detach() - p0).norm())


# measured on this problem (docs/memory.md): bf16 0.14 %, fp16 0.02 %, int8 2.8 %, fp8_e4m3 3 %,
# fp8_e5m2 6.5 %, int4 29 %; the bounds leave about 2x
TRACK = {"bf16": 0.005, "fp16": 0.002, "int8": 0.06, "int8/row": 0.08, "fp8_e4m3": 0.06, "fp8_e5m2": 0.15,
         "int4": 0.6}


@pytest.mark.parametrize("spec", list(TRACK))
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(16, 80), lr=st.sampled_from([1e-3, 1e-2]))
def test_narrow_trajectory_stays_within_the_formats_error_of_fp32(spec, seed, rows, lr):
    """Relative to how far fp32 Adam moved the weights, the narrow run's distance from it stays small."""
    assert _track(spec, seed, rows, lr) <= TRACK[spec]


def test_a_linear_8_bit_second_moment_flushes_and_explodes_where_the_default_does_not():
    """Why v takes fp8 codes with the sqrt map: a linear 8-bit block (even of sqrt(v)) rounds its small
    second moments to zero, and m / (sqrt(v) + eps) then takes steps of lr * m / eps."""
    linear = max(_track(("int8/sqrt", "uint8/sqrt"), seed) for seed in range(2))
    default = max(_track("int8", seed) for seed in range(2))
    assert default < 0.06 < 0.5 < linear


# ---------------------------------------------------------------- which tensors go narrow

def test_small_tensors_and_embeddings_stay_fp32_unless_asked():
    model = nn.ModuleDict({"emb": nn.Embedding(1000, 64), "lin": nn.Linear(64, 64), "ln": nn.LayerNorm(64)})
    opt = torch.optim.AdamW(model.parameters())
    ns = NarrowOptimizerState(opt, model=model)
    got = ns.set_formats({p: "int8" for p in model.parameters()})
    names = {n: got[p] for n, p in model.named_parameters()}
    assert names == {"emb.weight": "fp32", "lin.weight": "int8/block256", "lin.bias": "fp32",
                     "ln.weight": "fp32", "ln.bias": "fp32"}
    ns2 = NarrowOptimizerState(torch.optim.AdamW(model.parameters()), model=model, min_numel=0,
                               keep_embeddings_fp32=False)
    assert set(ns2.set_formats({p: "int8" for p in model.parameters()}).values()) == {"int8/block256"}


# ---------------------------------------------------------------- bytes

def test_nbytes_are_the_bytes_the_state_holds():
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 300))
    opt = torch.optim.Adam(model.parameters())
    ns = NarrowOptimizerState(opt)
    ns.set_formats({model[0].weight: "int8", model[1].weight: "bf16"})
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    ns.step()
    tag_int8 = len(b"int8/block256|int8/block256/sqrt|fp8_e4m3/block256/sqrt")
    n0 = 512 * 512
    step_bytes = 4
    assert ns.nbytes()["int8/block256"] == storage_nbytes("int8", n0) + storage_nbytes("fp8_e4m3", n0) \
        + tag_int8 + step_bytes
    assert ns.nbytes()["bf16"] == 2 * storage_nbytes("bf16", 512 * 300) + len(b"bf16|bf16|bf16") + step_bytes
    assert ns.nbytes()["fp32"] == 2 * 4 * (512 + 300) + 2 * step_bytes
    assert moment_formats("int8").nbytes(n0) + tag_int8 + step_bytes == ns.nbytes()["int8/block256"]
    assert moment_formats("int4").nbytes(1024) == 512 + 8 * 4 + 1024 + 8 * 4
    assert moment_formats("bf16").nbytes(10, amsgrad=True) == 60
    fp32_equivalent = 2 * 4 * n0
    assert ns.nbytes()["int8/block256"] < 0.26 * fp32_equivalent


# ---------------------------------------------------------------- format changes and state dicts

def test_switching_formats_keeps_the_moments_within_the_new_formats_error():
    p = nn.Parameter(torch.randn(128, 256))
    opt = torch.optim.Adam([p], lr=1e-2)
    ns = NarrowOptimizerState(opt)
    for g in _grads(p.shape, 3):
        p.grad = g
        ns.step()
    m32 = opt.state[p]["exp_avg"].clone()
    for spec, tol in (("int8", 0.02), ("bf16", 0.02), ("fp32", 0.02), ("fp8_e4m3", 0.1)):
        ns.set_formats({p: spec})
        m = ns._moments_fp32(p, opt.state[p])["exp_avg"].view_as(p)
        assert (m - m32).norm() <= tol * m32.norm(), spec
        assert ("exp_avg" in opt.state[p]) == (spec == "fp32")
        assert float(opt.state[p]["step"]) == 3
    p.grad = torch.randn_like(p)
    ns.step()
    assert float(opt.state[p]["step"]) == 4


def test_optimizer_state_dict_round_trip_survives_the_dtype_cast_of_load_state_dict():
    """Optimizer.load_state_dict casts floating state to the param's dtype: the narrow state is integers."""
    for spec in ("bf16", "fp8_e4m3", "int8"):
        a = _mlp(dtype=torch.bfloat16)
        oa = torch.optim.AdamW(a.parameters(), lr=1e-3)
        na = NarrowOptimizerState(oa, min_numel=0)
        na.set_formats({p: spec for p in a.parameters()})
        _train(a, na.step, oa, 3)
        buf = io.BytesIO()
        torch.save({"model": a.state_dict(), "opt": oa.state_dict(), "narrow": na.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf)
        b = _mlp(dtype=torch.bfloat16)
        b.load_state_dict(saved["model"])
        ob = torch.optim.AdamW(b.parameters(), lr=1e-3)
        ob.load_state_dict(saved["opt"])
        nb = NarrowOptimizerState(ob)  # the formats come back from the optimizer state alone
        assert nb.formats() == {q: na.formats()[p] for p, q in zip(a.parameters(), b.parameters(), strict=True)}
        nb.load_state_dict(saved["narrow"])
        _train(a, na.step, oa, 2, seed=9)
        _train(b, nb.step, ob, 2, seed=9)
        assert all(_same(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True)), spec


RESUME = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from adaprec.optim import NarrowOptimizerState

    SPECS = ["int8", "fp8_e4m3", "int8/row", "bf16", "int4"]

    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Embedding(50, 96), nn.Flatten(), nn.Linear(96 * 4, 128), nn.GELU(),
                          nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 50))
        o = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1, amsgrad=True)
        n = NarrowOptimizerState(o, model=m)
        weights = [p for p in m.parameters() if p.dim() == 2]
        n.set_formats({p: spec for p, spec in zip(weights, SPECS)})
        return m, o, n

    def train(m, o, n, steps, start):
        g = torch.Generator().manual_seed(start)
        for _ in range(steps):
            x = torch.randint(0, 50, (8, 4), generator=g)
            o.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), x[:, 0]).backward()
            n.step()

    if __name__ == "__main__":
        path = sys.argv[1]
        m, o, n = make()
        ck = torch.load(path)
        m.load_state_dict(ck["model"]); o.load_state_dict(ck["opt"]); n.load_state_dict(ck["narrow"])
        train(m, o, n, 4, 2)
        torch.save([p.detach() for p in m.parameters()], path + ".out")
""")


def test_resume_is_bit_exact_in_a_fresh_process(tmp_path):
    """Save after 4 steps, resume in a new Python process for 4 more: the same bits as 8 steps straight."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME)
    ns: dict = {}
    exec(compile(RESUME, str(script), "exec"), ns)
    m, o, n = ns["make"]()
    ns["train"](m, o, n, 4, 1)
    ck = str(tmp_path / "ck.pt")
    torch.save({"model": m.state_dict(), "opt": o.state_dict(), "narrow": n.state_dict()}, ck)
    ns["train"](m, o, n, 4, 2)  # the uninterrupted run
    subprocess.run([sys.executable, str(script), ck], check=True, capture_output=True)
    resumed = torch.load(ck + ".out")
    assert set(n.formats().values()) == {"fp32", "fp8_e4m3/block256", "int8/row", "bf16", "int4/block128"}
    assert all(_same(a, b) for a, b in zip(m.parameters(), resumed, strict=True))


# ---------------------------------------------------------------- refusals

def test_refusals_name_the_problem_and_the_fix():
    p = nn.Parameter(torch.randn(64, 128))
    with pytest.raises(OptimizerStateError, match="Adam, AdamW and SGD"):
        NarrowOptimizerState(torch.optim.RMSprop([p]))
    opt = torch.optim.Adam([p], differentiable=True)
    with pytest.raises(OptimizerStateError, match="differentiable=False"):
        NarrowOptimizerState(opt).set_formats({p: "int8"})
    ns = NarrowOptimizerState(torch.optim.Adam([p]))
    NarrowOptimizerState(torch.optim.Adam([p])).set_formats({p: "fp32"})  # fp32 needs nothing
    with pytest.raises(FormatSpecError, match="int8/block256"):
        ns.set_formats({p: "int8/tensor"})
    with pytest.raises(OptimizerStateError, match="unsigned"):
        ns.set_formats({p: "uint8"})
    with pytest.raises(OptimizerStateError, match="not in the optimizer"):
        ns.set_formats({nn.Parameter(torch.randn(3)): "int8"})
    with pytest.raises(OptimizerStateError, match="closure"):
        ns.step(closure=lambda: 0.0)
    with pytest.raises(OptimizerStateError, match="min_numel"):
        NarrowOptimizerState(torch.optim.Adam([p]), min_numel=-1)
    with pytest.raises(CheckpointError, match="indices"):
        ns.load_state_dict({"formats": {7: "int8|int8/sqrt|fp8_e4m3/sqrt"}, "min_numel": 0,
                            "keep_embeddings_fp32": True, "chunk_numel": 100})
    with pytest.raises(CheckpointError):
        ns.load_state_dict({"formats": {}})
    for err in (OptimizerStateError, CheckpointError):
        assert issubclass(err, AdaprecError)


def test_a_bad_spec_in_one_parameter_changes_nothing():
    a, b = nn.Parameter(torch.randn(64, 128)), nn.Parameter(torch.randn(64, 128))
    ns = NarrowOptimizerState(torch.optim.Adam([a, b]))
    with pytest.raises(AdaprecError):
        ns.set_formats({a: "int8", b: "int3"})
    assert set(ns.formats().values()) == {"fp32"}


def test_bf16_and_non_contiguous_parameters():
    w = torch.randn(128, 64)
    p = nn.Parameter(w.t())  # a non-contiguous parameter
    q = nn.Parameter(w.t().contiguous())
    op, oq = torch.optim.Adam([p], lr=1e-2), torch.optim.Adam([q], lr=1e-2)
    np_, nq = NarrowOptimizerState(op), NarrowOptimizerState(oq)
    np_.set_formats({p: "int8"})
    nq.set_formats({q: "int8"})
    for g in _grads(q.shape, 3):
        p.grad, q.grad = g.clone(), g.clone()
        np_.step()
        nq.step()
    assert not p.is_contiguous() and torch.equal(p.detach(), q.detach())
    r = nn.Parameter(torch.randn(64, 128).bfloat16())
    o = torch.optim.Adam([r], lr=1e-2)
    n = NarrowOptimizerState(o)
    n.set_formats({r: "int8"})
    before = r.detach().clone()
    r.grad = torch.ones_like(r)
    n.step()
    assert r.dtype == torch.bfloat16 and math.isclose(float((before - r.detach()).float().mean()), 1e-2, rel_tol=0.02)
