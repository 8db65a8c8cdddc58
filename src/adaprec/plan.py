"""The precision plan: which format each tensor of each module uses.

A plan is plain, immutable data. The unit of decision is the tensor role of
one module, because a matmul layer runs three GEMMs and each reads two of
these roles:

* output GEMM          ``activation x weight``
* input-gradient GEMM  ``grad_output x weight``
* weight-gradient GEMM ``grad_output x activation``

``grad_weight`` is the format the weight gradient is stored in after its
GEMM. The engine applies plans, policies produce them, the energy ledger
prices them; none of them needs more than this file.
"""

from __future__ import annotations

import fnmatch
import functools
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from adaprec.errors import FormatSpecError, PlanError, UnknownFormatError
from adaprec.formats import ROUNDING_MODES, SCALINGS, Rounding, Scaling, get
from adaprec.formats.storage import storage_format

__all__ = [
    "pin_matches",
    "ROLES",
    "STORAGE_ROLES",
    "SCALINGS",
    "TensorRecipe",
    "ModulePrecision",
    "PlanChange",
    "PrecisionPlan",
    "PRESETS",
    "preset",
]

ROLES = ("weight", "activation", "grad_output", "grad_weight")


def pin_matches(pattern: str, names: Iterable[str]) -> list[str]:
    """The module names a pin's fqn glob matches (case-sensitive ``fnmatch``): the one pin rule."""
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


@dataclass(frozen=True)
class TensorRecipe:
    """How one tensor is cast: format, rounding and scaling.

    ``scaling``: ``"none"`` (cast as is), ``"tensor"`` (per-tensor scale from
    this tensor's amax), ``"row"`` (a scale per row: per index of every
    dimension but the last, as fp8 row-wise GEMMs use), ``"delayed"`` (per-tensor scale from an amax
    history), ``"block"`` (MX: a power-of-two scale per ``block_size``
    elements along the last dimension).
    """

    format: str = "fp32"
    rounding: str = "nearest"
    scaling: str = "none"
    block_size: int = 32

    def __post_init__(self) -> None:
        try:
            fmt = get(self.format)
        except UnknownFormatError as e:
            raise PlanError(str(e)) from None
        object.__setattr__(self, "format", fmt.name)
        if self.rounding not in ROUNDING_MODES:
            raise PlanError(
                f"unknown rounding {self.rounding!r}; use one of {', '.join(ROUNDING_MODES)}"
            )
        if self.scaling not in SCALINGS:
            raise PlanError(f"unknown scaling {self.scaling!r}; use one of {', '.join(SCALINGS)}")
        # plain strings in the dataclass (plans go to JSON and weights_only checkpoints), checked by the enums
        object.__setattr__(self, "rounding", Rounding(self.rounding).value)
        object.__setattr__(self, "scaling", Scaling(self.scaling).value)
        if self.block_size < 1:
            raise PlanError(f"block_size must be >= 1, got {self.block_size}")

    @property
    def bits(self) -> int:
        return get(self.format).bits

    @property
    def is_fp32(self) -> bool:
        return self.format == "fp32"

    def short(self) -> str:
        s = self.format
        if self.rounding == "stochastic":
            s += "/sr"
        if self.scaling != "none":
            s += f"/{self.scaling}"
        return s


FP32 = TensorRecipe()


# Roles that say how a module's data is *kept*, not computed: a storage spec each (adaprec.formats.storage).
# ``saved``: what autograd keeps for backward of the module's ops; ``optimizer_state``: its parameters' moments;
# ``output``: the dtype its GEMMs hand the ops that follow.
STORAGE_ROLES = ("saved", "optimizer_state", "output")
_STORAGE_KIND = {"saved": "activation", "optimizer_state": "optimizer_state", "output": "output"}


