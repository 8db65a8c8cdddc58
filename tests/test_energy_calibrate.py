"""Calibration recovers the coefficients of a meter whose energy is a known linear function of work."""

from __future__ import annotations

import pytest

from adaprec.energy import Meter, load_profile
from adaprec.energy.calibrate import CalibrationError, Workload, calibrate

TRUE_PJ = {"fp32": 1.7, "bf16": 0.35}
TRUE_PJ_BYTE, TRUE_IDLE_W = 40.0, 12.0


class _World(Meter):
    """A clock and an energy counter advanced by the fake work."""

    name = "fake"

    def __init__(self) -> None:
        self.t = 0.0
        self.j = 0.0

    def available(self) -> tuple[bool, str]:
        return True, "fake"

    def read_j(self) -> float:
        return self.j

    def work(self, macs: dict[str, int], nbytes: float, seconds: float) -> None:
        self.j += sum(TRUE_PJ[f] * n for f, n in macs.items()) * 1e-12 + TRUE_PJ_BYTE * nbytes * 1e-12
        self.j += TRUE_IDLE_W * seconds
        self.t += seconds


def _wl(world: _World, name: str, macs: dict[str, int], nbytes: float, seconds: float) -> Workload:
    return Workload(name, lambda: world.work(macs, nbytes, seconds), macs, nbytes)


def test_calibration_recovers_known_coefficients(tmp_path) -> None:
    w = _World()
    loads = [
        _wl(w, "a", {"fp32": 8 * 10**9}, 1e6, 0.3),
        _wl(w, "b", {"fp32": 2 * 10**9}, 4e6, 0.25),
        _wl(w, "c", {"bf16": 9 * 10**9}, 2e6, 0.1),
        _wl(w, "d", {"bf16": 10**9}, 5e6, 0.2),
        _wl(w, "e", {}, 3e9, 0.4),
        _wl(w, "f", {}, 1e9, 0.35),
    ]
    cal = calibrate(w, workloads=loads, min_seconds=1.0, clock=lambda: w.t)
    assert cal.pj_per_mac == pytest.approx(TRUE_PJ, rel=1e-6)
    assert cal.pj_per_byte == pytest.approx(TRUE_PJ_BYTE, rel=1e-6)
    assert cal.idle_w == pytest.approx(TRUE_IDLE_W, rel=1e-6)
    assert cal.residual_rel < 1e-9
    prof = load_profile(cal.to_toml(tmp_path / "cal.toml", "cal", "fake-device", "fake"))
    assert prof.mac_pj("bf16") == pytest.approx(TRUE_PJ["bf16"], rel=1e-5)
    assert prof.pj_per_byte == pytest.approx(TRUE_PJ_BYTE, rel=1e-5)


def test_calibration_needs_enough_workloads_and_a_meter() -> None:
    w = _World()
    with pytest.raises(CalibrationError, match="workloads"):
        calibrate(w, workloads=[_wl(w, "a", {"fp32": 1}, 1.0, 1.0)], clock=lambda: w.t)

    class _Dead(_World):
        def available(self) -> tuple[bool, str]:
            return False, "no counter"

    with pytest.raises(CalibrationError, match="no counter"):
        calibrate(_Dead())


def test_calibrate_command_writes_a_loadable_profile(tmp_path, monkeypatch, capsys) -> None:
    """`adaprec calibrate` runs the real sweeps on the CPU under a meter and writes a profile file atomically."""
    import time

    from adaprec import cli
    from adaprec.energy import meters

    class _Wall(Meter):  # a constant 40 W draw: a real reading of time, no work model
        name = "wall-40W"

        def available(self) -> tuple[bool, str]:
            return True, "test meter"

        def read_j(self) -> float:
            return 40.0 * time.monotonic()

    out = tmp_path / "cpu.toml"
    monkeypatch.setattr(meters, "detect_meter", lambda: (_Wall(), "test meter"))
    rc = cli.main(["calibrate", "--device", "cpu", "--formats", "fp32", "--min-seconds", "0.02", "--out", str(out)])
    assert rc == 0 and out.exists() and not (tmp_path / "cpu.toml.tmp").exists()
    prof = load_profile(out)
    assert prof.name == "cpu" and "wall-40W" in prof.description
    assert "profile:" in capsys.readouterr().out
    assert cli.main(["calibrate", "--device", "cpu", "--out", str(out)]) == 2  # exists: needs --force


def test_calibrate_command_without_a_meter_is_a_clear_error(monkeypatch, capsys) -> None:
    from adaprec import cli
    from adaprec.energy import meters

    monkeypatch.setattr(meters, "detect_meter", lambda: (None, "no energy meter on this machine (rapl: none)"))
    assert cli.main(["calibrate", "--device", "cpu"]) == 2
    assert "no energy meter" in capsys.readouterr().err
