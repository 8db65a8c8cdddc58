"""The result store: one SQLite file per run directory, readable with plain SQL.

Every write is a transaction, so a killed run leaves whole rows or none,
and every table has a primary key written with ``INSERT OR REPLACE``, so a
resume that writes the same rows again never duplicates one. Step numbers
are optimizer-step indices (0-based, as ``StepResult.step``); an
evaluation's ``step`` is the number of steps completed when it ran. The
schema is documented in docs/experiments.md.

One writer at a time: the first write (or ``ResultStore(dir, writer=True)``)
takes the run directory's writer lock, a file ``writer.lock`` holding the
owner's pid and host, created with ``O_EXCL`` and removed on ``close()``. A
second writer is refused with :class:`~adaprec.errors.StoreLockedError`
naming that pid; a lock whose pid is dead on this host is stale and taken
over with a warning. Readers (the report) never take it. See
docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import time
import uuid
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adaprec.errors import StoreError, StoreLockedError

__all__ = ["ResultStore", "SCHEMA", "DB_NAME", "LOCK_NAME", "SCHEMA_VERSION", "remove_stale_temp_files"]

DB_NAME = "runs.sqlite"
LOCK_NAME = "writer.lock"
SCHEMA_VERSION = 3  # PRAGMA user_version; 1 (or 0): timeline had no primary key; 2: energy lacked wall time and coverage

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, task TEXT NOT NULL, policy TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL,             -- running | finished | failed
    started REAL, finished REAL,      -- unix time
    metric TEXT, higher_is_better INTEGER, final_metric REAL,
    wall_time_s REAL, total_steps INTEGER, energy_profile TEXT,
    config_json TEXT, initial_plan_json TEXT, error TEXT
);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, loss REAL, lr REAL, loss_scale REAL,
    plan_summary TEXT, stepped INTEGER, reason TEXT,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS evals (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, metric TEXT NOT NULL, value REAL,
    PRIMARY KEY (run_id, step, metric)
);
CREATE TABLE IF NOT EXISTS timeline (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, module TEXT NOT NULL, role TEXT NOT NULL, old TEXT, new TEXT,
    policy TEXT, reason TEXT,
    PRIMARY KEY (run_id, step, module, role)   -- one format change per tensor per step
);
CREATE TABLE IF NOT EXISTS energy (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, macs REAL, bitops REAL, bytes REAL,
    modeled_j REAL, fp32_modeled_j REAL, bf16_modeled_j REAL, measured_j REAL, measured_reason TEXT,
    macs_by_format TEXT,              -- JSON {executed format: MACs}, "fp8_e4m3 (emulated)" when emulated
    wall_s REAL,                      -- measured wall time of the step
    covered_macs REAL, narrow_macs REAL, emulated_macs REAL,  -- under the plan, run natively below 32 bits, emulated
    simulated_j REAL,                 -- the plan priced on a target= profile (research mode), else NULL
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS summary (
    run_id TEXT PRIMARY KEY, json TEXT NOT NULL  -- the energy ledger summary and run facts
);
"""

_STEP_COLS = ("step", "loss", "lr", "loss_scale", "plan_summary", "stepped", "reason")
_TIMELINE_COLS = ("step", "module", "role", "old", "new", "policy", "reason")
_ENERGY_COLS = (
    "step", "macs", "bitops", "bytes", "modeled_j", "fp32_modeled_j", "bf16_modeled_j",
    "measured_j", "measured_reason", "macs_by_format", "wall_s", "covered_macs", "narrow_macs", "emulated_macs",
    "simulated_j",
)
# columns schema 3 added to the energy table (ALTER TABLE on an older store)
_ENERGY_V3 = (("wall_s", "REAL"), ("covered_macs", "REAL"), ("narrow_macs", "REAL"), ("emulated_macs", "REAL"),
              ("simulated_j", "REAL"))


def _get(row: Any, key: str) -> Any:
    return row.get(key) if isinstance(row, Mapping) else getattr(row, key, None)


