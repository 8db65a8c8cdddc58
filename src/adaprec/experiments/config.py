"""Experiment config: a frozen, validated description of one comparison.

Every mistake is caught here, before any training starts, and reported as
:class:`~adaprec.errors.ConfigError` naming the key, the allowed values and
the line of the YAML file it came from.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from adaprec.errors import AdaprecError, ConfigError
from adaprec.integrations.logging import LOGGER_NAMES

__all__ = ["POLICY_NAMES", "PolicySpec", "ExperimentConfig", "load_config", "parse_config"]

POLICY_NAMES = (
    "fp32", "bf16", "fp16", "fp8", "fp8-hybrid", "schedule", "cyclic", "progressive",
    "gradient-diversity", "error-budget",
)


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
    seeds: tuple[int, ...] = Field(default=(0,), validate_default=True)
    steps: int | None = Field(default=None, gt=0)
    epochs: int | None = Field(default=None, gt=0)
    eval_every: int | None = Field(default=None, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    energy_profile: str = "7nm"
    monitor_every: int = Field(default=10, gt=0)
    compile: bool = False  # fuse quantization kernels with torch.compile (same bits, faster stochastic rounding)
    out: str | None = None
    quiet: bool = False
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
            raise ValueError("seeds must be a count (int > 0) or a list of ints")
        if isinstance(v, int):
            if v < 1:
                raise ValueError(f"seeds as a count must be >= 1, got {v}")
            return list(range(v))
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("seeds must not be empty")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {list(v)}")
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
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _clean_loc(loc: Sequence[Any]) -> tuple[Any, ...]:
    # pydantic adds validator/union names (e.g. 'function-after[...]', 'int') to locations
    return tuple(p for p in loc if isinstance(p, int) or not re.match(r"^[a-z_-]+\[|^(int|str|list)$", str(p)))


def _message(err: Mapping[str, Any]) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        allowed = (
            PolicySpec.model_fields if "policies" in err["loc"][:-1] else ExperimentConfig.model_fields
        )
        close = difflib.get_close_matches(key, list(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}"
    if err["type"] == "missing":
        return "required key is missing"
    if err["type"] == "greater_than":
        return f"must be greater than {err['ctx']['gt']}, got {err['input']!r}"
    if err["type"] in ("int_parsing", "int_type", "int_from_float"):
        return f"must be an integer, got {err['input']!r}"
    return msg


def _raise(e: ValidationError, source: str | None, root: yaml.Node | None) -> None:
    lines = []
    for err in e.errors():
        loc = _clean_loc(err["loc"])
        where = f"{source}" if source else "config"
        node = _node_at(root, loc, key=err["type"] == "extra_forbidden") if root is not None else None
        if node is not None:
            where += f" line {node.start_mark.line + 1}"
        lines.append(f"{where}: {_format_loc(loc)}: {_message(err)}")
    raise ConfigError("invalid experiment config:\n  " + "\n  ".join(lines)) from None


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
            f"got {type(data).__name__}"
        )
    try:
        return ExperimentConfig.model_validate(dict(data), context={"base_dir": Path(base_dir or ".")})
    except ValidationError as e:
        _raise(e, source, root)
        raise  # unreachable


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML experiment config (see docs/experiments.md)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}; check the path") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse_config(data if data is not None else {}, source=str(p), root=root, base_dir=p.parent)
