"""The result store under concurrency and kills: one writer, stale locks, replay without duplicates,
migration of an old store, and cleanup of what a killed atomic write left."""

from __future__ import annotations

import gc
import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from adaprec.errors import StoreError, StoreLockedError
from adaprec.experiments import runner
from adaprec.experiments.config import parse_config
from adaprec.experiments.store import DB_NAME, LOCK_NAME, SCHEMA_VERSION, ResultStore, remove_stale_temp_files

ON_LINUX = Path("/proc/self/stat").exists()


def _events(n: int = 3, new: str = "bf16") -> list[dict]:
    return [{"step": s, "module": m, "role": "weight", "old": "fp32", "new": new, "policy": "p", "reason": "r"}
            for s in range(n) for m in ("conv1", "fc")]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer runs
    return proc.pid


def _write_lock(run_dir: Path, **info: object) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "since": time.time(), **info}))
    return path


# --- one writer -------------------------------------------------------------------


def test_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    first = ResultStore(tmp_path, writer=True)
    assert first.is_writer
    info = json.loads((tmp_path / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(StoreLockedError, match=rf"by this process \(pid {os.getpid()}\).*close it first"):
        ResultStore(tmp_path, writer=True)
    reader = ResultStore(tmp_path)  # readers need no lock, and can read while the writer writes
    first.add_steps("r", [{"step": 0, "loss": 1.0}])
    assert [r["step"] for r in reader.rows("steps", "r")] == [0] and not reader.is_writer
    with pytest.raises(StoreLockedError):  # a reader that tries to write takes the lock then: refused
        reader.add_steps("r", [{"step": 1, "loss": 1.0}])
    first.close()
    first.close()  # twice is fine
    assert not (tmp_path / LOCK_NAME).exists()
    reader.add_steps("r", [{"step": 1, "loss": 0.5}])  # now it may
    assert reader.is_writer and (tmp_path / LOCK_NAME).exists()
    del reader
    gc.collect()  # a store dropped without close() still gives the lock back
    assert not (tmp_path / LOCK_NAME).exists()


CHILD = textwrap.dedent("""
    import sys
    from adaprec.experiments.store import ResultStore
    store = ResultStore(sys.argv[1], writer=True)
    print("locked", flush=True)
    sys.stdin.readline()
    store.close()
""")


def test_writer_in_another_process_is_refused_then_its_dead_lock_taken_over(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError) as e:
            ResultStore(tmp_path, writer=True)
        msg = str(e.value)
        assert f"pid {child.pid} on this host" in msg and "wait for it to finish" in msg and "\n" not in msg
        assert ResultStore(tmp_path).runs() == []  # reading is fine meanwhile
        child.kill()  # killed: its lock stays behind, naming a dead pid
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == child.pid
    with pytest.warns(UserWarning, match=rf"stale writer lock .*pid {child.pid} is no longer running"):
        store = ResultStore(tmp_path, writer=True)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    store.close()


def test_second_writer_in_a_subprocess_is_refused(tmp_path: Path) -> None:
    with ResultStore(tmp_path, writer=True):
        proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], input="\n", capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 1 and "StoreLockedError" in proc.stderr
    assert f"pid {os.getpid()} on this host" in proc.stderr


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    pid = _dead_pid()
    _write_lock(tmp_path, pid=pid)
    with pytest.warns(UserWarning, match=f"pid {pid} is no longer running"):
        store = ResultStore(tmp_path, writer=True)
    store.add_steps("r", [{"step": 0}])
    store.close()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_another_host_or_being_written_is_refused(tmp_path: Path) -> None:
    _write_lock(tmp_path, pid=_dead_pid(), host="elsewhere.example")
    with pytest.raises(StoreLockedError, match="on host elsewhere.example.*delete .*writer.lock"):
        ResultStore(tmp_path, writer=True)
    lock = tmp_path / LOCK_NAME
    lock.write_text("")  # a writer killed between creating the lock and writing its pid, or still writing it
    with pytest.raises(StoreLockedError, match="retry in a few seconds"):
        ResultStore(tmp_path, writer=True)
    old = time.time() - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="unreadable"):
        ResultStore(tmp_path, writer=True).close()