# --- the writer lock -------------------------------------------------------------

_UNREADABLE_STALE_S = 10.0  # a lock file with no readable owner this old was left by a writer killed mid-create


def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid from its first owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (a zombie counts as dead; unknown counts as alive)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C there: we cannot tell, so never call a lock stale
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


@contextmanager
def _dir_mutex(directory: Path) -> Iterator[None]:
    """A short exclusive section over ``directory`` (flock on the directory), so two processes never
    take over the same stale lock at once. Where flock is missing, O_EXCL alone guards the lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's owner record, or None when it is empty or unreadable (raises FileNotFoundError if gone)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _since(holder: Mapping[str, Any]) -> str:
    t = holder.get("since")
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "?"


class _WriterLock:
    """``RUN_DIR/writer.lock``: who writes this run directory. Held from acquire() to release()."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self.token: str | None = None

    @property
    def held(self) -> bool:
        return self.token is not None

    def acquire(self) -> None:
        if self.held:
            return
        me: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "proc_start": _proc_start(os.getpid()), "token": uuid.uuid4().hex}
        for _ in range(5):
            with _dir_mutex(self.path.parent):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    try:
                        holder = _read_lock(self.path)
                    except FileNotFoundError:
                        continue  # released meanwhile: try again
                    why = self._stale(holder)
                    if why is None:
                        raise StoreLockedError(self._refusal(holder)) from None
                    warnings.warn(f"adaprec: taking over the stale writer lock {self.path} ({why})", stacklevel=4)
                    self.path.unlink(missing_ok=True)
                    continue
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump(me, f)
                        f.flush()
                        os.fsync(f.fileno())
                except BaseException:  # e.g. disk full: leave no empty lock behind
                    self.path.unlink(missing_ok=True)
                    raise
                self.token = me["token"]
                return
        raise StoreLockedError(  # pragma: no cover - needs a lock created and removed five times in a row
            f"cannot take the writer lock {self.path}: other processes keep taking it; stop them, then rerun"
        )

    def _stale(self, holder: Mapping[str, Any] | None) -> str | None:
        """Why the lock is stale, or None when its owner may still be running."""
        if holder is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                age = 0.0
            return f"unreadable, {age:.0f} s old" if age >= _UNREADABLE_STALE_S else None
        if holder.get("host") != socket.gethostname():
            return None  # another machine's process: cannot tell
        pid = holder.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return "it names no valid pid"
        if not _pid_alive(pid):
            return f"pid {pid} is no longer running"
        start = holder.get("proc_start")
        if isinstance(start, int) and _proc_start(pid) not in (None, start):
            return f"pid {pid} now belongs to another process"
        return None

    def _refusal(self, holder: Mapping[str, Any] | None) -> str:
        run_dir = self.path.parent
        if holder is None:
            return (f"run directory {run_dir} is being opened by another writer (its lock {self.path} is still "
                    "being written); retry in a few seconds, or choose another --out")
        pid, host = holder.get("pid"), holder.get("host")
        if pid == os.getpid() and host == socket.gethostname():
            return (f"run directory {run_dir} is already being written by this process (pid {pid}): another "
                    "ResultStore writer on it is still open; close it first")
        where = "this host" if host == socket.gethostname() else f"host {host}"
        return (f"run directory {run_dir} is being written by another adaprec run (pid {pid} on {where}, since "
                f"{_since(holder)}); wait for it to finish or stop it, or choose another --out "
                f"(if that process is gone, delete {self.path})")

    def release(self) -> None:
        if self.token is None:
            return
        token, self.token = self.token, None
        with contextlib.suppress(OSError), _dir_mutex(self.path.parent):
            holder = _read_lock(self.path)
            if holder is not None and holder.get("token") == token:  # never remove a lock someone took over
                self.path.unlink()


# --- stale temporary files -------------------------------------------------------

