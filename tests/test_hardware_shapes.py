"""adaprec.hardware.shapes: per-shape GEMM measurements, their cache and replay, and the decisions on them.

Fast: timing is driven by a deterministic fake timer (no figure of this
machine is asserted); the one real measurement uses a tiny shape and checks
only what must hold anywhere.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from adaprec.engine.ops import describe
from adaprec.errors import AdaprecError
from adaprec.hardware import DeviceReport, FormatSupport, HardwareError, shapes
from adaprec.hardware.shapes import (
    PAY_MARGIN,
    FormatTiming,
    GemmShape,
    ShapeTable,
    ShapeTiming,
    formats_by_module,
    formats_that_pay,
    linear_gemms,
    measure_gemms,
    pays,
)


@pytest.fixture(autouse=True)
def _fresh_memo():
    shapes.clear_memo()
    yield
    shapes.clear_memo()


# ---------------------------------------------------------------- the shapes autograd really runs


class _MMs(TorchDispatchMode):
    """Records (m, k, n, A read transposed, B read transposed) of every aten.mm / aten.addmm."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int, int, bool, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm):
            a, b = (args[0], args[1]) if packet is torch.ops.aten.mm else (args[1], args[2])
            self.seen.append((a.shape[0], a.shape[1], b.shape[1], _transposed(a), _transposed(b)))
        return func(*args, **(kwargs or {}))


def _transposed(t: torch.Tensor) -> bool:
    return t.stride(0) == 1 and t.stride(1) != 1


def _layout(s: GemmShape) -> tuple[int, int, int, bool, bool]:
    at, bt, _, _ = shapes._LAYOUT[s.gemm]
    return (s.m, s.k, s.n, at, bt)


@pytest.mark.parametrize("x_grad, w_grad", [(True, True), (False, True), (True, False)])
def test_linear_gemms_are_the_gemms_autograd_runs(x_grad, w_grad):
    torch.manual_seed(0)
    batch, seq, k, n = 3, 5, 12, 7
    lin = torch.nn.Linear(k, n)
    lin.weight.requires_grad_(w_grad)
    x = torch.randn(batch, seq, k, requires_grad=x_grad)
    mode = _MMs()
    with mode:
        lin(x).square().sum().backward()
    derived = linear_gemms(batch * seq, k, n, input_grad=x_grad, weight_grad=w_grad)
    assert sorted(mode.seen) == sorted(_layout(s) for s in derived)
    # describe() (what the engine sees at discovery) carries the forward GEMM the shapes derive from
    call = describe(F.linear, (x, lin.weight, lin.bias), {})
    assert call.gemms[0].mkn == (batch * seq, k, n)


def test_describe_gives_the_linear_form_of_addmm_and_matmul_with_a_weight():
    w_in_out = torch.nn.Parameter(torch.randn(6, 4))  # HF Conv1D stores W as (in, out)
    x = torch.randn(10, 6)
    assert describe(torch.addmm, (torch.zeros(4), x, w_in_out), {}).gemms[0].mkn == (10, 6, 4)
    assert describe(torch.matmul, (torch.randn(2, 5, 6), w_in_out), {}).gemms[0].mkn == (10, 6, 4)
    assert describe(torch.matmul, (x, x.t()), {}).gemms[0].mkn is None  # no weight: not linear-like


def test_gemm_shape_validation():
    assert GemmShape.of((4, 5, 6)) == GemmShape(4, 5, 6, "forward")
    assert GemmShape.of([4, 5, 6, "weight_grad"]).gemm == "weight_grad"
    for bad in [(4, 5), (4, 0, 6), (4, 5.0, 6), (4, 5, 6, "backward"), "4x5x6"]:
        with pytest.raises(HardwareError) as e:
            GemmShape.of(bad)
        assert isinstance(e.value, AdaprecError)


# ---------------------------------------------------------------- a deterministic fake timer


