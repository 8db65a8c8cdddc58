"""adaprec.hardware: flag decisions, honest measurements, fast formats, the cache.

Fast: every probe here uses sweep="quick" (or "none") and a tmp cache dir.
Nothing depends on a GPU; the CUDA rules are tested as pure functions.
Speedups are whatever this machine measures; the tests check the invariants
that must hold on any machine, never a figure.
"""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from adaprec.errors import AdaprecError
from adaprec.hardware import (
    FAST_MARGIN,
    FORMATS,
    DeviceReport,
    FormatSupport,
    HardwareError,
    clear_memo,
    cpu_conditional_formats,
    cpu_native_formats,
    cuda_native_formats,
    probe,
    probing,
    read_cpu_info,
    sweep,
)
from adaprec.hardware.flags import CpuInfo, normalize_arch

# ---------------------------------------------------------------- flag sets of real chips

ZEN4 = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"]
ZEN2 = ["avx2", "fma", "f16c"]  # no bf16 units, no VNNI
ALDER_LAKE = ["avx2", "fma", "f16c", "avx_vnni"]
SAPPHIRE_RAPIDS = ZEN4 + ["avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"]
GRANITE_RAPIDS = SAPPHIRE_RAPIDS + ["amx_fp16"]
OLD_X86 = ["sse4_2", "avx"]
GRAVITON3 = ["asimd", "asimddp", "i8mm", "bf16", "fphp", "asimdhp", "sve"]
GRAVITON2 = ["asimd", "asimddp", "fphp", "asimdhp"]


def native(flags, arch="x86_64"):
    return {f: ok for f, (ok, _) in cpu_native_formats(flags, arch).items()}


@pytest.fixture(autouse=True)
def _fresh_memo():
    clear_memo()
    yield
    clear_memo()


@pytest.fixture
def quick(tmp_path):
    return probe(sweep="quick", cache_dir=tmp_path)


# ---------------------------------------------------------------- pure decisions


def test_every_decision_covers_every_format():
    for flags, arch in [(ZEN4, "x86_64"), ([], "x86_64"), (GRAVITON3, "aarch64"), ([], "riscv64")]:
        d = cpu_native_formats(flags, arch)
        assert set(d) == set(FORMATS)
        assert all(isinstance(ok, bool) and why for ok, why in d.values())
    for cc in [(6, 1), (7, 0), (7, 5), (8, 0), (8, 9), (9, 0), (10, 0)]:
        assert set(cuda_native_formats(*cc)) == set(FORMATS)


def test_x86_with_bf16_and_vnni_units():
    d = cpu_native_formats(ZEN4, "x86_64")
    assert native(ZEN4) == {
        "fp32": True, "bf16": True, "int8": True, "fp16": False, "fp8_e4m3": False, "fp8_e5m2": False,
    }  # fmt: skip
    assert d["bf16"][1] == "avx512_bf16" and d["int8"][1] == "avx512_vnni"
    assert "avx512_fp16" in d["fp16"][1]
    assert cpu_conditional_formats(ZEN4, "x86_64") == frozenset()


def test_x86_without_bf16_units_and_without_vnni():
    d = cpu_native_formats(ZEN2, "x86_64")
    assert not d["bf16"][0] and "no avx512_bf16" in d["bf16"][1]
    assert not d["int8"][0] and "vpmaddubsw" in d["int8"][1]
    # int8 on AVX2 alone is native only if the sweep measures it faster
    assert cpu_conditional_formats(ZEN2, "x86_64") == frozenset({"int8"})


def test_x86_avx_vnni_and_amx():
    assert native(ALDER_LAKE)["int8"] and not native(ALDER_LAKE)["bf16"]
    assert cpu_conditional_formats(ALDER_LAKE, "x86_64") == frozenset()
    d = cpu_native_formats(SAPPHIRE_RAPIDS, "x86_64")
    assert d["bf16"] == (True, "amx_bf16") and d["int8"] == (True, "amx_int8")
    assert d["fp16"] == (True, "avx512_fp16")
    assert cpu_native_formats(GRANITE_RAPIDS, "x86_64")["fp16"] == (True, "amx_fp16")
    assert cpu_native_formats(["amx_bf16"], "x86_64")["bf16"][0]  # amx alone is enough