@pytest.mark.skipif(not ON_LINUX, reason="process start times come from /proc")
def test_lock_whose_pid_was_reused_is_stale(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, pid=sleeper.pid, proc_start=1)  # the pid runs, but not the process that locked
        with pytest.warns(UserWarning, match="now belongs to another process"):
            ResultStore(tmp_path, writer=True).close()
    finally:
        sleeper.kill()
        sleeper.wait()


# --- replay without duplicates ----------------------------------------------------


def test_resume_writes_no_duplicate_rows(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        for _ in range(2):  # a resume replaying the same steps writes the same rows again
            with store.transaction():
                store.add_timeline("r", _events())
                store.add_steps("r", [{"step": s, "loss": 1.0} for s in range(3)])
                store.add_energy("r", [{"step": s, "macs": 10} for s in range(3)])
            store.add_evals("r", 3, {"accuracy": 0.5})
        store.add_timeline("r", _events(1, new="fp8"))  # a replayed step that decided differently: replaced
        con = store.conn
        assert con.execute("SELECT COUNT(*) FROM timeline").fetchone()[0] == 6
        assert con.execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 3
        assert con.execute("SELECT COUNT(*) FROM energy").fetchone()[0] == 3
        assert con.execute("SELECT COUNT(*) FROM evals").fetchone()[0] == 1
        rows = store.rows("timeline", "r")
        assert [(r["step"], r["module"], r["new"]) for r in rows if r["step"] == 0] == [
            (0, "conv1", "fp8"), (0, "fc", "fp8")]
        cols = {r[1]: r[5] for r in con.execute("PRAGMA table_info(timeline)")}
        assert [c for c, pk in sorted(cols.items(), key=lambda kv: kv[1]) if pk] == ["run_id", "step", "module", "role"]


def test_transaction_groups_writes(tmp_path: Path) -> None:
    """Inside transaction() the individual writes do not commit on their own: a failure drops them all."""
    with ResultStore(tmp_path) as store:
        with pytest.raises(KeyboardInterrupt), store.transaction():
            store.add_steps("r", [{"step": 0}])
            store.add_timeline("r", _events(1))
            raise KeyboardInterrupt
        assert store.rows("steps", "r") == [] and store.rows("timeline", "r") == []


# --- migration ----------------------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, task TEXT NOT NULL, policy TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL, started REAL, finished REAL, metric TEXT, higher_is_better INTEGER, final_metric REAL,
    wall_time_s REAL, total_steps INTEGER, energy_profile TEXT, config_json TEXT, initial_plan_json TEXT, error TEXT
);
CREATE TABLE steps (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, loss REAL, lr REAL, loss_scale REAL,
    plan_summary TEXT, stepped INTEGER, reason TEXT, PRIMARY KEY (run_id, step)
);
CREATE TABLE evals (run_id TEXT NOT NULL, step INTEGER NOT NULL, metric TEXT NOT NULL, value REAL,
    PRIMARY KEY (run_id, step, metric));