class FakeTimer:
    """Seconds per call from a rule, no clock; records every (shape, format, number) asked."""

    def __init__(self, speedups, fp32_per_mac: float = 1e-9, check: bool = False) -> None:
        self.speedups = speedups  # (shape, fmt) -> speedup, or a callable of (shape, fmt)
        self.fp32_per_mac = fp32_per_mac
        self.check = check
        self.calls: list[tuple[GemmShape, str, int]] = []
        self.fp32_out: dict[GemmShape, torch.Tensor] = {}

    def __call__(self, run: shapes.GemmRun, number: int) -> float:
        self.calls.append((run.shape, run.format, number))
        if self.check:  # the timed call computes the GEMM: the right size, and close to fp32's product
            out = run()
            assert out.shape == (run.shape.m, run.shape.n) and out.dtype == torch.float32
            ref = self.fp32_out.setdefault(run.shape, out)  # fp32 is timed first at every shape
            assert float((out - ref).norm() / ref.norm()) < 0.03, (run.shape, run.format)
        t32 = run.shape.macs * self.fp32_per_mac
        if run.format == "fp32":
            return t32
        s = self.speedups(run.shape, run.format) if callable(self.speedups) else self.speedups[run.shape, run.format]
        return t32 / s


def _raise(*_a, **_k):
    raise AssertionError("timed although the measurements were saved")


BIG = linear_gemms(256, 128, 384)  # 12.6 M MACs each
SMALL = linear_gemms(32, 16, 48)  # 24.6 k MACs each
MODULES = {"big": BIG, "small": SMALL}
ALL = [*BIG, *SMALL]


def _rule(shape: GemmShape, fmt: str) -> float:
    """int8 pays at the big layer (2.5x), loses at the small one (0.6x); bf16 1.5x forward, 0.9x backward."""
    if fmt == "int8":
        return 2.5 if shape.macs > 1e6 else 0.6
    return 1.5 if shape.gemm == "forward" else 0.9


def _measure(tmp_path, timer, **kw):
    return measure_gemms(ALL, ("int8", "bf16"), "cpu", cache_dir=tmp_path, timer=timer, **kw)


def test_fake_timer_drives_the_decisions(tmp_path):
    timer = FakeTimer(_rule, check=True)
    table = _measure(tmp_path, timer)
    for s in BIG:
        assert table.speedup(s, "int8") == pytest.approx(2.5)
        assert pays(table, s, "int8")
    for s in SMALL:
        assert table.speedup(s, "int8") == pytest.approx(0.6)
        assert not pays(table, s, "int8")
    assert pays(table, BIG[0], "bf16") and not pays(table, BIG[1], "bf16")
    # per module: int8 pays where its GEMMs gain; bf16's forward gain (1/3 of the time) is outweighed
    assert formats_that_pay(table, BIG, ("int8", "bf16")) == {"int8", "fp32"}
    assert formats_that_pay(table, SMALL, ("int8", "bf16")) == {"fp32"}
    assert formats_by_module(table, MODULES, ("int8", "bf16")) == {"big": {"int8", "fp32"}, "small": {"fp32"}}
    # the hardware filter's allowed formats may differ per module (one not named is allowed fp32 only)
    assert formats_by_module(table, MODULES, {"big": ["bf16"]}) == {"big": {"fp32"}, "small": {"fp32"}}
    # fp32 and the three GEMMs of each layer were all timed, each with fp32 beside it
    timed = {(s, f) for s, f, _ in timer.calls}
    assert timed == {(s, f) for s in ALL for f in ("fp32", "int8", "bf16")}
    assert all(n >= 1 for _, _, n in timer.calls)


