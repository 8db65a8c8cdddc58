"""Experiment config: validation before any training, errors that name key, values and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from adaprec.errors import ConfigError
from adaprec.experiments.config import ExperimentConfig, load_config, parse_config

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", [p for p in EXAMPLES if p.name != "user-task.yaml"], ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.policies[0].name == "fp32"
    assert len(cfg.seeds) >= 1


def test_user_task_example_loads_with_its_module_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    path = next(p for p in EXAMPLES if p.name == "user-task.yaml")
    with pytest.raises(ConfigError, match="cannot import module 'my_task'"):
        load_config(path)
    monkeypatch.syspath_prepend(str(path.parent))
    assert load_config(path).task == "my_task:make_task"


def test_baseline_added_and_seed_count_expanded() -> None:
    cfg = parse_config({"task": "digits-cnn", "policies": ["bf16", {"name": "cyclic", "kwargs": {"bmin": 4}}], "seeds": 3})
    assert [p.label for p in cfg.policies] == ["fp32", "bf16", "cyclic(bmin=4)"]
    assert cfg.policies[2].build_arg() == {"name": "cyclic", "bmin": 4}
    assert cfg.seeds == (0, 1, 2)
    assert cfg.total_steps(steps_per_epoch=22, default_steps=300) == 300
    cfg = parse_config({"task": "digits-cnn", "policies": ["fp32", "bf16"], "seeds": [5, 7], "epochs": 2})
    assert [p.label for p in cfg.policies] == ["fp32", "bf16"]
    assert cfg.seeds == (5, 7)
    assert cfg.total_steps(steps_per_epoch=22, default_steps=300) == 44


def test_config_is_frozen() -> None:
    cfg = parse_config({"task": "digits-cnn"})
    with pytest.raises(ValidationError):
        cfg.steps = 5  # type: ignore[misc]
    assert isinstance(cfg, ExperimentConfig)


def test_typo_key_names_line_and_suggestion(tmp_path: Path) -> None:
    p = _write(tmp_path, "task: digits-cnn\npolicies: [bf16]\nstep: 100\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "line 3" in msg and "'step'" in msg and "did you mean 'steps'" in msg and "allowed keys:" in msg


def test_unknown_policy_names_line_and_known_policies(tmp_path: Path) -> None:
    p = _write(tmp_path, "task: digits-cnn\npolicies:\n  - bf16\n  - fp9\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "line 4" in msg and "unknown policy 'fp9'" in msg and "error-budget" in msg


def test_bad_policy_option_is_caught_before_training(tmp_path: Path) -> None:
    p = _write(tmp_path, "task: digits-cnn\npolicies:\n  - name: cyclic\n    kwargs: {bogus: 1}\n")
    with pytest.raises(ConfigError, match=r"line 3.*no option 'bogus'"):
        load_config(p)


def test_unknown_task_and_nonpositive_steps(tmp_path: Path) -> None:
    p = _write(tmp_path, "task: digit-cnn\nsteps: -5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "line 1" in msg and "did you mean 'digits-cnn'" in msg and "known tasks:" in msg
    assert "line 2" in msg and "steps: must be greater than 0, got -5" in msg


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"task": "digits-cnn", "steps": 10, "epochs": 1}, "steps or epochs, not both"),
        ({"task": "digits-cnn", "seeds": 0}, "seeds as a count must be >= 1"),
        ({"task": "digits-cnn", "seeds": [1, 1]}, "seeds must be distinct"),
        ({"task": "digits-cnn", "policies": ["bf16", "bf16"]}, "policies listed twice"),
        ({"task": "digits-cnn", "energy_profile": "3nm"}, "energy profile '3nm'"),
        ({"task": "digits-cnn", "policies": ["replay:"]}, "needs a timeline file"),
        ({"policies": ["bf16"]}, "task: required key is missing"),
        ({"task": "digits-cnn", "monitor_every": 0}, "monitor_every: must be greater than 0"),
    ],
)
def test_invalid_values(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        parse_config(data)


def test_replay_path_is_relative_to_the_config(tmp_path: Path) -> None:
    p = _write(tmp_path, "task: digits-cnn\npolicies: ['replay:missing.json']\n")
    with pytest.raises(ConfigError, match=r"line 2.*missing.json' does not exist"):
        load_config(p)


def test_yaml_syntax_and_shape_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="line 2: not valid YAML"):
        load_config(_write(tmp_path, "task: [\n"))
    with pytest.raises(ConfigError, match="is a mapping"):
        load_config(_write(tmp_path, "- digits-cnn\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
