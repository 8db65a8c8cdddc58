"""Experiment config: a frozen, validated description of one comparison.

Every mistake is caught here, before any training starts, and reported as
:class:`~adaprec.errors.ConfigError` on one line naming the key, the line of
the YAML file it came from, what was expected (with an example) and what was
found. A user task whose module fails to import is a
:class:`~adaprec.errors.TaskError` naming the entry point and the original
error (kept as ``__cause__``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from adaprec.errors import AdaprecError, ConfigError, TaskError
from adaprec.integrations.logging import LOGGER_NAMES

__all__ = ["POLICY_NAMES", "PolicySpec", "ExperimentConfig", "load_config", "parse_config"]

POLICY_NAMES = (
    "fp32", "bf16", "fp16", "fp8", "fp8-hybrid", "schedule", "cyclic", "progressive",
    "gradient-diversity", "error-budget",
)


MAX_COUNT = 2**31 - 1  # steps, epochs and intervals: more is a typo (and overflows the store's integers)
MAX_SEED = 2**32 - 1
MAX_SEED_COUNT = 10_000


def _int_only(v: Any) -> Any:
    # YAML already types numbers: true (bool) or "5" (text) where an integer belongs is a mistake, not a 1 or a 5
    if isinstance(v, (bool, str, bytes)):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return v


def _one_line(e: BaseException) -> str:
    text = re.sub(r"\s*\n\s*", " ", str(e)).strip()
    return text or type(e).__name__


Count = Annotated[int, BeforeValidator(_int_only), Field(gt=0, le=MAX_COUNT)]
Seed = Annotated[int, BeforeValidator(_int_only), Field(ge=0, le=MAX_SEED)]


def _check_policy_name(name: str, base_dir: Path | None = None) -> str:
    if name.startswith("replay:"):
        raw = name[len("replay:"):].strip()
        if not raw:
            raise ValueError("replay policy needs a timeline file: 'replay:path/to/timeline.json'")
        path = Path(raw) if Path(raw).is_absolute() or base_dir is None else base_dir / raw
        if not path.is_file():
            raise ValueError(
                f"replay timeline {str(path)!r} does not exist; write one with Timeline.to_json() or fix the "
                "path (relative paths are relative to the config file)"
            )
        return f"replay:{path}"
    if name not in POLICY_NAMES:
        close = difflib.get_close_matches(name, POLICY_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown policy {name!r}{hint}; known policies: {', '.join(POLICY_NAMES)}, replay:<timeline.json>"
        )
    return name


class PolicySpec(BaseModel):
    """One policy to compare: a name and optional keyword arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str, info: ValidationInfo) -> str:
        return _check_policy_name(v, (info.context or {}).get("base_dir"))

    @model_validator(mode="after")
    def _buildable(self) -> PolicySpec:
        # The policy registry knows each policy's options: ask it now, not mid-run.
        try:
            from adaprec.policies import build
        except ImportError:  # policies not importable: names were still checked above
            return self
        try:
            build(self.build_arg())
        except AdaprecError as e:
            raise ValueError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a policy tripping over an odd option value is still a bad option
            raise ValueError(
                f"policy {self.name!r} cannot be built with kwargs {self.kwargs} ({type(e).__name__}: "
                f"{_one_line(e)}); check the option values (docs/policies.md)"
            ) from None
        return self

    @property
    def label(self) -> str:
        """Readable, file-name-safe identifier: ``error-budget`` or ``error-budget(budget_db=30)``."""
        if not self.kwargs:
            return self.name
        return self.name + "(" + ",".join(f"{k}={v}" for k, v in sorted(self.kwargs.items())) + ")"

    def build_arg(self) -> str | dict[str, Any]:
        """What ``adaprec.AdaptivePrecision(policy=...)`` takes."""
        return self.name if not self.kwargs else {"name": self.name, **self.kwargs}