@dataclass(frozen=True)
class ModulePrecision:
    """The recipes of the four tensor roles of one module, plus how its data is kept (storage roles).

    ``optimizer_state`` and ``saved`` are storage specs (``"fp32"``, ``"bf16"``, ``"int8"``,
    ``"fp8_e4m3"``, ``"int8/block128"``...; see :mod:`adaprec.formats.storage`): the bytes the module's
    optimizer moments and the tensors autograd keeps for its backward really occupy. ``output`` is
    the dtype its GEMMs return (``"fp32"``, ``"bf16"``, ``"fp16"``): with a 16-bit output the ops
    between GEMMs read and write half the bytes, as under ``torch.autocast``.
    """

    weight: TensorRecipe = FP32
    activation: TensorRecipe = FP32
    grad_output: TensorRecipe = FP32
    grad_weight: TensorRecipe = FP32
    optimizer_state: str = "fp32"
    saved: str = "fp32"
    output: str = "fp32"  # the dtype the module's GEMMs hand the ops after them (bf16: they run narrow)

    def __post_init__(self) -> None:
        for role in ROLES:
            r = getattr(self, role)
            if isinstance(r, str):
                object.__setattr__(self, role, TensorRecipe(r))
            elif isinstance(r, Mapping):
                object.__setattr__(self, role, TensorRecipe(**r))
            elif not isinstance(r, TensorRecipe):
                raise PlanError(f"role {role!r} needs a TensorRecipe, a format name or a dict, got {r!r}")
        for role in STORAGE_ROLES:
            try:
                spec = storage_format(getattr(self, role), role=_STORAGE_KIND[role]).spec
            except (FormatSpecError, UnknownFormatError) as e:
                raise PlanError(f"{role}: {e}") from None
            object.__setattr__(self, role, spec)

    def recipe(self, role: str) -> TensorRecipe:
        if role not in ROLES:
            raise PlanError(f"unknown tensor role {role!r}; roles are {', '.join(ROLES)}")
        return getattr(self, role)

    def with_role(self, role: str, recipe: TensorRecipe | str) -> ModulePrecision:
        if role not in ROLES:
            raise PlanError(f"unknown tensor role {role!r}; roles are {', '.join(ROLES)}")
        return replace(self, **{role: recipe if isinstance(recipe, TensorRecipe) else TensorRecipe(recipe)})

    @property
    def is_fp32(self) -> bool:
        return all(getattr(self, r).is_fp32 for r in ROLES)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModulePrecision:
        unknown = set(d) - set(ROLES) - set(STORAGE_ROLES)
        if unknown:
            raise PlanError(f"unknown keys {sorted(unknown)} in module precision; allowed: {list(ROLES + STORAGE_ROLES)}")
        return cls(**{k: (TensorRecipe(**v) if isinstance(v, Mapping) else v) for k, v in d.items()})

    def short(self) -> str:
        return "w={} a={} go={} gw={}".format(*(getattr(self, r).short() for r in ROLES))

    def with_storage(self, role: str, spec: str) -> ModulePrecision:
        """This precision with storage role ``role`` (``saved``, ``optimizer_state``, ``output``) kept as ``spec``."""
        if role not in STORAGE_ROLES:
            raise PlanError(f"unknown storage role {role!r}; storage roles are {', '.join(STORAGE_ROLES)}")
        if getattr(self, role) == spec:  # frozen: the same value needs no copy (nor its checks, every step)
            return self
        return replace(self, **{role: spec})


@dataclass(frozen=True)
class PlanChange:
    """One difference between two plans."""

    module: str
    role: str
    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.module}.{self.role}: {self.old} -> {self.new}"


def _recipe_for(r: TensorRecipe | str) -> TensorRecipe:
    return r if isinstance(r, TensorRecipe) else TensorRecipe(r)


def _fwd_bwd(fwd: str, bwd: str, *, grad_weight: str | None = None, scaling: str = "none") -> ModulePrecision:
    return ModulePrecision(
        weight=TensorRecipe(fwd, scaling=scaling),
        activation=TensorRecipe(fwd, scaling=scaling),
        grad_output=TensorRecipe(bwd, rounding="nearest" if bwd in ("fp32", "bf16", "fp16") else "stochastic", scaling=scaling),
        grad_weight=TensorRecipe(grad_weight or bwd),
    )


# Static named plans. fp8 variants scale per tensor (as TransformerEngine and
# torchao do: unscaled fp8 loses most gradients to underflow) and keep the
# weight gradient in bf16, the output precision of an fp8 GEMM.
PRESETS: dict[str, ModulePrecision] = {
    "fp32": ModulePrecision(),
    "bf16": _fwd_bwd("bf16", "bf16"),
    "fp16": _fwd_bwd("fp16", "fp16"),
    "fp8": _fwd_bwd("fp8_e4m3", "fp8_e4m3", grad_weight="bf16", scaling="tensor"),
    "fp8-hybrid": _fwd_bwd("fp8_e4m3", "fp8_e5m2", grad_weight="bf16", scaling="tensor"),
}