def test_x86_without_avx2_has_no_int8_path():
    d = cpu_native_formats(OLD_X86, "x86_64")
    assert not d["int8"][0] and "no AVX2" in d["int8"][1]
    assert cpu_conditional_formats(OLD_X86, "x86_64") == frozenset()


def test_fp8_is_never_native_on_a_cpu():
    for flags, arch in [(GRANITE_RAPIDS, "x86_64"), (GRAVITON3, "aarch64"), (ZEN2, "x86_64")]:
        d = cpu_native_formats(flags, arch)
        for fmt in ("fp8_e4m3", "fp8_e5m2"):
            assert not d[fmt][0] and "software path" in d[fmt][1]


def test_aarch64_flags():
    assert native(GRAVITON3, "aarch64") == {
        "fp32": True, "bf16": True, "int8": True, "fp16": True, "fp8_e4m3": False, "fp8_e5m2": False,
    }  # fmt: skip
    g2 = native(GRAVITON2, "aarch64")
    assert not g2["bf16"] and g2["int8"] and g2["fp16"]
    assert native(["asimd"], "arm64") == {f: f == "fp32" for f in FORMATS}
    assert native(["I8MM"], "aarch64")["int8"]  # flags are case-insensitive
    # x86 flag names mean nothing on arm, and arm's "bf16" means nothing on x86
    assert not native(["avx512_bf16"], "aarch64")["bf16"]
    assert not native(["bf16"], "x86_64")["bf16"]


def test_unknown_architecture_offers_only_fp32():
    d = cpu_native_formats(ZEN4, "riscv64")
    assert {f for f, (ok, _) in d.items() if ok} == {"fp32"}
    assert "riscv64" in d["bf16"][1]


def test_arch_spellings():
    assert normalize_arch("AMD64") == normalize_arch("x86_64") == "x86_64"
    assert normalize_arch("arm64") == normalize_arch("aarch64") == "aarch64"


@pytest.mark.parametrize(
    ("cc", "expect"),
    [
        ((6, 1), {"fp32"}),
        ((7, 0), {"fp32", "fp16"}),
        ((7, 5), {"fp32", "fp16", "int8"}),
        ((8, 0), {"fp32", "fp16", "int8", "bf16"}),
        ((8, 6), {"fp32", "fp16", "int8", "bf16"}),
        ((8, 9), set(FORMATS)),
        ((9, 0), set(FORMATS)),
        ((12, 0), set(FORMATS)),
    ],
)
def test_cuda_capability_rules(cc, expect):
    d = cuda_native_formats(*cc)
    assert {f for f, (ok, _) in d.items() if ok} == expect
    assert "M > 16" in d["int8"][1] and "multiples of 8" in d["int8"][1]
    if not d["fp8_e4m3"][0]:
        assert "sm_89" in d["fp8_e4m3"][1] and f"sm_{cc[0]}{cc[1]}" in d["fp8_e4m3"][1]


def test_read_cpu_info_x86_arm_and_missing(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 avx512_bf16 avx512_vnni ht\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 avx512_bf16 avx512_vnni ht\n"
    )
    info = read_cpu_info(x86)
    assert info.name == "AMD EPYC 9R14"
    assert info.flags == ("avx2", "avx512_bf16", "avx512_vnni")  # only the relevant ones, sorted
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp bf16 i8mm\nCPU part\t: 0xd40\n")
    info = read_cpu_info(arm)
    assert info.flags == ("asimd", "asimddp", "bf16", "i8mm") and "0xd40" in info.name
    info = read_cpu_info(tmp_path / "absent")
    assert info.flags == () and "could not read" in info.note


# ---------------------------------------------------------------- what a probe reports