def test_a_narrow_format_no_faster_than_a_wider_one_that_pays_is_left_out():
    # an AMX Xeon: bf16 GEMMs (6x fp32) outrun int8 (3.3x) with their casts; int8 would add rounding error
    # for a slower step. Where int8 is the faster one (a Zen 4: int8 4.4x, bf16 2.3x) both stay.
    shape = GemmShape(1024, 1024, 1024)

    def table(s_int8, s_bf16):
        fmts = {"int8": FormatTiming(s_int8, 0.010 / s_int8), "bf16": FormatTiming(s_bf16, 0.010 / s_bf16)}
        return ShapeTable([ShapeTiming(shape, 1, 0.010, formats=fmts)], ("int8", "bf16"))

    assert formats_that_pay(table(3.3, 6.0), [shape], ["int8", "bf16"]) == {"bf16", "fp32"}
    assert formats_that_pay(table(4.4, 2.3), [shape], ["int8", "bf16"]) == {"int8", "bf16", "fp32"}
    assert formats_that_pay(table(3.0, 3.0), [shape], ["int8", "bf16"]) == {"bf16", "fp32"}  # a tie: the wider
    # a wider format that does not pay itself removes nothing
    assert formats_that_pay(table(3.0, 0.9), [shape], ["int8", "bf16"]) == {"int8", "fp32"}
    # asked alone, int8 still pays: the comparison is only among the formats the module may take
    assert formats_that_pay(table(3.3, 6.0), [shape], ["int8"]) == {"int8", "fp32"}


def test_module_decision_weighs_its_gemms_by_fp32_time():
    big, small = GemmShape(1024, 1024, 1024), GemmShape(64, 64, 64)

    def table(s_big, s_small):
        rows = [ShapeTiming(big, 1, 0.010, formats={"int8": FormatTiming(s_big, 0.010 / s_big)}),
                ShapeTiming(small, 1, 0.001, formats={"int8": FormatTiming(s_small, 0.001 / s_small)})]
        return ShapeTable(rows, ("int8",))

    # 10 ms at 2x saves 5 ms; 1 ms at 0.5x costs 1 ms: the module gains
    assert formats_that_pay(table(2.0, 0.5), [big, small], ["int8"]) == {"int8", "fp32"}
    # 10 ms at 0.8x costs 2.5 ms; 1 ms at 4x saves 0.75 ms: it loses, though one GEMM is 4x faster
    assert formats_that_pay(table(0.8, 4.0), [big, small], ["int8"]) == {"fp32"}
    # a GEMM the module runs 20 times per step weighs 20 times
    assert formats_that_pay(table(2.0, 0.2), [big, *[small] * 20], ["int8"]) == {"fp32"}
    # with one shape it is pays()
    for s in (0.9, 1.04, 1.06, 3.0):
        assert ("int8" in formats_that_pay(table(s, s), [big], ["int8"])) == pays(table(s, s), big, "int8")
    # a shape without a measurement: the module does not narrow
    assert formats_that_pay(table(2.0, 2.0), [big, GemmShape(7, 7, 7)], ["int8"]) == {"fp32"}
    assert formats_that_pay(table(2.0, 2.0), [], ["int8"]) == {"fp32"}


@settings(max_examples=60, deadline=None)
@given(
    speedup=st.floats(0.01, 20.0),
    margins=st.lists(st.floats(0.5, 5.0), min_size=2, max_size=6),
)
def test_pays_is_monotone_in_the_margin(speedup, margins):
    s = GemmShape(64, 64, 64)
    table = ShapeTable([ShapeTiming(s, 1, 1e-3, formats={"int8": FormatTiming(speedup, 1e-3 / speedup)})], ("int8",))
    verdicts = [pays(table, s, "int8", m) for m in sorted(margins)]
    assert verdicts == sorted(verdicts, reverse=True)  # once it stops paying, a larger margin never pays
    assert verdicts == [speedup > m for m in sorted(margins)]
    assert pays(table, s, "fp32", 100.0)  # fp32 is the reference: always there to fall back to
    assert not pays(table, s, "bf16", 0.01)  # never measured: never narrowed
    assert not pays(table, GemmShape(65, 64, 64), "int8", 0.01)


def test_bad_margin_is_a_clear_error():
    for bad in (0, -1.0, math.inf, math.nan):
        with pytest.raises(HardwareError, match="margin"):
            pays(ShapeTable(), (4, 4, 4), "int8", bad)


# ---------------------------------------------------------------- cache, state_dict and replay


def test_table_round_trips_through_state_dict_and_json(tmp_path):
    table = _measure(tmp_path, FakeTimer(_rule))
    state = json.loads(json.dumps(table.state_dict()))
    again = ShapeTable()
    again.load_state_dict(state)
    assert again == table and again.to_dict() == table.to_dict()
    assert again.rows.keys() == table.rows.keys() and isinstance(next(iter(again.rows)), GemmShape)
    assert again.how["device"] == "cpu" and again.how["threads"] == torch.get_num_threads()
    assert "int8" in again.table() and "256x128x384" in again.table()