# tempfile.mkstemp(prefix=".NAME.", suffix=".tmp") (runner, report, timeline) and plots' ".NAME.tmp.png"
_TEMP_PATTERNS = (re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$"), re.compile(r"^\..+\.tmp\.png$"))
_TEMP_DIRS = {"checkpoints": 0.0, ".": 60.0, "plots": 60.0}  # sub-directory -> minimum age (s) before removal


def remove_stale_temp_files(run_dir: str | Path) -> list[Path]:
    """Remove temporary files that a killed atomic write left in ``run_dir``; returns what was removed.

    Call it holding the writer lock. Only names our own atomic writes use are
    touched (``.NAME.xxxxxxxx.tmp``, ``.NAME.tmp.png``), in the run directory,
    ``checkpoints/`` and ``plots/``. Checkpoint temps are removed at any age
    (only the lock holder writes checkpoints); the report's and plots' only
    when a minute old, since ``adaprec report`` (a reader) may be writing them
    right now. SQLite's ``runs.sqlite-journal`` is never touched: SQLite
    rolls a killed transaction back from it.
    """
    root = Path(run_dir)
    removed: list[Path] = []
    now = time.time()
    for sub, min_age in _TEMP_DIRS.items():
        d = root / sub
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if not any(p.match(e.name) for p in _TEMP_PATTERNS):
                continue
            try:
                if not e.is_file(follow_symlinks=False) or now - e.stat(follow_symlinks=False).st_mtime < min_age:
                    continue
                os.unlink(e.path)
            except OSError:
                continue
            removed.append(Path(e.path))
    return removed


# --- the store -------------------------------------------------------------------


def _schema_statements() -> list[str]:
    return [stmt for stmt in SCHEMA.split(";") if stmt.strip()]


def _upgrade(conn: sqlite3.Connection) -> None:
    """Create this schema, or bring an older store to it, inside the caller's transaction.

    Schema 1 had no primary key on ``timeline``: its rows are copied into the
    keyed table (rows a resume wrote twice collapse to the last one written;
    a NULL module or role becomes ''), then the old table is dropped.
    """
    cols = {r[1]: r[5] for r in conn.execute("PRAGMA table_info(timeline)")}
    old_timeline = bool(cols) and not any(cols.values())
    if old_timeline:
        conn.execute("DROP INDEX IF EXISTS timeline_run")
        conn.execute("ALTER TABLE timeline RENAME TO timeline_v1")
    for stmt in _schema_statements():
        conn.execute(stmt)
    have = {r[1] for r in conn.execute("PRAGMA table_info(energy)")}
    for col, typ in _ENERGY_V3:
        if col not in have:
            conn.execute(f"ALTER TABLE energy ADD COLUMN {col} {typ}")
    if old_timeline:
        names = ", ".join(("run_id", *_TIMELINE_COLS))
        conn.execute(
            f"INSERT OR REPLACE INTO timeline ({names}) SELECT run_id, step, COALESCE(module, ''),"
            " COALESCE(role, ''), old, new, policy, reason FROM timeline_v1 ORDER BY rowid"
        )
        conn.execute("DROP TABLE timeline_v1")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class ResultStore:
    """Runs, steps, evaluations, precision timeline and energy of one run directory.

    Args:
        run_dir: the run directory (created if missing).
        writer: take the writer lock now (the runner does, so a second run on
            the same directory fails before it trains). Otherwise the lock is
            taken at the first write; a store that only reads never takes it.

    Raises:
        StoreLockedError: another live process holds the writer lock.
        StoreError: ``runs.sqlite`` is not a database or cannot be opened.
    """

    def __init__(self, run_dir: str | Path, *, writer: bool = False) -> None:
        self.run_dir = Path(run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as e:
            why = "it is an existing file" if self.run_dir.is_file() else getattr(e, "strerror", None) or e
            raise StoreError(f"cannot use {self.run_dir} as a run directory ({why}); choose another "
                             "directory") from None
        self.path = self.run_dir / DB_NAME
        self._lock = _WriterLock(self.run_dir)
        self._release = weakref.finalize(self, self._lock.release)  # also at exit or garbage collection
        self._depth = 0
        try:
            self.conn = sqlite3.connect(self.path, timeout=30.0)
        except sqlite3.Error as e:
            self._release()
            raise StoreError(f"cannot open the result store {self.path} ({e}); check that the directory is "
                             "writable, or choose another --out") from None
        self.conn.row_factory = sqlite3.Row
        try:
            if writer:
                self._become_writer()
            else:
                self._check_readable()
        except BaseException:
            self.close()
            raise

    def _check_readable(self) -> None:
        try:
            tables = self.conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
            if not tables:  # a new, empty store: give readers the tables (idempotent, no data)
                with self.conn:
                    self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a readable adaprec result store ({e}); move it away, or "
                             "choose another --out") from None

    def _become_writer(self) -> None:
        """Take the writer lock, then create or migrate the schema."""
        if self._lock.held:
            return
        self._lock.acquire()
        try:
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                self.conn.execute("BEGIN IMMEDIATE")  # one transaction: a killed migration rolls back
                try:
                    _upgrade(self.conn)
                    self.conn.commit()
                except BaseException:
                    self.conn.rollback()
                    raise
        except sqlite3.DatabaseError as e:
            self._lock.release()
            raise StoreError(f"{self.path} is not a usable adaprec result store ({e}); move it away, or "
                             "choose another --out") from None
        except BaseException:
            self._lock.release()
            raise

    @property
    def is_writer(self) -> bool:
        """Whether this store holds its run directory's writer lock."""
        return self._lock.held

    # --- lifecycle -------------------------------------------------------
    def close(self) -> None:
        """Close the database and release the writer lock (if held). Safe to call twice."""
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()
        self._release()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (joined into the enclosing one inside :meth:`transaction`)."""
        self._become_writer()
        if self._depth:
            yield self.conn
            return
        self._depth += 1
        try:
            with self.conn:
                yield self.conn
        except sqlite3.OperationalError as e:
            if not re.search(r"full|readonly|read-only|disk I/O|locked", str(e)):
                raise
            raise StoreError(f"writing the result store {self.path} failed ({e}); free disk space or fix the "
                             "directory's permissions, then continue with --resume") from None
        finally:
            self._depth -= 1

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Group several writes so they land together or not at all."""
        with self._writing() as conn:
            yield conn

    # --- writing ---------------------------------------------------------
    def start_run(
        self,
        run_id: str,
        *,
        task: str,
        policy: str,
        seed: int,
        metric: str,
        higher_is_better: bool,
        total_steps: int,
        energy_profile: str,
        config: Mapping[str, Any],
        initial_plan: Mapping[str, Any] | None,
    ) -> None:
        """Record a run as started (or restarted); its rows so far are kept."""
        with self._writing():
            self.conn.execute(
                "INSERT INTO runs (run_id, task, policy, seed, status, started, metric, higher_is_better,"
                " total_steps, energy_profile, config_json, initial_plan_json)"
                " VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(run_id) DO UPDATE SET status='running', finished=NULL, final_metric=NULL, error=NULL",
                (
                    run_id, task, policy, seed, time.time(), metric, int(higher_is_better), total_steps,
                    energy_profile, json.dumps(dict(config), default=str),
                    json.dumps(initial_plan) if initial_plan is not None else None,
                ),
            )

    def add_steps(self, run_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
        self._insert("steps", run_id, _STEP_COLS, rows)

    def add_evals(self, run_id: str, step: int, values: Mapping[str, float]) -> None:
        with self._writing():
            self.conn.executemany(
                "INSERT OR REPLACE INTO evals VALUES (?, ?, ?, ?)",
                [(run_id, step, k, float(v)) for k, v in values.items()],
            )

    def add_timeline(self, run_id: str, events: Iterable[Any]) -> None:
        """Timeline events (objects or dicts with step, module, role, old, new, policy, reason).

        Keyed by (run_id, step, module, role): writing an event again (a resume
        replaying steps) replaces it instead of adding a second row.
        """
        rows = [{c: _get(e, c) for c in _TIMELINE_COLS} for e in events]
        for r in rows:
            r["module"], r["role"] = r["module"] or "", r["role"] or ""
        self._insert("timeline", run_id, _TIMELINE_COLS, rows)

    def add_energy(self, run_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Energy ledger rows; ``bytes_moved`` is accepted for ``bytes``, dicts are stored as JSON."""
        fixed = []
        for r in rows:
            d = dict(r)
            d.setdefault("bytes", d.get("bytes_moved"))
            if not isinstance(d.get("macs_by_format"), (str, type(None))):
                d["macs_by_format"] = json.dumps(d["macs_by_format"])
            fixed.append(d)
        self._insert("energy", run_id, _ENERGY_COLS, fixed)

    def _insert(self, table: str, run_id: str, cols: tuple[str, ...], rows: Iterable[Any]) -> None:
        """Keyed rows, replaced when written again: a replayed write never duplicates a row."""
        values = [(run_id, *(_value(_get(r, c)) for c in cols)) for r in rows]
        if not values:
            return
        marks = ", ".join("?" * (len(cols) + 1))
        with self._writing() as conn:
            conn.executemany(f"INSERT OR REPLACE INTO {table} (run_id, {', '.join(cols)}) VALUES ({marks})", values)

    def finish_run(self, run_id: str, *, final_metric: float, wall_time_s: float, summary: Mapping[str, Any]) -> None:
        with self._writing():
            self.conn.execute(
                "UPDATE runs SET status='finished', finished=?, final_metric=?, wall_time_s=? WHERE run_id=?",
                (time.time(), float(final_metric), float(wall_time_s), run_id),
            )
            self.conn.execute(
                "INSERT OR REPLACE INTO summary VALUES (?, ?)", (run_id, json.dumps(dict(summary), default=str))
            )

    def fail_run(self, run_id: str, *, reason: str, wall_time_s: float) -> None:
        """Mark a run that stopped on an error (e.g. unstable even in fp32); the report shows why."""
        with self._writing():
            self.conn.execute(
                "UPDATE runs SET status='failed', finished=?, wall_time_s=?, error=? WHERE run_id=?",
                (time.time(), float(wall_time_s), reason, run_id),
            )

    # --- resume ----------------------------------------------------------
    def finished_runs(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT run_id FROM runs WHERE status='finished'")}

    def delete_partial(self, run_id: str, from_step: int = 0) -> None:
        """Drop what a killed run wrote after its checkpoint at ``from_step`` completed steps.

        Removes steps, timeline and energy rows with ``step >= from_step`` and
        evaluations with ``step > from_step``; ``from_step=0`` clears the run.
        """
        with self._writing():
            for table in ("steps", "timeline", "energy"):
                self.conn.execute(f"DELETE FROM {table} WHERE run_id=? AND step>=?", (run_id, from_step))
            self.conn.execute("DELETE FROM evals WHERE run_id=? AND step>?", (run_id, from_step))
            self.conn.execute("DELETE FROM summary WHERE run_id=?", (run_id,))

    # --- reading ---------------------------------------------------------
    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, params)]

    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        if status is None:
            return self.query("SELECT * FROM runs ORDER BY rowid")
        return self.query("SELECT * FROM runs WHERE status=? ORDER BY rowid", (status,))

    def rows(self, table: str, run_id: str) -> list[dict[str, Any]]:
        if table not in ("steps", "evals", "timeline", "energy"):
            raise ValueError(f"no table {table!r}")
        order = "step, rowid" if table != "evals" else "step, metric"
        return self.query(f"SELECT * FROM {table} WHERE run_id=? ORDER BY {order}", (run_id,))

    def summary(self, run_id: str) -> dict[str, Any] | None:
        r = self.conn.execute("SELECT json FROM summary WHERE run_id=?", (run_id,)).fetchone()
        return json.loads(r[0]) if r else None


def _value(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    if v is not None and not isinstance(v, (int, float, str, bytes)):
        return float(v) if hasattr(v, "__float__") else str(v)
    return v
