"""kill -9 of ``adaprec run``, short version (bench/bench_reliability.py runs the long soak).

A real ``adaprec run`` subprocess on digits-cnn (fp32 baseline + error-budget,
120 steps each, a checkpoint every 20) is killed with SIGKILL twice, each time
at a random moment after that life wrote a checkpoint (so the kill lands in
training, a checkpoint write or the report, not in Python's start-up), and
resumed; then resumed to the end. Its store must equal an uninterrupted
run's, every row of every table, measured wall times aside.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from bench_reliability import TABLES, WALL_COLUMNS, soak, store_rows  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_two_sigkills_and_resume_give_the_uninterrupted_store(tmp_path):
    s = soak(tmp_path, kills=2, policies=("error-budget",), seeds=(0,), steps=120, checkpoint_every=20,
             eval_every=40, seed=11, wait_for_checkpoint=True, log=lambda _msg: None)
    assert len(s.kills) == 2, s  # both kills hit a live process
    assert all(k.phase in ("training", "end of training") for k in s.kills), s.kills
    assert any(k.checkpointed_steps < s.total_steps for k in s.kills), "no kill landed before training ended"
    assert len(s.rounds) == 1 and s.lives == 3, s.rounds
    assert s.identical, s.diffs
    assert s.leftovers == [], s.leftovers  # no temp file of a killed write, no writer lock
    # the comparison is not vacuous: every table has rows, both runs finished, one step row per step
    assert s.rows["steps"] == s.rows["energy"] == s.total_steps == 240 and s.rows["timeline"] > 0, s.rows
    rows = store_rows(tmp_path / "round0" / "out")
    assert [r["status"] for r in rows["runs"]] == ["finished", "finished"]
    assert not any(WALL_COLUMNS & set(r) for t in TABLES for r in rows[t])
    conn = sqlite3.connect(tmp_path / "round0" / "out" / "runs.sqlite")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