def test_replay_gives_the_same_decisions_without_timing(tmp_path, monkeypatch):
    table = _measure(tmp_path, FakeTimer(_rule))
    decided = formats_by_module(table, MODULES, ("int8", "bf16"))
    saved = json.dumps(table.state_dict())  # what a checkpoint holds
    monkeypatch.setattr(shapes, "_wall_timer", _raise)  # any timing from here on fails the test
    replayed = ShapeTable.from_dict(json.loads(saved))
    assert formats_by_module(replayed, MODULES, ("int8", "bf16")) == decided
    for s in ALL:
        for f in ("int8", "bf16"):
            for m in (1.0, PAY_MARGIN, 2.0):
                assert pays(replayed, s, f, m) == pays(table, s, f, m)


def test_cache_and_memo_hit_without_timing(tmp_path):
    first = _measure(tmp_path, FakeTimer(_rule))
    (path,) = tmp_path.glob("gemm-shapes-*.json")
    memoised = _measure(tmp_path, _raise)
    assert memoised == first and memoised is not first  # each caller its own table: load_state_dict is private
    shapes.clear_memo()
    from_disk = _measure(tmp_path, _raise)  # read back from the cache file
    assert from_disk == first
    assert formats_by_module(from_disk, MODULES, ["int8"]) == formats_by_module(first, MODULES, ["int8"])
    path.unlink()
    assert _measure(tmp_path, _raise) == first  # from memory: the file is gone
    refreshed = _measure(tmp_path, FakeTimer(lambda s, f: 3.0), refresh=True)
    assert refreshed.speedup(SMALL[0], "int8") == pytest.approx(3.0) and path.exists()


def test_cache_key_covers_shapes_formats_and_casts(tmp_path):
    _measure(tmp_path, FakeTimer(_rule))
    for kw in ({"shapes": BIG}, {"formats": ("int8",)}, {"int8_scaling": "tensor"}, {"stochastic_grads": False}):
        timer = FakeTimer(_rule)
        args = {"shapes": ALL, "formats": ("int8", "bf16"), **kw}
        measure_gemms(args.pop("shapes"), args.pop("formats"), "cpu", cache_dir=tmp_path, timer=timer, **args)
        assert timer.calls, f"{kw} was served from another measurement's cache"
    assert len(list(tmp_path.glob("gemm-shapes-*.json"))) == 5


def test_a_damaged_cache_file_is_measured_again(tmp_path):
    _measure(tmp_path, FakeTimer(_rule))
    (path,) = tmp_path.glob("gemm-shapes-*.json")
    data = json.loads(path.read_text())
    data["table"]["rows"] = "garbage"
    path.write_text(json.dumps(data))
    shapes.clear_memo()
    timer = FakeTimer(_rule)
    assert _measure(tmp_path, timer).speedup(BIG[0], "int8") == pytest.approx(2.5)
    assert timer.calls


def test_load_state_dict_rejects_what_it_cannot_read():
    with pytest.raises(HardwareError, match="schema"):
        ShapeTable().load_state_dict({"schema": 99})
    with pytest.raises(HardwareError, match="malformed"):
        ShapeTable().load_state_dict({"schema": shapes.SCHEMA, "rows": [{"shape": [1, 2]}], "formats": [],
                                      "skipped": {}, "how": {}})  # fmt: skip


# ---------------------------------------------------------------- the time budget


