"""The result store: one SQLite file per run directory, readable with plain SQL.

Every write is a transaction, so a killed run leaves whole rows or none.
Step numbers are optimizer-step indices (0-based, as ``StepResult.step``);
an evaluation's ``step`` is the number of steps completed when it ran. The
schema is documented in docs/experiments.md.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["ResultStore", "SCHEMA", "DB_NAME"]

DB_NAME = "runs.sqlite"

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
    run_id TEXT NOT NULL, step INTEGER NOT NULL, module TEXT, role TEXT, old TEXT, new TEXT,
    policy TEXT, reason TEXT
);
CREATE INDEX IF NOT EXISTS timeline_run ON timeline (run_id, step);
CREATE TABLE IF NOT EXISTS energy (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, macs REAL, bitops REAL, bytes REAL,
    modeled_j REAL, fp32_modeled_j REAL, bf16_modeled_j REAL, measured_j REAL, measured_reason TEXT,
    macs_by_format TEXT,              -- JSON {format: MACs}
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
    "measured_j", "measured_reason", "macs_by_format",
)


def _get(row: Any, key: str) -> Any:
    return row.get(key) if isinstance(row, Mapping) else getattr(row, key, None)


class ResultStore:
    """Runs, steps, evaluations, precision timeline and energy of one run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / DB_NAME
        self.conn = sqlite3.connect(self.path)
        self.conn.row_factory = sqlite3.Row
        with self.conn:
            self.conn.executescript(SCHEMA)

    # --- lifecycle -------------------------------------------------------
    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Group several writes so they land together or not at all."""
        with self.conn:
            yield self.conn

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
        with self.conn:
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
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO evals VALUES (?, ?, ?, ?)",
                [(run_id, step, k, float(v)) for k, v in values.items()],
            )

    def add_timeline(self, run_id: str, events: Iterable[Any]) -> None:
        """Timeline events (objects or dicts with step, module, role, old, new, policy, reason)."""
        self._insert("timeline", run_id, _TIMELINE_COLS, events, replace=False)

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

    def _insert(
        self, table: str, run_id: str, cols: tuple[str, ...], rows: Iterable[Any], replace: bool = True
    ) -> None:
        values = [(run_id, *(_value(_get(r, c)) for c in cols)) for r in rows]
        if not values:
            return
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        marks = ", ".join("?" * (len(cols) + 1))
        with self.conn:
            self.conn.executemany(f"{verb} INTO {table} (run_id, {', '.join(cols)}) VALUES ({marks})", values)

    def finish_run(self, run_id: str, *, final_metric: float, wall_time_s: float, summary: Mapping[str, Any]) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE runs SET status='finished', finished=?, final_metric=?, wall_time_s=? WHERE run_id=?",
                (time.time(), float(final_metric), float(wall_time_s), run_id),
            )
            self.conn.execute(
                "INSERT OR REPLACE INTO summary VALUES (?, ?)", (run_id, json.dumps(dict(summary), default=str))
            )

    def fail_run(self, run_id: str, *, reason: str, wall_time_s: float) -> None:
        """Mark a run that stopped on an error (e.g. unstable even in fp32); the report shows why."""
        with self.conn:
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
        with self.conn:
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
