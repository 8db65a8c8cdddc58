"""Progress that fits where it is written: a live bar on a terminal, one line per evaluation anywhere else."""

from __future__ import annotations

import io
import re
import sys

import pytest

from adaprec.experiments import runner
from adaprec.experiments.config import parse_config


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drive(bar, total: int) -> None:
    """The calls the runner makes on its bar, in its order."""
    for done in range(1, total + 1):
        bar.update(1)
        if done % 10 == 0:
            bar.set_postfix_str(f"loss {1 / done:.3f} | bf16:3")
    bar.close()


def test_a_log_gets_one_line_per_evaluation_and_no_carriage_return() -> None:
    out = io.StringIO()
    bar = runner._bar("digits-cnn-seed0", 50, 0, True, every=20, file=out)
    _drive(bar, 50)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert [re.search(r"step (\d+)/50", line).group(1) for line in lines] == ["20", "40", "50"]
    assert lines[0].startswith("digits-cnn-seed0: step 20/50 (40%)") and lines[0].endswith("| loss 0.050 | bf16:3")
    assert lines[2].endswith("| loss 0.020 | bf16:3")  # the last line shows the last step's postfix


def test_a_resumed_run_counts_from_its_checkpoint() -> None:
    out = io.StringIO()
    _drive(runner._bar("r", 30, 12, True, every=10, file=out), 30 - 12)
    assert [re.search(r"step (\d+)/30", line).group(1) for line in out.getvalue().splitlines()] == ["20", "30"]


def test_a_terminal_gets_a_live_bar() -> None:
    term = _Terminal()
    _drive(runner._bar("r", 50, 0, True, every=20, file=term), 50)
    assert "\r" in term.getvalue() and "50/50" in term.getvalue()


def test_disabled_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    _drive(runner._bar("r", 50, 0, False, every=20), 50)
    assert err.getvalue() == ""


def test_a_run_logged_to_a_file_writes_plain_lines(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`adaprec run ... 2> log` (CI, nohup): one line per evaluation and run end, not hundreds of bar updates."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    cfg = parse_config({"task": "digits-cnn", "policies": ["bf16"], "seeds": 1, "steps": 12, "eval_every": 4})
    runner.run_experiment(cfg, tmp_path / "d", progress=True, report=False)
    text = err.getvalue()
    assert "\r" not in text
    lines = [line for line in text.splitlines() if ": step " in line]
    for run_id in ("fp32-seed0", "bf16-seed0"):
        steps = [re.search(r"step (\d+)/12", line).group(1) for line in lines if line.startswith(run_id + ":")]
        assert steps == ["4", "8", "12"], text