CREATE TABLE timeline (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, module TEXT, role TEXT, old TEXT, new TEXT, policy TEXT, reason TEXT
);
CREATE INDEX timeline_run ON timeline (run_id, step);
CREATE TABLE energy (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, macs REAL, bitops REAL, bytes REAL, modeled_j REAL,
    fp32_modeled_j REAL, bf16_modeled_j REAL, measured_j REAL, measured_reason TEXT, macs_by_format TEXT,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE summary (run_id TEXT PRIMARY KEY, json TEXT NOT NULL);
"""


def _old_store(run_dir: Path) -> None:
    con = sqlite3.connect(run_dir / DB_NAME)
    con.executescript(OLD_SCHEMA)
    con.execute("INSERT INTO runs (run_id, task, policy, seed, status) VALUES ('r', 'digits-cnn', 'bf16', 0, 'finished')")
    con.execute("INSERT INTO steps (run_id, step, loss) VALUES ('r', 0, 2.5)")
    rows = [("r", e["step"], e["module"], e["role"], e["old"], e["new"], e["policy"], e["reason"]) for e in _events()]
    con.executemany("INSERT INTO timeline VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows + rows[:2])  # a resume's duplicates
    con.execute("INSERT INTO timeline VALUES ('r', 9, NULL, 'weight', 'fp32', 'bf16', 'p', '')")
    con.commit()
    con.close()


def test_old_store_is_migrated_transparently(tmp_path: Path) -> None:
    _old_store(tmp_path)
    with ResultStore(tmp_path) as reader:  # a reader reads the old schema as it is, and changes nothing
        assert len(reader.rows("timeline", "r")) == 9
        assert reader.conn.execute("PRAGMA user_version").fetchone()[0] == 0
    with ResultStore(tmp_path, writer=True) as store:
        con = store.conn
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert {r[1] for r in con.execute("PRAGMA table_info(timeline)") if r[5]} == {"run_id", "step", "module", "role"}
        assert [(r["step"], r["module"]) for r in store.rows("timeline", "r")] == [
            (0, "conv1"), (0, "fc"), (1, "conv1"), (1, "fc"), (2, "conv1"), (2, "fc"), (9, "")]
        assert store.runs()[0]["status"] == "finished" and store.rows("steps", "r")[0]["loss"] == 2.5
        assert {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")} == {
            "runs", "steps", "evals", "timeline", "energy", "summary"}
        store.add_timeline("r", _events())  # and from now on a replay adds nothing
        assert len(store.rows("timeline", "r")) == 7
    with ResultStore(tmp_path, writer=True) as again:  # migrating is done once
        assert len(again.rows("timeline", "r")) == 7


def test_unreadable_store_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"not a database " * 200)
    with pytest.raises(StoreError, match="is not a readable adaprec result store"):
        ResultStore(tmp_path)
    with pytest.raises(StoreError, match="is not a usable adaprec result store"):
        ResultStore(tmp_path, writer=True)
    assert not (tmp_path / LOCK_NAME).exists()  # a failed open gives the lock back
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match="it is an existing file"):
        ResultStore(tmp_path / "afile")


# --- stale temporary files ----------------------------------------------------------


def _touch(path: Path, age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half")
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_stale_temp_files_are_removed_on_the_next_start(tmp_path: Path) -> None:
    cfg = parse_config({"task": "digits-cnn", "policies": ["bf16"], "seeds": 1, "steps": 2})
    runner._prepare_dir(cfg, tmp_path, resume=False).close()
    stale = [
        _touch(tmp_path / "checkpoints" / ".bf16-seed0.pt.k3j_x9a2.tmp"),  # any age: only the writer writes these
        _touch(tmp_path / ".config.json.abcdefgh.tmp", 120),
        _touch(tmp_path / ".report.html.0a1b2c3d.tmp", 120),
        _touch(tmp_path / "plots" / ".loss_curves.png.tmp.png", 120),
    ]
    kept = [
        _touch(tmp_path / ".report.md.zzzzzzzz.tmp"),  # fresh: `adaprec report` may be writing it right now
        _touch(tmp_path / "plots" / ".energy_per_step.png.tmp.png"),
        _touch(tmp_path / "notes.tmp", 120),  # not our names
        _touch(tmp_path / ".hidden.tmp", 120),
        _touch(tmp_path / "checkpoints" / "bf16-seed0.pt", 120),
        _touch(tmp_path / "checkpoints" / ".bf16-seed0.pt.TOOLONG123.tmp", 120),
        _touch(tmp_path / "sub" / ".x.abcdefgh.tmp", 120),  # not one of our directories
    ]
    runner._prepare_dir(cfg, tmp_path, resume=True).close()  # the next start of a run in this directory
    assert [p for p in stale if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    journal = _touch(tmp_path / f"{DB_NAME}-journal", 120)  # SQLite rolls a killed transaction back from it
    assert remove_stale_temp_files(tmp_path) == [] and journal.exists()