def test_report_covers_formats_conv_and_attention(quick):
    assert set(quick.formats) == set(FORMATS)
    assert set(quick.conv) == {"fp32", "bf16"}
    assert set(quick.attention) == {"fp32", "bf16"}  # fp16 attention is asked of CUDA devices only
    assert quick.attention["fp32"].native and quick.attention["fp32"].speedup == 1.0
    for fmt, fs in quick.attention.items():
        assert fs.format == fmt and fs.reason and "scaled_dot_product_attention" in fs.kernel
    assert quick.device == "cpu" and quick.sweep == "quick"
    assert quick.threads == torch.get_num_threads()
    assert quick.capability == torch.backends.cpu.get_cpu_capability()
    for fmt, fs in quick.formats.items():
        assert fs.format == fmt and fs.reason and fs.kernel
    assert quick.formats["fp32"].native and quick.formats["fp32"].speedup == 1.0
    for fmt in ("fp8_e4m3", "fp8_e5m2"):
        assert not quick.formats[fmt].native  # a CPU never runs fp8 natively


def _run_kernel(fmt: str) -> None:
    """Run ``fmt``'s kernel on small tensors, written here independently of the sweep."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 64, generator=g), torch.randn(64, 32, generator=g)
    if fmt in ("fp32", "bf16", "fp16"):
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[fmt]
        ad, bd = a.to(dt), b.to(dt)
        out = torch.mm(ad, bd)
        assert out.dtype == dt
        ref = ad.double() @ bd.double()
        assert ((out.double() - ref).abs() <= 8 * torch.finfo(dt).eps * (ad.double().abs() @ bd.double().abs())).all()
    elif fmt == "int8":
        ai = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
        bi = torch.randint(-127, 128, (64, 32), generator=g, dtype=torch.int8)
        out = torch._int_mm(ai, bi)
        assert out.dtype == torch.int32
        assert torch.equal(out.long(), ai.long() @ bi.long())
    else:
        dt = torch.float8_e4m3fn if fmt == "fp8_e4m3" else torch.float8_e5m2
        one = torch.tensor(1.0)
        out = torch._scaled_mm(a.to(dt), b.to(torch.float8_e4m3fn).t().contiguous().t(), one, one,
                               out_dtype=torch.bfloat16)  # fmt: skip
        assert torch.isfinite(out).all()


def test_every_native_format_really_runs(quick):
    natives = [f for f, fs in quick.formats.items() if fs.native]
    assert "fp32" in natives
    for fmt in natives:
        _run_kernel(fmt)
    if quick.conv["bf16"].native:
        x = torch.randn(1, 4, 6, 6, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(4, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
        torch.nn.functional.conv2d(x, w, padding=1).sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    natives = [f for f, fs in quick.attention.items() if fs.native]
    assert "fp32" in natives
    for fmt in natives:
        _run_attention(fmt)


def _run_attention(fmt: str) -> None:
    """Causal SDPA forward and backward in ``fmt``, against attention written out in float64 here."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[fmt]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g).to(dt).requires_grad_() for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == dt
    out.sum().backward()
    qd, kd, vd = (t.detach().double() for t in (q, k, v))
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    scores = (qd @ kd.transpose(-2, -1) / 4.0).masked_fill(~causal, -math.inf)
    ref = scores.softmax(-1) @ vd
    assert float((out.detach().double() - ref).abs().max()) <= 8 * torch.finfo(dt).eps * float(vd.abs().max())
    assert all(torch.isfinite(t.grad).all() and t.grad.dtype == dt for t in (q, k, v))


def test_native_flags_agree_with_this_machine(quick):
    """What the report calls native is what the flag rules say, unless the kernel failed (then it says so)."""
    info = read_cpu_info()
    rules = cpu_native_formats(info.flags, info.arch)
    conditional = cpu_conditional_formats(info.flags, info.arch)
    for fmt, fs in quick.formats.items():
        if fmt in conditional:
            assert fs.native == (fs.speedup is not None and fs.speedup >= FAST_MARGIN)
        elif fs.native != rules[fmt][0]:
            assert rules[fmt][0] and "flags say native" in fs.reason


def _table(report, op):
    return {"gemm": report.formats, "conv": report.conv, "attention": report.attention}[op]


