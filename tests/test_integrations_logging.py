"""TensorBoard and MLflow loggers: what they hold, read back, equals the result store of the same real run."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from adaprec.errors import ConfigError, MissingExtraError
from adaprec.experiments import runner
from adaprec.experiments.config import load_config, parse_config
from adaprec.experiments.store import DB_NAME
from adaprec.formats import get
from adaprec.integrations.logging import ExperimentLogger

STEPS = 8
CONFIG = {  # cyclic with a 4-step period changes precision at almost every step: a busy timeline
    "task": "digits-cnn", "policies": [{"name": "cyclic", "kwargs": {"period": 4}}], "seeds": 1, "steps": STEPS,
    "eval_every": 3, "checkpoint_every": 3, "quiet": True,  # commits at 3, 6, 8; evaluations at 3, 6 (and 8)
}
RUN_IDS = ("fp32-seed0", "cyclic(period=4)-seed0")
Series = dict[str, dict[int, float]]


# --- what the store says should have been logged -----------------------------------------


def _bits(recipe: str) -> float:
    return float(get(recipe.split("/")[0]).bits)


def _expected(run_dir: Path, run_id: str) -> tuple[Series, Series]:
    """(scalar tags -> {step: value}, bits tags -> {step: value} at change points), from runs.sqlite alone."""
    con = sqlite3.connect(run_dir / DB_NAME)
    con.row_factory = sqlite3.Row

    def q(sql: str) -> list[dict[str, Any]]:
        return [dict(r) for r in con.execute(sql, (run_id,))]

    run = q("SELECT * FROM runs WHERE run_id=?")[0]
    steps = q("SELECT * FROM steps WHERE run_id=? ORDER BY step")
    energy = {r["step"]: r for r in q("SELECT * FROM energy WHERE run_id=? ORDER BY step")}
    summary = json.loads(q("SELECT json FROM summary WHERE run_id=?")[0]["json"])
    out: Series = {}

    def put(tag: str, step: int, value: float) -> None:
        out.setdefault(tag, {})[step] = float(value)

    # the plan in force during each step: the initial plan, then every change from the step after it
    plan = {m: {r: v if isinstance(v, str) else v["format"] for r, v in mp.items()}
            for m, mp in json.loads(run["initial_plan_json"])["modules"].items()}
    changes: dict[int, list[dict[str, Any]]] = {}
    for ev in q("SELECT * FROM timeline WHERE run_id=? ORDER BY rowid"):
        changes.setdefault(ev["step"], []).append(ev)
    bits: Series = {f"{m}.{r}": {0: _bits(f)} for m, mp in plan.items() for r, f in mp.items()}
    seen: set[str] = set()
    cum = cum32 = 0.0
    for row in steps:
        s = row["step"]
        for k in ("loss", "lr", "loss_scale"):
            put(f"train/{k}", s, row[k])
        put("train/stepped", s, row["stepped"])
        e = energy[s]
        cum += e["modeled_j"]
        cum32 += e["fp32_modeled_j"]
        put("energy/modeled_j", s, e["modeled_j"])
        put("energy/modeled_j_cumulative", s, cum)
        put("energy/fp32_modeled_j_cumulative", s, cum32)
        put("energy/saving_vs_fp32", s, 1 - cum / cum32)
        if e["measured_j"] is not None:
            put("energy/measured_j", s, e["measured_j"])
        if e["wall_s"] is not None:
            put("time/step_s", s, e["wall_s"])
        if e["bytes"]:
            put("memory/bytes_moved", s, e["bytes"])
        put("coverage/covered_mac_fraction", s, e["covered_macs"] / e["macs"])
        put("coverage/narrow_mac_fraction", s, e["narrow_macs"] / e["macs"])
        counts = Counter(mp["weight"].split("/")[0] for mp in plan.values())
        seen |= set(counts)
        for f in seen:
            put(f"precision/modules/{f}", s, counts.get(f, 0))
        role_bits = [_bits(f) for mp in plan.values() for r, f in mp.items()
                     if r not in ("optimizer_state", "saved", "output")]  # the compute roles only
        put("precision/mean_bits", s, sum(role_bits) / len(role_bits))
        for ev in changes.get(s, []):
            plan[ev["module"]][ev["role"]] = ev["new"]
            bits[f"{ev['module']}.{ev['role']}"][s + 1] = _bits(ev["new"])
        after = Counter(mp["weight"].split("/")[0] for mp in plan.values())  # the store's plan after step s
        assert row["plan_summary"] == " ".join(f"{f}:{n}" for f, n in sorted(after.items()))
    for ev in q("SELECT * FROM evals WHERE run_id=?"):
        put(f"eval/{ev['metric']}", ev["step"], ev["value"])
        if ev["step"] == run["total_steps"]:
            put(f"final/{ev['metric']}", ev["step"], ev["value"])
    assert out[f"final/{run['metric']}"][run["total_steps"]] == run["final_metric"]
    for k in ("modeled_j", "fp32_modeled_j", "bf16_modeled_j", "saving_vs_fp32", "saving_vs_bf16", "measured_j"):
        if summary.get(k) is not None:
            put(f"final/energy/{k}", run["total_steps"], summary[k])
    if summary["peak_memory"]["peak_bytes"] is not None:
        put("final/memory/peak_bytes", run["total_steps"], summary["peak_memory"]["peak_bytes"])
    return out, {f"bits/{k}": v for k, v in bits.items()}


def _check(logged: Series, run_dir: Path, run_id: str, rel: float) -> None:
    """Every scalar equals the store's; every bits series holds each change and only in-force values."""
    scalars, bits = _expected(run_dir, run_id)
    assert {t for t in logged if not t.startswith("bits/")} == set(scalars)
    for tag, want in scalars.items():
        if tag == "time/step_s":  # measured: a step re-done after a resume took another time than the first try
            assert set(logged[tag]) == set(want) and all(v > 0 for v in logged[tag].values()), tag
            continue
        assert logged[tag] == pytest.approx(want, rel=rel, abs=0), tag
    assert {t for t in logged if t.startswith("bits/")} == set(bits)
    for tag, changes in bits.items():
        for step, value in logged[tag].items():  # a resume may re-state an unchanged value
            in_force = changes[max(s for s in changes if s <= step)]
            assert value == in_force, (tag, step)
        assert all(logged[tag].get(s) == v for s, v in changes.items()), tag