class ExperimentConfig(BaseModel):
    """A comparison of precision policies on one task, over seeds.

    The fp32 baseline is always run, listed or not. Give ``steps`` or
    ``epochs`` (not both); with neither, the task's default steps are used.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    policies: tuple[PolicySpec, ...] = Field(default=(), validate_default=True)
    seeds: tuple[Seed, ...] = Field(default=(0,), validate_default=True)
    steps: Count | None = None
    epochs: Count | None = None
    eval_every: Count | None = None
    checkpoint_every: Count = 100
    energy_profile: str = "7nm"
    monitor_every: Count = 10
    compile: StrictBool = False  # fuse quantization kernels with torch.compile (same bits, faster stochastic rounding)
    out: str | None = None
    quiet: StrictBool = False
    loggers: tuple[str, ...] = ()  # also send results to these (see docs/experiments.md); the store is always written
    mlflow_tracking_uri: str | None = None  # default: a file store RUN_DIR/mlruns

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from adaprec.experiments.tasks import resolve_entry_point, task_names

        if ":" in v:
            try:
                resolve_entry_point(v)
            except AdaprecError as e:
                raise ValueError(str(e)) from None
            except Exception as e:  # noqa: BLE001 - parse_config reports a failing import as TaskError first
                raise ValueError(f"task entry point {v!r} cannot be imported ({type(e).__name__}: "
                                 f"{_one_line(e)}); fix it, or name a built-in task") from None
            return v
        names = task_names()
        if v not in names:
            close = difflib.get_close_matches(v, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown task {v!r}{hint}; known tasks: {', '.join(names)}, or 'package.module:function'"
            )
        return v

    @field_validator("energy_profile")
    @classmethod
    def _known_profile(cls, v: str) -> str:
        try:
            from adaprec.energy.profiles import load_profile
        except ImportError:
            return v
        try:
            load_profile(v)
        except AdaprecError as e:
            raise ValueError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - an unreadable profile file (a directory, no permission, ...)
            raise ValueError(
                f"energy profile {v!r} cannot be read ({type(e).__name__}: {_one_line(e)}); give a bundled "
                "profile name (e.g. 7nm) or the path of a TOML profile"
            ) from None
        return v

    @field_validator("policies", mode="before")
    @classmethod
    def _policy_specs(cls, v: Any) -> Any:
        if isinstance(v, (str, Mapping)):
            v = [v]
        if not isinstance(v, Sequence):
            return v
        return [{"name": p} if isinstance(p, str) else p for p in v]

    @field_validator("policies")
    @classmethod
    def _with_baseline(cls, v: tuple[PolicySpec, ...]) -> tuple[PolicySpec, ...]:
        labels = [p.label for p in v]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"policies listed twice: {dup}; list each once")
        if "fp32" not in labels:
            v = (PolicySpec(name="fp32"), *v)
        return v

    @field_validator("loggers", mode="before")
    @classmethod
    def _logger_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("loggers")
    @classmethod
    def _known_loggers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if name not in LOGGER_NAMES:
                close = difflib.get_close_matches(name, LOGGER_NAMES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown logger {name!r}{hint}; known loggers: {', '.join(LOGGER_NAMES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"loggers listed twice: {list(v)}; list each once")
        return v

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"seeds must be a count (an integer >= 1) or a list of integers >= 0, got {v!r}; "
                             "e.g. seeds: 3 or seeds: [0, 1, 2]")
        if isinstance(v, int):
            if v < 1:
                raise ValueError(f"seeds as a count must be >= 1, got {v}; e.g. seeds: 3 (runs seeds 0, 1, 2)")
            if v > MAX_SEED_COUNT:
                raise ValueError(f"seeds as a count must be at most {MAX_SEED_COUNT}, got {v}; "
                                 "list the seeds you want instead, e.g. seeds: [0, 1, 2]")
            return list(range(v))
        if isinstance(v, (str, bytes)):  # a string is a sequence of characters, not of seeds
            raise PydanticCustomError("tuple_type", "Input should be a valid tuple")
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("seeds must not be empty; give a count or a list, e.g. seeds: [0]")
        if len(set(v)) != len(v):
            dup = sorted({s for s in v if v.count(s) > 1})
            raise ValueError(f"seeds must be distinct, got {list(v)} ({dup} more than once); list each seed once")
        return v

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> ExperimentConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self

    @model_validator(mode="after")
    def _uri_needs_mlflow(self) -> ExperimentConfig:
        if self.mlflow_tracking_uri is not None and "mlflow" not in self.loggers:
            raise ValueError("mlflow_tracking_uri is set but 'mlflow' is not in loggers; add it, or drop the key")
        return self

    def total_steps(self, steps_per_epoch: int, default_steps: int) -> int:
        """Run length in optimizer steps, for a task with this epoch size."""
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return self.epochs * steps_per_epoch
        return default_steps


# --- errors with file lines -----------------------------------------------------


def _node_at(root: yaml.Node | None, loc: Sequence[Any], key: bool = False) -> yaml.Node | None:
    """The deepest YAML node on the path ``loc`` (a pydantic error location).

    With ``key``, the last step points at the mapping key rather than its value
    (an unknown key is reported where it is spelled).
    """
    node = root
    for i, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if hit is None:
                return node
            node = hit[0] if key and i == len(loc) - 1 else hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def _format_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        name = str(part) if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(part)) else repr(str(part))
        out += f"[{part}]" if isinstance(part, int) else (f".{name}" if out else name)
    return out or "(top level)"


def _clean_loc(loc: Sequence[Any]) -> tuple[Any, ...]:
    # pydantic adds validator/union names (e.g. 'function-after[...]', 'int') to locations
    return tuple(p for p in loc if isinstance(p, int) or not re.match(r"^[a-z_-]+\[|^(int|str|list)$", str(p)))


# what each key takes, and an example, for messages about wrong types ("[]" stands for any list index)
_EXPECTED: dict[str, tuple[str, str]] = {
    "task": ("a task name or 'package.module:function'", "task: digits-cnn"),
    "policies": ("a policy name or a list of policies", "policies: [bf16, error-budget]"),
    "policies[]": ("a policy name or a mapping with 'name' (and optional 'kwargs')",
                   "policies: [bf16, {name: cyclic, kwargs: {bmin: 4}}]"),
    "policies[].name": ("a policy name", "name: error-budget"),
    "policies[].kwargs": ("a mapping of option names to values", "kwargs: {budget_db: 30}"),
    "seeds": ("a count (an integer >= 1) or a list of distinct integers >= 0", "seeds: 3 or seeds: [0, 1, 2]"),
    "seeds[]": (f"an integer from 0 to {MAX_SEED}", "seeds: [0, 1, 2]"),
    "steps": ("a whole number of optimizer steps > 0", "steps: 500"),
    "epochs": ("a whole number of epochs > 0", "epochs: 2"),
    "eval_every": ("a whole number of steps > 0", "eval_every: 100"),
    "checkpoint_every": ("a whole number of steps > 0", "checkpoint_every: 100"),
    "energy_profile": ("a bundled profile name or the path of a TOML profile", "energy_profile: 7nm"),
    "monitor_every": ("a whole number of steps > 0", "monitor_every: 10"),
    "compile": ("true or false", "compile: true"),
    "out": ("a directory path", "out: runs/my-run"),
    "quiet": ("true or false", "quiet: true"),
    "loggers": ("a logger name or a list of logger names", "loggers: [tensorboard]"),
    "loggers[]": ("a logger name", "loggers: [tensorboard, mlflow]"),
    "mlflow_tracking_uri": ("a tracking URI", "mlflow_tracking_uri: file:./mlruns"),
}

_YAML_TYPES = {
    bool: "a boolean", int: "an integer", float: "a number", str: "text", bytes: "binary data", list: "a list",
    tuple: "a list", dict: "a mapping", type(None): "null (nothing)",
}


def _shown(v: Any) -> str:
    text = repr(v)
    kind = _YAML_TYPES.get(type(v), type(v).__name__)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({kind})"


def _key_path(loc: Sequence[Any]) -> str:
    return "".join("[]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))


def _message(err: Mapping[str, Any], loc: Sequence[Any] = ()) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    kind = str(err["type"])
    expected, example = _EXPECTED.get(_key_path(loc), ("", ""))
    eg = f"; e.g. {example}" if example else ""
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        allowed = (
            PolicySpec.model_fields if "policies" in err["loc"][:-1] else ExperimentConfig.model_fields
        )
        close = difflib.get_close_matches(key, list(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}"
    if kind == "invalid_key":
        return f"key {err['loc'][-1]} is not a name; keys are names like task, policies, steps"
    if kind == "missing":
        return "required key is missing; add it" + (f", e.g. {example}" if example else "")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ("greater than", "gt"), "greater_than_equal": ("at least", "ge"),
              "less_than": ("less than", "lt"), "less_than_equal": ("at most", "le")}[kind]
        return f"must be {op[0]} {err['ctx'][op[1]]}, got {err['input']!r}{eg}"
    if kind == "value_error":
        return msg
    if kind.endswith(("_type", "_parsing")) or kind in ("int_from_float", "finite_number"):
        what = expected or msg.removeprefix("Input should be ")
        return f"expected {what}, got {_shown(err['input'])}{eg}"
    return f"{msg}{eg}"


def _raise(e: ValidationError, source: str | None, root: yaml.Node | None) -> None:
    problems: list[str] = []
    for err in e.errors():
        loc = _clean_loc(err["loc"])
        where = f"{source}" if source else "config"
        node = _node_at(root, loc, key=err["type"] == "extra_forbidden") if root is not None else None
        if node is not None:
            where += f" line {node.start_mark.line + 1}"
        text = re.sub(r"\s*\n\s*", " ", f"{where}: {_format_loc(loc)}: {_message(err, loc)}")
        if text not in problems:
            problems.append(text)
    if len(problems) == 1:  # one line, always: the CLI prints it after "adaprec: error:"
        raise ConfigError(f"invalid experiment config: {problems[0]}") from None
    raise ConfigError(
        f"invalid experiment config, {len(problems)} problems: "
        + " ".join(f"[{i}] {p}" for i, p in enumerate(problems, 1))
    ) from None


def _check_entry_point(data: Mapping[str, Any], source: str | None, root: yaml.Node | None) -> None:
    """Import a user task's module now: its own exception becomes a TaskError naming the entry point."""
    task = data.get("task")
    if not isinstance(task, str) or ":" not in task:
        return
    from adaprec.experiments.tasks import resolve_entry_point

    try:
        resolve_entry_point(task)
    except AdaprecError:
        return  # the task validator reports it with its line
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises while it is imported
        where = source or "config"
        node = _node_at(root, ("task",)) if root is not None else None
        if node is not None:
            where += f" line {node.start_mark.line + 1}"
        raise TaskError(
            f"{where}: task: importing the task entry point {task!r} raised {type(e).__name__}: {_one_line(e)}; "
            "fix that module (rerun with --debug for its traceback)"
        ) from e


