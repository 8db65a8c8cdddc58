"""Policies by name: ``build("error-budget")``, ``build({"name": "cyclic", "bmin": 4})``, ..."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from adaprec.errors import PolicyError
from adaprec.plan import PRESETS, ModulePrecision, PrecisionPlan
from adaprec.policies.base import Policy
from adaprec.policies.cyclic import CyclicPolicy
from adaprec.policies.error_budget import ErrorBudgetPolicy
from adaprec.policies.gradient_diversity import GradientDiversityPolicy
from adaprec.policies.guard import Guard
from adaprec.policies.progressive import ProgressivePolicy
from adaprec.policies.replay import ReplayPolicy
from adaprec.policies.schedule import SchedulePolicy
from adaprec.policies.static import StaticPolicy

__all__ = ["build", "names", "with_guard", "POLICIES"]

POLICIES: dict[str, type[Policy]] = {
    "static": StaticPolicy,
    "schedule": SchedulePolicy,
    "cyclic": CyclicPolicy,
    "progressive": ProgressivePolicy,
    "gradient-diversity": GradientDiversityPolicy,
    "error-budget": ErrorBudgetPolicy,
    "replay": ReplayPolicy,
}


def names() -> list[str]:
    """Every name :func:`build` accepts (``replay`` is spelled ``replay:PATH.json``)."""
    return [*PRESETS, *POLICIES]


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _construct(cls: type[Policy], kwargs: Mapping[str, Any], label: str) -> Policy:
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p != "self"]
    bad = [k for k in kwargs if k not in allowed]
    if bad:
        raise PolicyError(
            f"policy {label!r} has no option {bad[0]!r}" + (f" (nor {bad[1:]})" if bad[1:] else "")
            + f"; its options are: {', '.join(allowed) or '(none)'}"
        )
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise PolicyError(f"policy {label!r}: {e}") from None


def build(spec: str | Mapping[str, Any] | PrecisionPlan | ModulePrecision | Policy) -> Policy:
    """A policy from a name, a ``{"name": ..., **options}`` dict, a plan, or a policy (returned as is).

    Names: the presets (``fp32``, ``bf16``, ``fp16``, ``fp8``, ``fp8-hybrid``;
    a static policy), ``schedule``, ``cyclic``, ``progressive``,
    ``gradient-diversity``, ``error-budget``, and ``replay:PATH.json``.
    """
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, (PrecisionPlan, ModulePrecision)):
        return StaticPolicy(spec)
    if isinstance(spec, str):
        raw = spec.strip()
        if raw.lower().startswith("replay:"):
            path = raw[len("replay:"):]
            if not path:
                raise PolicyError("replay needs a timeline file: 'replay:PATH.json'")
            return ReplayPolicy(path)
        name = _normalise(raw)
        if name in PRESETS:
            return StaticPolicy(name)
        if name == "replay":
            raise PolicyError("replay needs a timeline file: spell it 'replay:PATH.json'")
        if name in POLICIES:
            return POLICIES[name]()
        raise PolicyError(f"unknown policy {spec!r}; known policies: {', '.join(names())} (and 'replay:PATH.json')")
    if isinstance(spec, Mapping):
        if "name" not in spec or not isinstance(spec["name"], str):
            raise PolicyError(f"a policy dict needs a 'name' string, e.g. {{'name': 'cyclic', 'bmin': 4}}; got {dict(spec)!r}")
        name = _normalise(spec["name"])
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        if name in PRESETS:
            if kwargs:
                raise PolicyError(f"preset policy {name!r} takes no options, got {sorted(kwargs)}")
            return StaticPolicy(name)
        if name not in POLICIES:
            raise PolicyError(f"unknown policy {spec['name']!r}; known policies: {', '.join(names())}")
        return _construct(POLICIES[name], kwargs, name)
    raise PolicyError(
        f"cannot build a policy from {type(spec).__name__}; give a name, a dict with 'name', a PrecisionPlan or a Policy"
    )


def with_guard(policy: Policy | str | Mapping[str, Any], **kwargs: Any) -> Guard:
    """``policy`` wrapped in a :class:`Guard` (options as in Guard; bad ones raise PolicyError)."""
    inner = build(policy)
    if isinstance(inner, Guard):
        return inner
    params = [p for p in inspect.signature(Guard.__init__).parameters if p not in ("self", "policy")]
    bad = [k for k in kwargs if k not in params]
    if bad:
        raise PolicyError(f"guard has no option {bad[0]!r}; its options are: {', '.join(params)}")
    return Guard(inner, **kwargs)