# --- reading the loggers' files back -------------------------------------------------------


def _tensorboard(run_dir: Path, run_id: str) -> tuple[Series, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard" / runner._slug(run_id)), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()  # purges what an interrupted attempt wrote past the resume step, as TensorBoard shows it
    out: Series = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = {e.step: e.value for e in events}
        assert len(out[tag]) == len(events), f"{tag}: a step logged twice"
    texts = [t.tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"] for t in acc.Tensors(tag)]
    return out, texts


def _mlflow_runs(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[Any]]:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to read a file store
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name(run_dir.resolve().name)
    return client, client.search_runs([exp.experiment_id])


def _mlflow_series(client: Any, run: Any) -> Series:
    out: Series = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, key)
        out[key] = {m.step: m.value for m in history}
        assert len(out[key]) == len(history), f"{key}: a step logged twice"
    return out


# --- tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    d = tmp_path_factory.mktemp("logged") / "digits"
    runner.run_experiment(parse_config({**CONFIG, "loggers": ["tensorboard", "mlflow"]}), d, progress=False,
                          report=False)
    return d


def test_tensorboard_holds_what_the_store_holds(logged_run: Path) -> None:
    for run_id in RUN_IDS:
        scalars, texts = _tensorboard(logged_run, run_id)
        _check(scalars, logged_run, run_id, rel=1e-6)  # TensorBoard keeps float32
        params = next(t for t in texts if "energy_profile" in t)
        assert "| energy_profile | 7nm |" in params and "| energy_kind | modeled (profile 7nm) on what executed |" in params
    _, texts = _tensorboard(logged_run, RUN_IDS[1])
    assert any("conv1.weight: int3/tensor -> int4/tensor" in t for t in texts)  # the change events, as text


def test_mlflow_holds_what_the_store_holds(logged_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client, runs = _mlflow_runs(logged_run, monkeypatch)
    assert sorted(r.info.run_name for r in runs) == sorted(RUN_IDS)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["energy_profile"] == "7nm"
        assert run.data.params["energy_kind"] == "modeled (profile 7nm) on what executed"
        assert run.data.params["run_id"] == run.info.run_name and run.data.params["seed"] == "0"
        _check(_mlflow_series(client, run), logged_run, run.info.run_name, rel=0)  # float64: exact


def test_logging_changes_no_result(logged_run: Path, tmp_path: Path) -> None:
    plain = runner.run_experiment(parse_config(CONFIG), tmp_path / "plain", progress=False, report=False)

    def dump(d: Path) -> dict[str, list[Any]]:
        con = sqlite3.connect(d / DB_NAME)
        cols = {t: [r[1] for r in con.execute(f"PRAGMA table_info({t})") if r[1] != "wall_s"]  # measured time
                for t in ("steps", "timeline", "energy", "evals")}
        return {t: con.execute(f"SELECT {', '.join(c)} FROM {t} ORDER BY run_id, step, rowid").fetchall()
                for t, c in cols.items()}

    assert dump(plain) == dump(logged_run)


@pytest.mark.slow
def test_resume_keeps_logging_once_per_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after a commit but before its checkpoint: the resumed run re-does steps 3..5, logged once."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    # evaluations at 4 (not 3): the controller's MAC counter charges an evaluation's forward passes to the
    # next training step, so a resume from a checkpoint on an evaluation step re-does that step with less
    # energy than the first attempt had (a runner/ledger issue, not a logging one)
    cfg = parse_config({**CONFIG, "eval_every": 4, "loggers": ["tensorboard", "mlflow"]})
    real_save = runner._save

    def dying_save(path: Path, *args: Any) -> None:
        if path.name.startswith("cyclic") and args[3] == 6:  # (model, opt, ap, step, wall_s)
            raise KeyboardInterrupt
        real_save(path, *args)

    monkeypatch.setattr(runner, "_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(cfg, tmp_path / "d", progress=False, report=False)
    client, runs = _mlflow_runs(tmp_path / "d", monkeypatch)
    killed = next(r for r in runs if r.info.run_name == RUN_IDS[1])
    assert killed.info.status == "KILLED"
    assert sorted(_mlflow_series(client, killed)["train/loss"]) == list(range(6))  # logged up to the commit

    monkeypatch.setattr(runner, "_save", real_save)
    runner.run_experiment(cfg, tmp_path / "d", resume=True, progress=False, report=False)
    client, runs = _mlflow_runs(tmp_path / "d", monkeypatch)
    assert sorted(r.info.run_name for r in runs) == sorted(RUN_IDS)  # the killed MLflow run was continued
    for run in runs:
        assert run.info.status == "FINISHED"
        _check(_mlflow_series(client, run), tmp_path / "d", run.info.run_name, rel=0)
    for run_id in RUN_IDS:
        _check(_tensorboard(tmp_path / "d", run_id)[0], tmp_path / "d", run_id, rel=1e-6)


def test_a_failing_logger_costs_no_stored_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from adaprec.integrations.tensorboard import TensorBoardLogger

    def broken(self: Any, step: int, values: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(TensorBoardLogger, "log_scalars", broken)
    elsewhere = tmp_path / "tracking"
    cfg = parse_config({**CONFIG, "policies": ["fp32"], "loggers": ["tensorboard", "mlflow"],
                        "mlflow_tracking_uri": elsewhere.as_uri()})
    with pytest.warns(UserWarning, match="tensorboard logger failed in log_scalars .*disk full.*switched off"):
        runner.run_experiment(cfg, tmp_path / "d", progress=False, report=False)
    con = sqlite3.connect(tmp_path / "d" / DB_NAME)
    assert con.execute("SELECT status FROM runs").fetchall() == [("finished",)]
    assert con.execute("SELECT COUNT(*) FROM steps").fetchone() == (STEPS,)
    assert not (tmp_path / "d" / "mlruns").exists()  # MLflow went where it was told, and kept logging
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=elsewhere.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("d").experiment_id])
    _check(_mlflow_series(client, run), tmp_path / "d", "fp32-seed0", rel=0)


@pytest.mark.parametrize(("modules", "cls_path", "extra"), [
    (("torch.utils.tensorboard", "tensorboard"), "adaprec.integrations.tensorboard:TensorBoardLogger", "tensorboard"),
    (("mlflow", "mlflow.tracking"), "adaprec.integrations.mlflow:MlflowLogger", "mlflow"),
])
def test_missing_package_names_the_extra(
    modules: tuple[str, ...], cls_path: str, extra: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    module_name, cls_name = cls_path.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # what an uninstalled package looks like to `import`
    kwargs = ({"log_dir": tmp_path} if extra == "tensorboard"
              else {"tracking_uri": tmp_path.as_uri(), "experiment": "e", "run_name": "r"})
    with pytest.raises(MissingExtraError, match=rf"pip install 'adaprec\[{extra}\]'"):
        cls(**kwargs)
    # the runner says so before training, and before it writes a directory
    with pytest.raises(MissingExtraError, match=rf"the '{extra}' logger needs .*adaprec\[{extra}\]"):
        runner.run_experiment(parse_config({**CONFIG, "loggers": [extra]}), tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()
    assert issubclass(MissingExtraError, ImportError)


def test_unknown_logger_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("task: digits-cnn\npolicies: [bf16]\nloggers: [tensorbord, mlflow]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "line 3" in msg and "unknown logger 'tensorbord'" in msg and "did you mean 'tensorboard'?" in msg
    assert "known loggers: tensorboard, mlflow" in msg
    with pytest.raises(ConfigError, match="mlflow_tracking_uri is set but 'mlflow' is not in loggers"):
        parse_config({"task": "digits-cnn", "mlflow_tracking_uri": "file:///tmp/x"})
    assert parse_config({"task": "digits-cnn", "loggers": "mlflow"}).loggers == ("mlflow",)
    assert parse_config({"task": "digits-cnn"}).loggers == ()


def test_loggers_stay_out_of_the_resume_identity(tmp_path: Path) -> None:
    """Logging changes no result, so a run may be resumed with a logger added."""
    cfg = parse_config({**CONFIG, "policies": ["fp32"], "steps": 2})
    runner.run_experiment(cfg, tmp_path / "d", progress=False, report=False)
    again = parse_config({**CONFIG, "policies": ["fp32"], "steps": 2, "loggers": ["mlflow"]})
    pytest.importorskip("mlflow")
    runner.run_experiment(again, tmp_path / "d", resume=True, progress=False, report=False)  # no ConfigError


def test_loggers_share_one_interface(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from adaprec.integrations.mlflow import MlflowLogger
    from adaprec.integrations.tensorboard import TensorBoardLogger

    tb = TensorBoardLogger(tmp_path / "tb")
    ml = MlflowLogger(tracking_uri=(tmp_path / "ml").as_uri(), experiment="e", run_name="r")
    for lg in (tb, ml):
        assert isinstance(lg, ExperimentLogger)
        lg.log_scalars(0, {"train/loss": 1.5})
        lg.close("FINISHED")
        lg.close("FINISHED")  # idempotent: the runner may close on more than one path
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_per_layer_formats_and_the_heat_map_are_where_people_look(logged_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard event files hold bits/<module>.<role> for every layer and role, at the start and at each
    change of the timeline, and the precision heat map as an image at the end; MLflow holds the same."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from adaprec.plan import ROLES

    run_id = RUN_IDS[1]
    con = sqlite3.connect(logged_run / DB_NAME)
    initial = json.loads(con.execute("SELECT initial_plan_json FROM runs WHERE run_id=?", (run_id,)).fetchone()[0])
    timeline = con.execute("SELECT step, module, role, new FROM timeline WHERE run_id=? ORDER BY rowid",
                           (run_id,)).fetchall()
    assert len(timeline) > 10  # cyclic(period=4): a busy timeline
    scalars, _ = _tensorboard(logged_run, run_id)
    tags = {f"bits/{m}.{r}" for m in initial["modules"] for r in (*ROLES, "optimizer_state")}
    assert tags <= set(scalars) and len(initial["modules"]) == 3
    for m, mp in initial["modules"].items():  # at the start: the plan step 0 runs
        for r in ROLES:
            assert scalars[f"bits/{m}.{r}"][0] == _bits(mp[r]["format"])
    for step, m, r, new in timeline:  # each change, in force from the step after its decision
        assert scalars[f"bits/{m}.{r}"][step + 1] == _bits(new), (m, r, step)

    acc = EventAccumulator(str(logged_run / "tensorboard" / runner._slug(run_id)), size_guidance={"images": 0})
    acc.Reload()
    (image,) = acc.Images("precision/heatmap")
    assert image.step == STEPS and image.width > 100 and image.height > 100
    assert image.encoded_image_string.startswith(b"\x89PNG")

    client, runs = _mlflow_runs(logged_run, monkeypatch)
    run = next(r for r in runs if r.info.run_name == run_id)
    assert {f.path for f in client.list_artifacts(run.info.run_id, "precision")} == {"precision/heatmap.png"}
    assert tags <= set(run.data.metrics)


def test_change_line_is_one_line_with_the_reasons() -> None:
    from adaprec.integrations.logging import change_line
    from adaprec.timeline import TimelineEvent

    events = [TimelineEvent(40, f"fc{i}", "weight", "bf16", "int8/tensor", "error-budget",
                            "int8: sqnr 31.0 dB >= 24.0 dB") for i in range(8)]
    events.append(TimelineEvent(40, "fc0", "activation", "bf16", "int8/tensor", "error-budget", "int8:\nsqnr 25 dB"))
    line = change_line(40, events)
    assert "\n" not in line
    assert line.startswith("adaprec step 40: 9 changes: fc0.weight bf16->int8/tensor, fc1.weight bf16->int8/tensor")
    assert ", ... (+3 more) (error-budget: int8: sqnr 31.0 dB >= 24.0 dB; int8: sqnr 25 dB)" in line
    assert change_line(3, events[:1]).startswith("adaprec step 3: 1 change: fc0.weight")