def preset(name: str) -> ModulePrecision:
    """The module precision of a named static plan."""
    try:
        return PRESETS[name]
    except KeyError:
        raise PlanError(f"unknown plan preset {name!r}; presets are {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class PrecisionPlan:
    """Module name -> :class:`ModulePrecision`, for every module the engine quantizes.

    ``pinned`` names modules that stay as they are whatever a policy decides
    (numerically sensitive layers, user pins). A module not in the plan runs
    in fp32.
    """

    modules: Mapping[str, ModulePrecision] = field(default_factory=dict)
    pinned: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        mods = {}
        for name, mp in dict(self.modules).items():
            if isinstance(mp, str):
                mp = preset(mp)
            elif isinstance(mp, Mapping):
                mp = ModulePrecision.from_dict(mp)
            elif not isinstance(mp, ModulePrecision):
                raise PlanError(f"module {name!r}: expected ModulePrecision, preset name or dict, got {mp!r}")
            mods[name] = mp
        object.__setattr__(self, "modules", _FrozenDict(mods))
        object.__setattr__(self, "pinned", frozenset(self.pinned))
        stray = self.pinned - set(mods)
        if stray:
            raise PlanError(f"pinned modules {sorted(stray)} are not in the plan")
        # plans are immutable and hashed every step (pricing caches): hash once
        object.__setattr__(self, "_hash", hash((tuple(sorted(mods.items())), self.pinned)))

    # --- construction -------------------------------------------------
    @classmethod
    def uniform(
        cls,
        module_names: Iterable[str],
        precision: ModulePrecision | str = "fp32",
        pins: Mapping[str, ModulePrecision | str] | None = None,
    ) -> PrecisionPlan:
        """Every module gets ``precision``; ``pins`` maps fqn globs to fixed precisions.

        Pinned modules keep their precision under every policy.
        """
        mp = preset(precision) if isinstance(precision, str) else precision
        names = list(module_names)
        mods: dict[str, ModulePrecision] = {n: mp for n in names}
        pinned: set[str] = set()
        for pattern, pin in (pins or {}).items():
            hits = pin_matches(pattern, names)
            if not hits:
                raise PlanError(
                    f"pin {pattern!r} matches no quantizable module; modules are: {', '.join(names) or '(none)'}"
                )
            for n in hits:
                mods[n] = preset(pin) if isinstance(pin, str) else pin
                pinned.add(n)
        return cls(mods, frozenset(pinned))

    def get(self, module: str) -> ModulePrecision:
        return self.modules.get(module, PRESETS["fp32"])

    def with_module(self, module: str, precision: ModulePrecision) -> PrecisionPlan:
        mods = dict(self.modules)
        mods[module] = precision
        return PrecisionPlan(mods, self.pinned)

    def with_role(self, module: str, role: str, recipe: TensorRecipe | str) -> PrecisionPlan:
        return self.with_module(module, self.get(module).with_role(role, _recipe_for(recipe)))

    def map(self, fn) -> PrecisionPlan:  # noqa: ANN001 - (name, ModulePrecision) -> ModulePrecision
        """A new plan with ``fn(name, precision)`` applied to every unpinned module."""
        return PrecisionPlan(
            {n: (mp if n in self.pinned else fn(n, mp)) for n, mp in self.modules.items()},
            self.pinned,
        )

    # --- reading --------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __contains__(self, module: object) -> bool:
        return module in self.modules

    @functools.cached_property
    def is_fp32(self) -> bool:
        """Every role of every module in fp32 (asked on every step: computed once per plan)."""
        return all(mp.is_fp32 for mp in self.modules.values())

    def formats_used(self) -> set[str]:
        return {getattr(mp, r).format for mp in self.modules.values() for r in ROLES}

    def diff(self, other: PrecisionPlan) -> list[PlanChange]:
        """Every (module, role) whose recipe differs from ``self`` to ``other``."""
        changes = []
        for name in sorted(set(self.modules) | set(other.modules)):
            a, b = self.get(name), other.get(name)
            if a == b:
                continue
            for role in ROLES:
                ra, rb = a.recipe(role), b.recipe(role)
                if ra != rb:
                    changes.append(PlanChange(name, role, ra.short(), rb.short()))
            for role in STORAGE_ROLES:
                if getattr(a, role) != getattr(b, role):
                    changes.append(PlanChange(name, role, getattr(a, role), getattr(b, role)))
        return changes

    @functools.cached_property
    def _summary(self) -> str:
        counts: dict[str, int] = {}
        for mp in self.modules.values():
            counts[mp.weight.format] = counts.get(mp.weight.format, 0) + 1
        return " ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "empty"

    def summary(self) -> str:
        """A one-line count of modules per forward format, for progress bars (and every ledger row)."""
        return self._summary

    # --- serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "modules": {n: mp.to_dict() for n, mp in self.modules.items()},
            "pinned": sorted(self.pinned),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrecisionPlan:
        if not isinstance(d, Mapping) or "modules" not in d:
            raise PlanError("a plan dict needs a 'modules' mapping (as written by PrecisionPlan.to_dict)")
        return cls(
            {n: ModulePrecision.from_dict(mp) for n, mp in d["modules"].items()},
            frozenset(d.get("pinned", ())),
        )

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> PrecisionPlan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PlanError(f"plan JSON does not parse: {e}") from None

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, PrecisionPlan):
            return NotImplemented
        return self._hash == other._hash and dict(self.modules) == dict(other.modules) and self.pinned == other.pinned  # type: ignore[attr-defined]


class _FrozenDict(dict):
    """A dict that refuses mutation, so a plan cannot change under a reader."""

    def _refuse(self, *a: Any, **k: Any) -> None:
        raise PlanError("plans are immutable; use with_module()/with_role() to derive a new one")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))
