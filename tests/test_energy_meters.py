"""Meters read real counter layouts (faked in tmp_path / sys.modules) to the microjoule."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from adaprec.energy import EnergyLedger, MeasurementWindow, Meter, NvmlMeter, RaplMeter, detect_meter
from adaprec.energy.meters import ZeusMeter


def _zone(root: Path, name: str, label: str, energy: int, max_range: int) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "name").write_text(label + "\n")
    (z / "energy_uj").write_text(f"{energy}\n")
    (z / "max_energy_range_uj").write_text(f"{max_range}\n")
    return z


def _set(z: Path, energy: int) -> None:
    (z / "energy_uj").write_text(f"{energy}\n")


@pytest.fixture
def rapl(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "powercap"
    return {
        "root": root,
        "pkg": _zone(root, "intel-rapl:0", "package-0", 1_000_000, 262_143_328_850),
        "core": _zone(root, "intel-rapl:0:0", "core", 500_000, 262_143_328_850),
        "dram": _zone(root, "intel-rapl:0:1", "dram", 2_000, 65_712_999_613),
        "psys": _zone(root, "intel-rapl:1", "psys", 9_000_000, 262_143_328_850),
    }


def test_rapl_sums_packages_and_dram_with_wraparound(rapl: dict[str, Path]) -> None:
    m = RaplMeter(rapl["root"])
    assert m.available()[0]
    assert sorted(m.domains) == ["dram", "package-0"]
    assert m.read_j() == 0.0
    _set(rapl["pkg"], 1_250_000)  # +250_000 uJ
    _set(rapl["dram"], 12_000)  # +10_000 uJ
    _set(rapl["core"], 900_000)  # inside the package: not added again
    _set(rapl["psys"], 99_000_000)  # overlaps the packages: not added
    assert m.read_j() == pytest.approx(0.260, abs=1e-12)
    # package counter wraps: 262_143_328_850 - 1_250_000 + 40 uJ more
    _set(rapl["pkg"], 40)
    expected = 260_000 + (262_143_328_850 - 1_250_000 + 40)
    assert m.read_j() == pytest.approx(expected * 1e-6, abs=1e-9)


def test_rapl_missing_tree_has_a_reason(tmp_path: Path) -> None:
    ok, why = RaplMeter(tmp_path / "nope").available()
    assert not ok and "does not exist" in why
    (tmp_path / "empty").mkdir()
    ok, why = RaplMeter(tmp_path / "empty").available()
    assert not ok and "no intel-rapl" in why


@pytest.mark.skipif(Path("/sys/class/powercap").exists(), reason="this machine has powercap")
def test_this_machine_has_no_rapl() -> None:
    assert RaplMeter().available()[0] is False


def _fake_pynvml(readings_mj: list[list[int]], init_error: Exception | None = None) -> types.ModuleType:
    """A pynvml stand-in whose energy counters advance through ``readings_mj`` (per device)."""
    mod = types.ModuleType("pynvml")
    calls = {"n": [0] * len(readings_mj)}

    def init() -> None:
        if init_error is not None:
            raise init_error

    def energy(handle: int) -> int:
        i = calls["n"][handle]
        calls["n"][handle] = min(i + 1, len(readings_mj[handle]) - 1)
        return readings_mj[handle][i]

    mod.nvmlInit = init
    mod.nvmlDeviceGetCount = lambda: len(readings_mj)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetTotalEnergyConsumption = energy
    return mod


def test_nvml_meter_reads_millijoules_of_all_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # first value of each device is consumed by available()
    fake = _fake_pynvml([[0, 10_000, 12_500, 20_000], [0, 5_000, 5_250, 6_000]])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    m = NvmlMeter()
    ok, why = m.available()
    assert ok and "2 GPU" in why
    assert m.read_j() == 0.0
    assert m.read_j() == pytest.approx((2_500 + 250) / 1000)
    assert m.read_j() == pytest.approx((10_000 + 1_000) / 1000)
    assert m.domains == ["gpu0", "gpu1"]


def test_nvml_without_driver_is_unavailable_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([[0]], RuntimeError("Driver Not Loaded")))
    ok, why = NvmlMeter().available()
    assert not ok and "Driver Not Loaded" in why
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    ok, why = NvmlMeter().available()
    assert not ok and "nvidia-ml-py" in why


def test_detect_meter_returns_none_and_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    meter, why = detect_meter([NvmlMeter(), ZeusMeter(), RaplMeter(tmp_path / "x")])
    assert meter is None
    assert "nvml" in why and "zeus" in why and "rapl" in why


def test_detect_meter_picks_a_working_one(rapl: dict[str, Path]) -> None:
    meter, why = detect_meter([RaplMeter(rapl["root"])])
    assert isinstance(meter, RaplMeter) and "package-0" in why


class _FakeMeter(Meter):
    """Cumulative joules follow a script."""

    name = "fake"

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def available(self) -> tuple[bool, str]:
        return True, "fake"

    def read_j(self) -> float:
        return self.values.pop(0)


def test_measurement_window_attributes_energy_by_step_time() -> None:
    times = iter([0.0, 0.2, 0.5, 1.0, 1.5])
    meter = _FakeMeter([100.0, 130.0, 140.0])
    w = MeasurementWindow(meter, min_seconds=1.0, clock=lambda: next(times))
    w.start()  # t=0, 100 J
    assert w.step_done(1) is None  # t=0.2
    assert w.step_done(2) is None  # t=0.5
    got = w.step_done(3)  # t=1.0 -> window of 30 J over 0.2/0.3/0.5 s
    assert [s for s, _ in got] == [1, 2, 3]
    assert [j for _, j in got] == pytest.approx([6.0, 9.0, 15.0])
    assert w.step_done(4) is None  # t=1.5
    assert w.flush() == [(4, pytest.approx(10.0))]  # a short window, closed at its last step
    assert w.total_j == pytest.approx(40.0) and w.windows == 2
    state = w.state_dict()
    w2 = MeasurementWindow(meter)
    w2.load_state_dict(state)
    assert w2.total_j == pytest.approx(40.0)

    ledger = EnergyLedger()
    ledger.attribute_measured(got, "fake")  # steps never recorded are ignored
    assert ledger.summary()["measured_j"] is None


def test_ledger_takes_window_attribution(rapl: dict[str, Path]) -> None:
    import torch
    from torch import nn

    from adaprec.energy import MacCounter
    from adaprec.plan import PrecisionPlan

    model = nn.Linear(4, 3)
    plan = PrecisionPlan.uniform([""], "bf16")
    ledger = EnergyLedger()
    meter = RaplMeter(rapl["root"])
    t = iter([0.0, 0.5, 2.0])
    w = MeasurementWindow(meter, clock=lambda: next(t))
    w.start()
    out = None
    energies = [1_100_000, 1_400_000]
    with MacCounter(model) as c:
        for step in range(2):
            model(torch.randn(2, 4)).sum().backward()
            ledger.record(step, plan, c.pop_step_cost(), measured_reason="window open")
            _set(rapl["pkg"], energies[step])
            out = w.step_done(step)
    ledger.attribute_measured(out, meter.name)
    s = ledger.summary()
    assert s["measured_j"] == pytest.approx(0.4)
    assert [r["measured_j"] for r in ledger.steps()] == pytest.approx([0.1, 0.3])
    assert s["measured_reason"] == "measured on every step"
