"""Errors from the CLI: every user mistake is one line `adaprec: error: ...` and exit 2, never a traceback.

The fuzz feeds `adaprec.cli.main` in-process with configs that are wrong in one
or several keys (wrong types, negative numbers, unknown keys, garbage bytes);
each must be refused before any training starts.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaprec import cli
from adaprec.errors import ConfigError, StoreLockedError, TaskError
from adaprec.experiments import runner
from adaprec.experiments.config import POLICY_NAMES, ExperimentConfig
from adaprec.experiments.store import DB_NAME, ResultStore
from adaprec.experiments.tasks import task_names

OK = {"task": "digits-cnn", "policies": ["bf16"], "seeds": 1, "steps": 2, "checkpoint_every": 2}


def _run(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def _one_error_line(rc: int, err: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaprec: error: "), err
    return lines[0]


def _yaml(tmp_path: Path, data: object, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, allow_unicode=True))
    return p


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if a config meant to be refused reaches the runner."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bad config passed validation and reached run_experiment")

    monkeypatch.setattr(runner, "run_experiment", refuse)


# --- the listed bad inputs --------------------------------------------------------


def test_binary_garbage_yaml(tmp_path: Path, no_training: None) -> None:
    p = tmp_path / "garbage.yaml"
    p.write_bytes(bytes(range(256)) * 3)
    line = _one_error_line(*_run(["run", str(p)])[::2])
    assert "is not a text file" in line and "YAML text" in line


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("task: digits-cnn\npolicies: 42\n",
         "line 2: policies: expected a policy name or a list of policies, got 42 (an integer); e.g. policies: ["),
        ("task: digits-cnn\nseeds: [-1]\n", "seeds[0]: must be at least 0, got -1"),
        ("task: digits-cnn\nseeds: [3, 3]\n", "seeds must be distinct"),
        ("task: digits-cnn\nseeds: -2\n", "seeds as a count must be >= 1"),
        ("task: digits-cnn\nsteps: true\n", "steps: expected a whole number of optimizer steps > 0, got True"),
        ("task: digits-cnn\nsteps: '5'\n", "got '5' (text); e.g. steps: 500"),
        ("task: digits-cnn\ncompile: 3\n", "compile: expected true or false, got 3"),
        ("task: digits-cnn\npolicies: [{name: cyclic, kwargs: 5}]\n", "policies[0].kwargs: expected a mapping"),
        ("task: 7\n", "task: expected a task name"),
        ("task: digits-cnn\nstep: 5\n", "did you mean 'steps'"),
        ("task: digits-cnn\nsteps: 1.5\n", "got 1.5 (a number)"),
        ("- digits-cnn\n", "is a mapping"),
        ("task: [\n", "line 2: not valid YAML"),
        ("task: digits-cnn\x00\n", "not allowed in YAML"),
        ("", "task: required key is missing; add it, e.g. task: digits-cnn"),
        ("task: digits-cnn\nsteps: 0\nfoo: 1\n", "2 problems: [1]"),
    ],
)
def test_bad_values_are_one_line_with_the_fix(tmp_path: Path, no_training: None, text: str, needle: str) -> None:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    rc, out, err = _run(["run", str(p)])
    assert needle in _one_error_line(rc, err)


def test_out_naming_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("mine")
    rc, _, err = _run(["run", str(_yaml(tmp_path, OK)), "--out", str(tmp_path / "afile"), "--quiet"])
    assert "is an existing file, not a directory; choose another --out" in _one_error_line(rc, err)
    assert (tmp_path / "afile").read_text() == "mine"


def test_resume_of_a_missing_dir_or_a_dir_without_a_store(tmp_path: Path) -> None:
    cfg = str(_yaml(tmp_path, OK))
    rc, _, err = _run(["run", cfg, "--out", str(tmp_path / "nope"), "--resume", "--quiet"])
    assert "does not exist; run without --resume to start" in _one_error_line(rc, err)
    assert not (tmp_path / "nope").exists()
    (tmp_path / "empty").mkdir()
    rc, _, err = _run(["run", cfg, "--out", str(tmp_path / "empty"), "--resume", "--quiet"])
    assert f"holds no result store ({DB_NAME})" in _one_error_line(rc, err) and "run without --resume" in err
    assert list((tmp_path / "empty").iterdir()) == []


def test_second_writer_is_refused_naming_the_pid(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with ResultStore(run_dir, writer=True):  # a first run writing this directory
        rc, _, err = _run(["run", str(_yaml(tmp_path, OK)), "--out", str(run_dir), "--resume", "--quiet"])
    line = _one_error_line(rc, err)
    assert f"pid {os.getpid()}" in line and "close it first" in line


def test_unreadable_store_in_report(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"\x00garbage" * 100)
    rc, _, err = _run(["report", str(tmp_path)])
    assert "is not a readable adaprec result store" in _one_error_line(rc, err)


def _user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_user_task_function_raising_is_a_task_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _user_module(tmp_path, monkeypatch, "ut_raises", """
        def make_task():
            raise RuntimeError("the data\\nis gone")
    """)
    cfg = _yaml(tmp_path, {**OK, "task": "ut_raises:make_task"})
    rc, _, err = _run(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"])
    line = _one_error_line(rc, err)
    assert "'ut_raises:make_task'" in line and "RuntimeError: the data is gone" in line and "--debug" in line
    with pytest.raises(TaskError) as e:  # the library call keeps the user's exception as the cause
        runner.run_experiment(ExperimentConfig(**{**OK, "task": "ut_raises:make_task"}), tmp_path / "run2")
    assert isinstance(e.value.__cause__, RuntimeError) and str(e.value.__cause__) == "the data\nis gone"


def test_user_task_module_raising_on_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _user_module(tmp_path, monkeypatch, "ut_import", "raise ValueError('no config for the module')\n")
    cfg = _yaml(tmp_path, {**OK, "task": "ut_import:make_task"})
    line = _one_error_line(*_run(["run", str(cfg)])[::2])
    assert re.search(r"line \d+: task: importing the task entry point 'ut_import:make_task' raised ValueError: "
                     r"no config for the module; fix that module", line)
    with pytest.raises(TaskError) as e:
        from adaprec.experiments.config import load_config

        load_config(cfg)
    assert isinstance(e.value.__cause__, ValueError)


def test_user_task_failing_mid_run_names_the_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user task whose loss raises on its second step: training starts (digits, 2 steps), then stops clearly."""
    _user_module(tmp_path, monkeypatch, "ut_loss", """
        from dataclasses import replace
        from adaprec.experiments.tasks import get_task

        def make_task():
            task = get_task("digits-cnn")
            calls = []

            def loss_fn(out, y):
                calls.append(1)
                if len(calls) == 2:
                    raise IndexError("label 10 out of range")
                return task.loss_fn(out, y)

            return replace(task, name="ut-loss", loss_fn=loss_fn)
    """)
    cfg = _yaml(tmp_path, {**OK, "task": "ut_loss:make_task", "policies": ["fp32"]})
    rc, _, err = _run(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"])
    line = _one_error_line(rc, err)
    assert "run fp32-seed0 of user task 'ut_loss:make_task' raised IndexError: label 10 out of range" in line
    assert not (tmp_path / "run" / "writer.lock").exists()  # the lock went with the failed run


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    p = tmp_path / "garbage.yaml"
    p.write_bytes(b"\xff\xfe\x00bad")
    for argv in (["--debug", "run", str(p)], ["run", str(p), "--debug"]):
        with pytest.raises(ConfigError, match="not a text file"):
            cli.main(argv)
    proc = subprocess.run([sys.executable, "-m", "adaprec.cli", "--debug", "run", str(p)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "adaprec.errors.ConfigError" in proc.stderr


def test_internal_error_is_one_line_exit_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("division by zero\nin the ledger")

    monkeypatch.setattr(runner, "run_experiment", broken)
    rc, _, err = _run(["run", str(_yaml(tmp_path, OK))])
    assert rc == 1 and err.splitlines() == [
        "adaprec: internal error: ZeroDivisionError: division by zero in the ledger "
        "(rerun with --debug for the traceback; please report it)"
    ]
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "run", str(_yaml(tmp_path, OK))])


def test_interrupt_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_experiment", interrupted)
    rc, _, err = _run(["run", str(_yaml(tmp_path, OK))])
    assert rc == 130 and err.splitlines() == [
        "adaprec: interrupted; rerun the same command with --resume to continue"
    ]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [([], "required: command"), (["run"], "required: config"), (["bogus"], "invalid choice"),
     (["run", "x.yaml", "--nope"], "unrecognized arguments: --nope")],
)
def test_usage_errors_are_one_line(argv: list[str], needle: str) -> None:
    line = _one_error_line(*_run(argv)[::2])
    assert needle in line and "--help'" in line