def test_fast_formats_are_native_measured_faster_and_ordered(quick):
    for op in ("gemm", "conv", "attention"):
        fast = quick.fast_formats(op)
        assert fast[-1] == "fp32"
        table = _table(quick, op)
        for fmt in fast[:-1]:
            assert table[fmt].native and table[fmt].speedup >= FAST_MARGIN
        assert list(fast) == [f for f in FORMATS if f in fast]  # cheapest first
        for fmt, fs in table.items():  # and nothing that qualifies is left out
            if fmt != "fp32" and fs.native and fs.speedup is not None and fs.speedup >= FAST_MARGIN:
                assert fmt in fast


def test_speedups_are_positive_finite_and_reasons_say_measured(quick):
    for fs in [*quick.formats.values(), *quick.conv.values(), *quick.attention.values()]:
        if fs.speedup is not None:
            assert math.isfinite(fs.speedup) and fs.speedup > 0
            if fs.format != "fp32":
                assert f"measured {fs.speedup:.2f}x fp32" in fs.reason


def test_sweep_none_checks_kernels_but_offers_only_fp32(tmp_path):
    r = probe(sweep="none", cache_dir=tmp_path)
    assert all(fs.speedup is None for fs in r.formats.values())
    assert r.fast_formats() == ("fp32",) and r.fast_formats("conv") == ("fp32",)
    assert r.fast_formats("attention") == ("fp32",)
    assert all(fs.speedup is None for fs in r.attention.values())
    for table in (r.formats, r.attention):
        assert all("not timed" in fs.reason for f, fs in table.items() if f != "fp32" and fs.native)