def test_budget_and_cap_leave_the_smallest_shapes_unmeasured_and_fp32(tmp_path):
    # each big GEMM costs 0.55 s of fake runs (warm-ups and 3 rounds): a 1 s budget is spent after two
    timer = FakeTimer(lambda s, f: 2.0, fp32_per_mac=4e-9)
    table = _measure(tmp_path, timer, budget_s=1.0)
    measured = [s for s, r in table.rows.items() if r.fp32_seconds is not None]
    assert len(measured) == 2
    order = list(table.rows)  # largest first
    assert measured == order[: len(measured)]
    for s in order[len(measured):]:
        assert "budget" in table.rows[s].note and not pays(table, s, "int8", 0.5)
    assert table.how["timed_seconds"] == pytest.approx(1.1, rel=0.02)
    capped = measure_gemms(ALL, ["int8"], "cpu", cache_dir=tmp_path, timer=FakeTimer(lambda s, f: 2.0), max_shapes=2)
    assert sum(r.fp32_seconds is not None for r in capped.rows.values()) == 2


def test_far_slower_format_is_not_timed_at_smaller_shapes(tmp_path):
    timer = FakeTimer(lambda s, f: 0.1 if f == "int8" else 1.5, fp32_per_mac=1e-8)  # int8 calls take 1.3 s
    table = _measure(tmp_path, timer)
    first = next(iter(table.rows))
    assert table.speedup(first, "int8") == pytest.approx(0.1)  # recorded from its warm-up
    assert "slower than fp32 in warm-up" in table.rows[first].formats["int8"].note
    assert sum(1 for s, f, _ in timer.calls if f == "int8") == 1  # one slow call is enough
    for s in list(table.rows)[1:]:
        assert table.speedup(s, "int8") is None and table.speedup(s, "bf16") == pytest.approx(1.5)
    timer = FakeTimer(lambda s, f: 0.1 if f == "int8" else 1.5)
    every = _measure(tmp_path, timer, far_slower=math.inf)
    assert all(every.speedup(s, "int8") == pytest.approx(0.1) for s in ALL)


def _report(int8: tuple[bool, float | None], bf16: tuple[bool, float | None]) -> DeviceReport:
    fs = {f: FormatSupport(f, native, "k", speedup, "test") for f, (native, speedup) in
          (("fp32", (True, 1.0)), ("int8", int8), ("bf16", bf16))}  # fmt: skip
    return DeviceReport("cpu", "test", torch.__version__, 1, "AVX2", (), fs)


def test_formats_the_probe_found_slow_or_not_native_are_not_timed(tmp_path):
    report = _report(int8=(True, 0.3), bf16=(False, None))
    table = _measure(tmp_path, _raise, report=report)
    assert set(table.skipped) == {"int8", "bf16"}
    assert "0.30x" in table.skipped["int8"] and "not native" in table.skipped["bf16"]
    assert formats_by_module(table, MODULES, ("int8", "bf16")) == {"big": {"fp32"}, "small": {"fp32"}}
    timer = FakeTimer(_rule)
    half = _measure(tmp_path, timer, report=_report(int8=(True, 2.0), bf16=(True, 0.5)))
    assert {f for _, f, _ in timer.calls} == {"fp32", "int8"} and set(half.skipped) == {"bf16"}


def test_unknown_or_unmeasurable_formats_are_clear_errors(tmp_path):
    with pytest.raises(HardwareError, match="fp8_e4m3"):
        measure_gemms(BIG, ("fp8_e4m3",), "cpu", cache_dir=tmp_path, timer=_raise)
    with pytest.raises(HardwareError, match="int8_scaling"):
        measure_gemms(BIG, ("int8",), "cpu", cache_dir=tmp_path, timer=_raise, int8_scaling="block")


# ---------------------------------------------------------------- one real measurement


def test_a_real_measurement_of_a_tiny_shape(tmp_path, one_thread):
    """The wall-clock path end to end: whatever this machine measures, the table is well formed."""
    shape = GemmShape(32, 64, 32, "weight_grad")
    table = measure_gemms([shape], ("int8", "bf16"), "cpu", cache_dir=tmp_path, budget_s=2.0)
    row = table.rows[shape]
    assert row.fp32_seconds is not None and row.fp32_seconds > 0 and row.number >= 1
    for f in ("int8", "bf16"):
        t = row.formats[f]
        assert t.speedup is None or (t.speedup > 0 and t.seconds > 0), t
        assert pays(table, shape, f) == (t.speedup is not None and t.speedup > PAY_MARGIN)
    assert table.how["seconds"] >= table.how["timed_seconds"] > 0