def test_lock_refusal_is_an_adaprec_error(tmp_path: Path) -> None:
    with ResultStore(tmp_path, writer=True), pytest.raises(StoreLockedError):
        ResultStore(tmp_path, writer=True)


# --- the fuzz ---------------------------------------------------------------------

FIELDS = tuple(ExperimentConfig.model_fields)
FUZZED = {"configs": 0, "exit_2": 0}  # read by docs/reliability.md's figure (printed with -s)

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), _text)
_junk = st.one_of(_scalars, st.lists(_scalars, max_size=3), st.dictionaries(_text, _scalars, max_size=3))
_non_positive = st.integers(-10**12, 0)
_not_int = st.one_of(st.booleans(), _text, st.floats().filter(lambda f: not f.is_integer()),
                     st.lists(st.integers(), max_size=2), st.dictionaries(_text, _scalars, max_size=2))
_count_bad = st.one_of(_non_positive, _not_int, st.integers(2**31, 2**70))


def _not(values: object) -> object:
    return lambda s: s not in values  # type: ignore[operator]


BAD: dict[str, st.SearchStrategy[object]] = {
    "task": st.one_of(_junk.filter(lambda v: not isinstance(v, str)),
                      _text.filter(lambda s: ":" not in s).filter(_not(task_names()))),
    "policies": st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(),
        _text.filter(_not(POLICY_NAMES)).filter(lambda s: not s.startswith("replay:")),
        st.lists(st.one_of(st.integers(), st.booleans(), st.none()), min_size=1, max_size=3),
        st.dictionaries(_text.filter(_not(("name", "kwargs"))), _scalars, min_size=1, max_size=2),
        st.lists(st.fixed_dictionaries({"name": st.sampled_from(("cyclic", "bf16")), "kwargs": _scalars}),
                 min_size=1, max_size=1),
    ),
    "seeds": st.one_of(
        _non_positive, st.booleans(), st.floats(), _text, st.none(), st.just([]),
        st.lists(st.integers(-10**9, -1), min_size=1, max_size=3),
        st.lists(st.integers(0, 3), min_size=2, max_size=4).filter(lambda v: len(set(v)) < len(v)),
        st.lists(st.one_of(st.booleans(), _text, st.none()), min_size=1, max_size=3),
        st.integers(2**32, 2**40).map(lambda s: [s]),
    ),
    "steps": _count_bad,
    "epochs": _count_bad,
    "eval_every": _count_bad,
    "checkpoint_every": st.one_of(_count_bad, st.none()),
    "monitor_every": st.one_of(_count_bad, st.none()),
    "energy_profile": st.one_of(_junk.filter(lambda v: not isinstance(v, str)),
                                _text.map(lambda s: "no-such-profile-" + s)),
    "compile": _junk.filter(lambda v: not isinstance(v, bool)),
    "quiet": _junk.filter(lambda v: not isinstance(v, bool)),
    "out": _junk.filter(lambda v: v is not None and not isinstance(v, str)),
    "loggers": st.one_of(st.integers(), st.floats(), st.booleans(),
                         _text.filter(_not(("tensorboard", "mlflow", ""))),
                         st.lists(st.one_of(st.integers(), st.none()), min_size=1, max_size=2),
                         st.just(["mlflow", "mlflow"])),
    "mlflow_tracking_uri": st.one_of(_junk.filter(lambda v: v is not None), _text),  # no mlflow logger: refused
}
assert set(BAD) == set(FIELDS), set(FIELDS) ^ set(BAD)
UNKNOWN_KEY = _text.filter(lambda k: k not in FIELDS)