def parse_config(
    data: Any, source: str | None = None, root: yaml.Node | None = None, base_dir: str | Path | None = None
) -> ExperimentConfig:
    """Validate a config mapping.

    ``root`` (the composed YAML node) lets errors name lines; ``base_dir`` is
    where relative ``replay:`` timeline paths are looked up (default: cwd).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source or 'config'}: an experiment config is a mapping with at least 'task' and 'policies', "
            f"got {_shown(data)}; write 'key: value' lines, e.g. task: digits-cnn (see examples/quickstart.yaml)"
        )
    _check_entry_point(data, source, root)
    try:
        return ExperimentConfig.model_validate(dict(data), context={"base_dir": Path(base_dir or ".")})
    except ValidationError as e:
        _raise(e, source, root)
        raise  # unreachable


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML experiment config (see docs/experiments.md)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read config {p}: {getattr(e, 'strerror', None) or e}; check the path") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{p} is not a text file (byte {e.start} is not UTF-8: {e.reason}); an experiment config is YAML "
            "text, e.g. examples/quickstart.yaml"
        ) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as e:
        char = chr(e.character) if isinstance(e.character, int) else str(e.character)
        raise ConfigError(
            f"{p}: not valid YAML: character {char!r} at position {e.position} is not allowed in YAML; "
            "remove it (is this the right file?)"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = re.sub(r"\s*\n\s*", " ", str(getattr(e, "problem", None) or e)).strip()
        raise ConfigError(f"{p}{line}: not valid YAML: {problem}; fix the YAML syntax there") from None
    except RecursionError:
        raise ConfigError(f"{p}: not a usable config: YAML nested too deeply; an experiment config is a flat "
                          "mapping, e.g. examples/quickstart.yaml") from None
    return parse_config(data if data is not None else {}, source=str(p), root=root, base_dir=p.parent)