def test_is_native_and_bad_arguments(quick):
    assert quick.is_native("fp32") and quick.is_native("fp32", op="conv")
    assert quick.is_native("fp32", op="attention")
    assert quick.is_native("bf16", "attention") == quick.attention["bf16"].native
    assert not quick.is_native("fp8_e4m3")
    assert not quick.is_native("fp4")  # a format the report does not list is not native
    assert not quick.is_native("int8", "attention")  # attention is not measured in int8
    for bad in ("softmax", "ATTENTION"):
        with pytest.raises(HardwareError, match="unknown op"):
            quick.fast_formats(bad)
    with pytest.raises(HardwareError, match="unknown op"):
        quick.is_native("bf16", "sdpa")
    with pytest.raises(HardwareError, match="unknown sweep"):
        probe(sweep="long")
    assert issubclass(HardwareError, AdaprecError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(HardwareError, match="cuda.is_available"):
        probe("cuda", sweep="none")


def test_table_names_every_format(quick):
    text = quick.table()
    for fmt in FORMATS:
        assert f"| {fmt} |" in text
    assert "GEMM speed vs fp32" in text and "conv2d fwd+bwd speed vs fp32" in text
    assert "attention fwd+bwd speed vs fp32" in text
    assert f"fast here (attention): {', '.join(quick.fast_formats('attention'))}" in text
    assert quick.name in text
    assert text.count("| format | native? | kernel |") == 3


def test_report_is_read_only(quick):
    with pytest.raises(TypeError):
        quick.formats["bf16"] = quick.formats["fp32"]  # type: ignore[index]
    with pytest.raises(TypeError):
        quick.attention["bf16"] = quick.attention["fp32"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        quick.device = "cuda:0"  # type: ignore[misc]


def test_to_dict_from_dict_round_trip(quick):
    d = quick.to_dict()
    back = DeviceReport.from_dict(json.loads(json.dumps(d)))
    assert back == quick and back.to_dict() == d
    assert back.fast_formats() == quick.fast_formats() and back.table() == quick.table()
    assert back.attention == quick.attention
    assert back.fast_formats("attention") == quick.fast_formats("attention")
    with pytest.raises(HardwareError):
        DeviceReport.from_dict({**d, "schema": 99})
    older = {k: v for k, v in d.items() if k != "attention"}
    with pytest.raises(HardwareError, match="attention"):  # written before attention was measured
        DeviceReport.from_dict(older)
    with pytest.raises(HardwareError, match="schema 1"):
        DeviceReport.from_dict({**older, "schema": 1})
    with pytest.raises(HardwareError):
        DeviceReport.from_dict({**d, "attention": [1, 2]})
    with pytest.raises(HardwareError):
        DeviceReport.from_dict({**d, "formats": {"bf16": {"format": "bf16"}}})
    with pytest.raises(HardwareError):
        DeviceReport.from_dict([1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------- verdicts from measurements


def _fake_sweep(
    speedups: dict[str, float],
    errors: dict[str, str] | None = None,
    conv_bf16: float = 1.5,
    attention_bf16: float = 1.5,
    attention_errors: dict[str, str] | None = None,
):
    errors = errors or {}

    def m(fmt, s, errs=errors, kernel="k"):
        err = errs.get(fmt, "")
        return sweep.Measurement(fmt, kernel, not err, err, None if err else s, 1, 1, 3, False, 10.0, 1.0)

    def run(device, kind):
        gemm = {f: m(f, speedups.get(f, 1.0)) for f in sweep.GEMM_FORMATS}
        gemm["fp32"] = m("fp32", 1.0)
        conv = {"fp32": m("fp32", 1.0), "bf16": m("bf16", conv_bf16)}
        attn = {"fp32": m("fp32", 1.0), "bf16": m("bf16", attention_bf16, attention_errors or {})}
        return sweep.SweepResult(gemm=gemm, conv=conv, kind=kind, attention=attn)

    return run


def test_native_but_slower_stays_native_and_is_not_offered(monkeypatch, tmp_path):
    monkeypatch.setattr(probing, "_cpu_info", lambda: CpuInfo("fake Zen 4", "x86_64", tuple(sorted(ZEN4))))
    monkeypatch.setattr(sweep, "run", _fake_sweep({"bf16": 0.6, "int8": 2.0, "fp16": 3.0}, conv_bf16=1.05))
    r = probe(sweep="quick", cache_dir=tmp_path)
    bf16 = r.formats["bf16"]
    assert bf16.native and "measured 0.60x fp32" in bf16.reason and "slower than fp32" in bf16.reason
    assert r.fast_formats() == ("int8", "fp32")  # fp16 measured fast, but this CPU has no fp16 units
    assert not r.formats["fp16"].native
    assert r.conv["bf16"].native and "within the 1.1x margin" in r.conv["bf16"].reason
    assert r.fast_formats("conv") == ("fp32",)


def test_attention_has_its_own_verdict(monkeypatch, tmp_path):
    """bf16 GEMMs fast but bf16 attention not (as on a Zen 4 CPU): only the GEMM offers bf16."""
    monkeypatch.setattr(probing, "_cpu_info", lambda: CpuInfo("fake Zen 4", "x86_64", tuple(sorted(ZEN4))))
    monkeypatch.setattr(sweep, "run", _fake_sweep({"bf16": 2.1, "int8": 3.0}, attention_bf16=0.97))
    r = probe(sweep="quick", cache_dir=tmp_path)
    assert r.fast_formats() == ("int8", "bf16", "fp32") and r.fast_formats("conv") == ("bf16", "fp32")
    assert r.fast_formats("attention") == ("fp32",)
    bf16 = r.attention["bf16"]
    assert bf16.native and r.is_native("bf16", "attention") and bf16.speedup == 0.97
    assert "measured 0.97x fp32" in bf16.reason and "slower than fp32" in bf16.reason


def test_attention_verdicts_follow_the_flags_and_the_check(monkeypatch, tmp_path):
    monkeypatch.setattr(probing, "_cpu_info", lambda: CpuInfo("fake Zen 2", "x86_64", tuple(sorted(ZEN2))))
    monkeypatch.setattr(sweep, "run", _fake_sweep({}, attention_bf16=1.6))
    r = probe(sweep="quick", cache_dir=tmp_path)
    assert not r.attention["bf16"].native and "no avx512_bf16" in r.attention["bf16"].reason
    assert r.fast_formats("attention") == ("fp32",)  # no bf16 units: not offered, however measured
    clear_memo()
    monkeypatch.setattr(probing, "_cpu_info", lambda: CpuInfo("fake Zen 4", "x86_64", tuple(sorted(ZEN4))))
    err = "F.scaled_dot_product_attention(bfloat16, causal) fwd+bwd forward is wrong: relative error 0.3"
    monkeypatch.setattr(sweep, "run", _fake_sweep({}, attention_errors={"bf16": err}))
    r = probe(sweep="quick", cache_dir=tmp_path / "other")
    assert not r.attention["bf16"].native and r.attention["bf16"].speedup is None
    why = r.attention["bf16"].reason
    assert "flags say native (avx512_bf16)" in why and err in why
    assert r.fast_formats("attention") == ("fp32",)


def test_kernel_that_fails_is_not_native(monkeypatch, tmp_path):
    monkeypatch.setattr(probing, "_cpu_info", lambda: CpuInfo("fake Zen 4", "x86_64", tuple(sorted(ZEN4))))
    err = "torch._int_mm differs from the exact int32 product in 3 entries"
    monkeypatch.setattr(sweep, "run", _fake_sweep({"bf16": 2.0, "int8": 3.0}, errors={"int8": err}))
    r = probe(sweep="quick", cache_dir=tmp_path)
    assert not r.formats["int8"].native and r.formats["int8"].speedup is None
    assert "flags say native (avx512_vnni)" in r.formats["int8"].reason and err in r.formats["int8"].reason
    assert r.fast_formats() == ("bf16", "fp32")


@pytest.mark.parametrize(("speed", "is_native"), [(1.5, True), (0.8, False)])
def test_avx2_int8_is_native_only_when_measured_faster(monkeypatch, tmp_path, speed, is_native):
    monkeypatch.setattr(probing, "_cpu_info", lambda: CpuInfo("fake Zen 2", "x86_64", tuple(sorted(ZEN2))))
    monkeypatch.setattr(sweep, "run", _fake_sweep({"int8": speed, "bf16": 0.5}))
    r = probe(sweep="quick", cache_dir=tmp_path)
    assert r.formats["int8"].native is is_native
    assert "vpmaddubsw" in r.formats["int8"].reason
    assert ("int8" in r.fast_formats()) is is_native
    assert not r.formats["bf16"].native  # no bf16 units: never offered, however measured


def test_sweep_really_checks_kernels_on_this_machine():
    """The real sweep functions on this CPU: fp32/bf16/int8 kernels pass their correctness checks."""
    dev = torch.device("cpu")
    for fmt in ("fp32", "bf16", "int8"):
        assert sweep._check_gemm(fmt, dev) == ""
    assert sweep._check_conv("fp32", dev) == ""
    for fmt in ("fp32", "bf16"):  # bf16 attention computes correctly on any CPU, with or without bf16 units
        err, backend = sweep._check_attention(fmt, dev)
        assert err == "" and backend


def test_attention_formats_and_shapes():
    assert sweep.attention_formats("cpu") == ("fp32", "bf16")
    assert sweep.attention_formats("cuda") == ("fp32", "bf16", "fp16")
    for dev in ("cpu", "cuda"):
        assert sweep.attention_shape(dev, "none") is None
        quick_shape, full = sweep.attention_shape(dev, "quick"), sweep.attention_shape(dev, "full")
        assert len(quick_shape) == len(full) == 4 and math.prod(quick_shape) < math.prod(full)
    # a longer sequence on a GPU
    assert sweep.attention_shape("cuda", "full")[2] > sweep.attention_shape("cpu", "full")[2]


def test_attention_backend_is_named_from_the_autograd_node():
    def out(node_class_name):
        return types.SimpleNamespace(grad_fn=type(node_class_name, (), {})())

    name = sweep._attention_backend
    assert name(out("ScaledDotProductFlashAttentionForCpuBackward0")) == "flash_attention_for_cpu"
    assert name(out("ScaledDotProductEfficientAttentionBackward0")) == "efficient_attention"
    assert sweep._attention_backend(out("ScaledDotProductCudnnAttentionBackward0")) == "cudnn_attention"
    assert sweep._attention_backend(out("UnsafeViewBackward0")) == "math"  # the decomposed fallback
    assert sweep._attention_backend(types.SimpleNamespace(grad_fn=None)) == "math"


def test_wrong_attention_forward_or_gradient_is_caught(monkeypatch):
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: real(q, k, v, **kw) * 1.25)
    for fmt in ("fp32", "bf16"):
        err, _ = sweep._check_attention(fmt, torch.device("cpu"))
        assert "forward is wrong" in err
    # right values, wrong gradient: v's gradient gets half the output gradient extra
    def wrong_grad(q, k, v, **kw):
        return real(q, k, v, **kw) + (v - v.detach()) / 2

    monkeypatch.setattr(F, "scaled_dot_product_attention", wrong_grad)
    m = sweep.run_attention(torch.device("cpu"), "none")
    assert not m["fp32"].ok and "gradient of v" in m["fp32"].error
    assert all(x.speedup is None and x.shapes_total == 0 for x in m.values())


def test_attention_raising_during_timing_is_not_native(monkeypatch):
    real = sweep._attention_operands

    def ops(fmt, shape, device, seed):
        call, tensors = real(fmt, shape, device, seed)
        if fmt == "bf16" and shape != sweep._ATTENTION_CHECK_SHAPE:

            def call():
                raise RuntimeError("no kernel for this shape")

        return call, tensors

    monkeypatch.setattr(sweep, "_attention_operands", ops)
    m = sweep.run_attention(torch.device("cpu"), "quick")
    assert not m["bf16"].ok and m["bf16"].speedup is None
    assert "failed on shape" in m["bf16"].error and "no kernel for this shape" in m["bf16"].error
    assert m["fp32"].ok and m["fp32"].speedup == 1.0 and m["fp32"].gflops > 0


def _patched_operands(monkeypatch, fmt, make):
    real = sweep._gemm_operands

    def ops(f, a, b):
        call, aq, bq = real(f, a, b)
        return (make(call, a) if f == fmt else call), aq, bq

    monkeypatch.setattr(sweep, "_gemm_operands", ops)


def test_wrong_int8_result_is_caught(monkeypatch):
    _patched_operands(monkeypatch, "int8", lambda call, a: (lambda: call() + 1))
    m = sweep.run_gemm(torch.device("cpu"), "none", ("fp32", "int8"))
    assert not m["int8"].ok and "differs from the exact int32 product" in m["int8"].error
    assert m["fp32"].ok


def test_wrong_bf16_result_is_caught(monkeypatch):
    _patched_operands(monkeypatch, "bf16", lambda call, a: (lambda: call() * 1.25))
    m = sweep.run_gemm(torch.device("cpu"), "none", ("fp32", "bf16"))
    assert not m["bf16"].ok and "is wrong" in m["bf16"].error


def test_kernel_raising_during_timing_is_not_native(monkeypatch):
    def make(call, a):
        def run():
            if a.shape[0] > sweep._CHECK_SHAPE[0]:  # passes the small check, fails on the sweep shape
                raise RuntimeError("shape not supported by this kernel")
            return call()

        return run

    _patched_operands(monkeypatch, "bf16", make)
    m = sweep.run_gemm(torch.device("cpu"), "quick", ("fp32", "bf16", "int8"))
    assert not m["bf16"].ok and m["bf16"].speedup is None
    assert "failed on shape" in m["bf16"].error and "shape not supported" in m["bf16"].error
    assert m["int8"].ok and m["int8"].speedup is not None  # the others are still measured


# ---------------------------------------------------------------- the cache


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = sweep.run

    def run(device, kind):
        calls.append(kind)
        return real(device, kind)

    monkeypatch.setattr(sweep, "run", run)
    return calls


def _cache_files(d):
    return sorted(p.name for p in d.iterdir())


def test_cache_round_trip_memo_and_refresh(counted, tmp_path):
    first = probe(sweep="quick", cache_dir=tmp_path)
    assert counted == ["quick"]
    assert probe(sweep="quick", cache_dir=tmp_path) is first  # in-process memo: free
    clear_memo()
    second = probe(sweep="quick", cache_dir=tmp_path)  # from disk, not measured
    assert counted == ["quick"] and second == first
    third = probe(sweep="quick", cache_dir=tmp_path, refresh=True)
    assert counted == ["quick", "quick"] and third.measured_at >= first.measured_at
    assert probe(sweep="quick", cache_dir=tmp_path) is third  # refresh replaced the memo
    files = _cache_files(tmp_path)
    assert len(files) == 1 and files[0].startswith("hardware-") and files[0].endswith(".json")


def test_sweep_kinds_are_cached_apart(counted, tmp_path):
    probe(sweep="quick", cache_dir=tmp_path)
    probe(sweep="none", cache_dir=tmp_path)
    assert counted == ["quick", "none"] and len(_cache_files(tmp_path)) == 2


def test_cache_key_changes_with_threads(counted, tmp_path):
    n = torch.get_num_threads()
    probe(sweep="none", cache_dir=tmp_path)
    try:
        torch.set_num_threads(1 if n > 1 else 2)
        r = probe(sweep="none", cache_dir=tmp_path)
    finally:
        torch.set_num_threads(n)
    assert counted == ["none", "none"] and r.threads != n


def test_corrupt_cache_file_is_ignored_and_replaced(counted, tmp_path):
    probe(sweep="quick", cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_text("{ not json")
    clear_memo()
    r = probe(sweep="quick", cache_dir=tmp_path)
    assert counted == ["quick", "quick"]
    data = json.loads(path.read_text())  # rewritten whole
    assert DeviceReport.from_dict(data["report"]) == r
    assert _cache_files(tmp_path) == [path.name]  # no temporary files left behind


def test_foreign_cache_file_is_ignored_and_replaced(counted, tmp_path):
    probe(sweep="quick", cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    data = json.loads(path.read_text())
    data["key"]["machine"] = "some other CPU"
    data["report"]["formats"]["bf16"]["reason"] = "from another machine"
    path.write_text(json.dumps(data))
    clear_memo()
    r = probe(sweep="quick", cache_dir=tmp_path)
    assert counted == ["quick", "quick"] and r.formats["bf16"].reason != "from another machine"
    assert json.loads(path.read_text())["key"]["machine"] == r.name


def test_cache_dir_from_environment(counted, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPREC_CACHE_DIR", str(tmp_path / "env"))
    probe(sweep="none")
    assert len(_cache_files(tmp_path / "env")) == 1


def test_unwritable_cache_warns_and_still_reports(counted, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache directory should be
    with pytest.warns(RuntimeWarning, match="could not cache"):
        r = probe(sweep="none", cache_dir=blocker / "sub")
    assert isinstance(r, DeviceReport) and r.formats["fp32"].native


def test_cache_written_before_attention_is_measured_again(counted, tmp_path):
    """A cache file without attention verdicts (an older adaprec) is stale: measured again, not a crash."""
    probe(sweep="quick", cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    data = json.loads(path.read_text())
    assert "attention" in data["key"]["ops"] and data["key"]["schema"] == data["schema"]
    del data["report"]["attention"]  # same key, but the report lacks the field
    path.write_text(json.dumps(data))
    clear_memo()
    r = probe(sweep="quick", cache_dir=tmp_path)
    assert counted == ["quick", "quick"] and set(r.attention) == {"fp32", "bf16"}
    assert "attention" in json.loads(path.read_text())["report"]  # rewritten whole
    # a file as schema 1 wrote it, found under the name the current key hashes to
    old = json.loads(path.read_text())
    old["schema"] = old["report"]["schema"] = 1
    del old["report"]["attention"]
    path.write_text(json.dumps(old))
    clear_memo()
    probe(sweep="quick", cache_dir=tmp_path)
    assert counted == ["quick", "quick", "quick"]
    # and the old key names another file, so an old file is never even read
    old_key = {k: v for k, v in old["key"].items() if k != "ops"}
    old_key["schema"] = 1
    assert probing._cache.cache_path(tmp_path, old_key) != path


def test_format_support_round_trip():
    fs = FormatSupport("int8", True, "torch._int_mm", 2.5, "avx512_vnni; measured 2.50x fp32")
    assert FormatSupport.from_dict(fs.to_dict()) == fs
    with pytest.raises(HardwareError):
        FormatSupport.from_dict({**fs.to_dict(), "native": "yes"})
