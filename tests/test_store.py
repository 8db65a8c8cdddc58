"""Result store: plain-SQL schema, transactional writes, resume of a killed run."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest

from adaprec.errors import ConfigError
from adaprec.experiments import runner
from adaprec.experiments.config import parse_config
from adaprec.experiments.store import DB_NAME, ResultStore


def _start(store: ResultStore, run_id: str = "bf16-seed0") -> None:
    store.start_run(
        run_id, task="digits-cnn", policy="bf16", seed=0, metric="accuracy", higher_is_better=True,
        total_steps=10, energy_profile="7nm", config={"steps": 10}, initial_plan={"modules": {}, "pinned": []},
    )


def _fill(store: ResultStore, run_id: str, steps: int) -> None:
    store.add_steps(run_id, [
        {"step": s, "loss": 1.0 / (s + 1), "lr": 1e-3, "loss_scale": 1.0, "plan_summary": "bf16:3",
         "stepped": True, "reason": "ok"} for s in range(steps)
    ])
    store.add_energy(run_id, [
        {"step": s, "macs": 100, "bitops": 25600, "bytes_moved": 64.0, "modeled_j": 1e-6, "fp32_modeled_j": 3e-6,
         "bf16_modeled_j": 1e-6, "measured_j": None, "measured_reason": "no meter", "macs_by_format": {"bf16": 100}}
        for s in range(steps)
    ])
    store.add_timeline(run_id, [
        {"step": s, "module": "fc", "role": "weight", "old": "fp32", "new": "bf16", "policy": "x", "reason": "r"}
        for s in (0, steps - 1)
    ])
    for s in range(2, steps + 1, 2):
        store.add_evals(run_id, s, {"accuracy": s / 10, "val_loss": 1 / s})


def test_schema_is_plain_sql_and_round_trips(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        _start(store)
        _fill(store, "bf16-seed0", 10)
        store.finish_run("bf16-seed0", final_metric=0.97, wall_time_s=1.5, summary={"modeled_j": 1e-5})
    con = sqlite3.connect(tmp_path / DB_NAME)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"runs", "steps", "evals", "timeline", "energy", "summary"}
    row = con.execute("SELECT status, final_metric, wall_time_s, policy FROM runs").fetchone()
    assert row == ("finished", 0.97, 1.5, "bf16")
    assert con.execute("SELECT COUNT(*), SUM(stepped) FROM steps").fetchone() == (10, 10)
    bytes_, mbf = con.execute("SELECT bytes, macs_by_format FROM energy WHERE step=3").fetchone()
    assert bytes_ == 64.0 and json.loads(mbf) == {"bf16": 100}
    assert con.execute("SELECT value FROM evals WHERE step=4 AND metric='accuracy'").fetchone() == (0.4,)
    assert json.loads(con.execute("SELECT json FROM summary").fetchone()[0]) == {"modeled_j": 1e-5}


def test_finished_runs_and_delete_partial(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        _start(store, "a")
        _start(store, "b")
        _fill(store, "b", 10)
        store.finish_run("a", final_metric=0.5, wall_time_s=1.0, summary={})
        assert store.finished_runs() == {"a"}
        store.delete_partial("b", 6)
        assert [r["step"] for r in store.rows("steps", "b")] == list(range(6))
        assert [r["step"] for r in store.rows("energy", "b")] == list(range(6))
        assert [r["step"] for r in store.rows("timeline", "b")] == [0]
        assert sorted({r["step"] for r in store.rows("evals", "b")}) == [2, 4, 6]  # eval at 6 ran before the checkpoint
        store.delete_partial("b")
        assert store.rows("steps", "b") == [] and store.rows("evals", "b") == []


def test_transaction_is_all_or_nothing(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        _start(store)
        with pytest.raises(RuntimeError), store.transaction() as con:
            con.execute("INSERT INTO steps (run_id, step, loss) VALUES ('bf16-seed0', 0, 1.0)")
            raise RuntimeError("killed")
        assert store.rows("steps", "bf16-seed0") == []


def _dump(run_dir: Path) -> dict[str, list]:
    con = sqlite3.connect(run_dir / DB_NAME)
    # measured wall times differ between any two runs; everything else must be identical
    cols = {t: [r[1] for r in con.execute(f"PRAGMA table_info({t})") if r[1] != "wall_s"]
            for t in ("steps", "timeline", "energy")}
    out = {t: con.execute(f"SELECT {', '.join(cols[t])} FROM {t} ORDER BY run_id, step, rowid").fetchall()
           for t in ("steps", "timeline", "energy")}
    out["evals"] = con.execute("SELECT * FROM evals ORDER BY run_id, step, metric").fetchall()
    out["runs"] = con.execute("SELECT run_id, status, final_metric FROM runs ORDER BY run_id").fetchall()
    return out


@pytest.mark.slow
def test_killed_run_resumes_to_identical_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config({"task": "digits-cnn", "policies": ["bf16"], "seeds": 1, "steps": 30,
                        "eval_every": 10, "checkpoint_every": 12})
    runner.run_experiment(cfg, tmp_path / "whole", progress=False, report=False)

    real_get_task = runner.get_task

    def killing_get_task(name: str):  # the bf16 run dies at step 17: after the eval at 15... and checkpoint 12
        task = real_get_task(name)
        calls = {"n": 0}

        def loss_fn(out, y):
            calls["n"] += 1
            if calls["n"] == 30 + 18:
                raise KeyboardInterrupt
            return task.loss_fn(out, y)

        return dataclasses.replace(task, loss_fn=loss_fn)

    monkeypatch.setattr(runner, "get_task", killing_get_task)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(cfg, tmp_path / "killed", progress=False, report=False)
    partial = _dump(tmp_path / "killed")
    assert ("bf16-seed0", "running", None) in partial["runs"]
    assert max(r[1] for r in partial["evals"] if r[0] == "bf16-seed0") == 10
    monkeypatch.setattr(runner, "get_task", real_get_task)
    with pytest.raises(ConfigError, match="--resume"):
        runner.run_experiment(cfg, tmp_path / "killed", progress=False, report=False)
    other = cfg.model_copy(update={"steps": 31})
    with pytest.raises(ConfigError, match="different config"):
        runner.run_experiment(other, tmp_path / "killed", resume=True, progress=False, report=False)
    runner.run_experiment(cfg, tmp_path / "killed", resume=True, progress=False, report=False)
    whole, resumed = _dump(tmp_path / "whole"), _dump(tmp_path / "killed")
    assert resumed["runs"] == whole["runs"] and all(s == "finished" for _, s, _ in whole["runs"])
    for table in ("steps", "evals", "timeline", "energy"):
        assert resumed[table] == whole[table], table
    assert len(whole["steps"]) == 60


def test_evaluations_between_steps_are_not_charged_to_the_ledger(tmp_path: Path) -> None:
    """Every step of a fixed-shape task has the same MACs, whether or not an evaluation ran before it."""
    cfg = parse_config({"task": "digits-cnn", "policies": ["bf16"], "seeds": 1, "steps": 9,
                        "eval_every": 3, "checkpoint_every": 9})
    runner.run_experiment(cfg, tmp_path, progress=False, report=False)
    con = sqlite3.connect(tmp_path / DB_NAME)
    macs = dict(con.execute("SELECT step, macs FROM energy WHERE run_id = 'bf16-seed0'").fetchall())
    evals = {s for (s,) in con.execute("SELECT DISTINCT step FROM evals WHERE run_id = 'bf16-seed0'")}
    assert {3, 6} <= evals  # evaluations ran after steps 2 and 5, before steps 3 and 6
    assert len(macs) == 9 and len(set(macs.values())) == 1, macs