@st.composite
def bad_configs(draw: st.DrawFn) -> dict[object, object]:
    data: dict[object, object] = dict(OK)
    for key in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        data[key] = draw(BAD[key])
    if draw(st.booleans()) and draw(st.booleans()):
        data[draw(UNKNOWN_KEY)] = draw(_scalars)
    return data


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.one_of(bad_configs(), st.dictionaries(UNKNOWN_KEY, _scalars, min_size=1, max_size=3)
                      .map(lambda d: {**OK, **d})))
def test_fuzzed_configs_exit_2_before_training(tmp_path: Path, no_training: None, data: dict) -> None:
    path = _yaml(tmp_path, data)
    rc, out, err = _run(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    FUZZED["configs"] += 1
    _one_error_line(rc, err)
    FUZZED["exit_2"] += 1
    assert not (tmp_path / "run").exists()


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(min_size=1, max_size=200),
                     st.binary(max_size=60).map(lambda b: b"task: digits-cnn\n" + b)))
def test_fuzzed_garbage_bytes_exit_2(tmp_path: Path, no_training: None, raw: bytes) -> None:
    path = tmp_path / "garbage.yaml"
    path.write_bytes(raw)
    rc, out, err = _run(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    if rc == 1 and "passed validation" in err:  # garbage that happens to be a valid config: nothing to check
        return
    FUZZED["configs"] += 1
    _one_error_line(rc, err)
    FUZZED["exit_2"] += 1


def test_fuzz_counted() -> None:
    """Runs after the two fuzz tests (file order): every fuzzed config exited 2."""
    if FUZZED["configs"]:
        print(f"\nfuzzed configs: {FUZZED['configs']}, exit 2: {FUZZED['exit_2']}")
        assert FUZZED["configs"] == FUZZED["exit_2"]
