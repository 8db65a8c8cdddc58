"""Device profiles: energy figures as data files, with their sources written in.

A profile is a TOML file. Two kinds exist:

* ``energy_table``: pJ per multiply and per add for some formats, and pJ per
  memory access at named levels of the hierarchy (``[ops]``, ``[memory]``);
* ``roofline``: peak FLOP/s per format, memory bandwidth and board power
  (``[roofline]``); energy is roofline time x power. Optional for
  simulation (:mod:`adaprec.simulation`): ``[roofline.native]``, the formats
  the device runs natively per op class (``gemm``, ``attention``), and
  ``[roofline.achievable]``, the fractions of peak compute and bandwidth a
  real training step reaches (``compute``, ``memory``) with the measured
  figure they were calibrated from (``source``).

Bundled profiles live in ``adaprec/energy/profiles/``; users pass their own
file path. Validation names the file and the missing key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from adaprec.energy.rules import OpEnergy, fit_rule, rule_energy, significand_bits
from adaprec.errors import AdaprecError, ProfileError
from adaprec.formats import Format, get, width_key

__all__ = ["Profile", "load_profile", "list_profiles", "KINDS"]

KINDS = ("energy_table", "roofline")
_INT_KEY = re.compile(r"^int(\d+)$")


@dataclass(frozen=True)
class Profile:
    """One device profile, validated. Prices formats, including ones its table lacks."""

    name: str
    kind: str
    description: str
    uncertainty: float
    sources: tuple[str, ...]
    path: str
    ops: Mapping[str, OpEnergy] = field(default_factory=dict)
    traffic_level: str = ""
    pj_per_byte: float = 0.0
    peak_flops: Mapping[str, float] = field(default_factory=dict)
    bandwidth_bytes_s: float = 0.0
    board_power_w: float = 0.0
    native: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # op class -> formats run natively
    compute_efficiency: float = 1.0  # achievable fraction of peak FLOP/s in a training step
    memory_efficiency: float = 1.0  # achievable fraction of peak bandwidth
    calibration: str = ""  # where the achievable fractions come from

    # --- energy table -----------------------------------------------------
    def op_energy(self, fmt: Format | str) -> tuple[OpEnergy, bool]:
        """(mult/add energy of ``fmt``, whether it is assumed by the rule rather than tabled)."""
        fmt = get(fmt)
        if fmt.name in self.ops:
            return self.ops[fmt.name], False
        return rule_energy(fmt, fit_rule(list(self.ops.values()))), True

    def mac_pj(self, fmt: Format | str) -> float:
        """pJ of one multiply-accumulate with operands in ``fmt``."""
        return self.op_energy(fmt)[0].mac

    # --- roofline -----------------------------------------------------------
    def peak(self, fmt: Format | str) -> tuple[float, bool]:
        """(peak FLOP/s of ``fmt``, whether assumed).

        A format without its own peak runs on the units of the narrowest
        listed format at least as wide, preferring the same kind (fp4/fp6 on
        fp8 units, int4 on int8); wider than all of them: fp32.
        """
        fmt = get(fmt)
        if fmt.name in self.peak_flops:
            return self.peak_flops[fmt.name], False
        listed = [get(n) for n in self.peak_flops]
        wider = [f for f in listed if f.bits >= fmt.bits]
        same = [f for f in wider if f.kind == fmt.kind] or wider
        if not same:
            return self.peak_flops["fp32"], True
        best = min(same, key=width_key)
        return self.peak_flops[best.name], True

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "uncertainty": self.uncertainty,
            "sources": list(self.sources),
            "path": self.path,
            **({"native": {k: list(v) for k, v in self.native.items()},
                "compute_efficiency": self.compute_efficiency, "memory_efficiency": self.memory_efficiency,
                "calibration": self.calibration} if self.kind == "roofline" else {}),
        }


def list_profiles() -> list[str]:
    """Names of the bundled profiles."""
    root = resources.files("adaprec.energy") / "profiles"
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def load_profile(profile: str | Path | Profile = "7nm") -> Profile:
    """A bundled profile by name, or a user's TOML file by path."""
    if isinstance(profile, Profile):
        return profile
    text_path = str(profile)
    if text_path in list_profiles():
        res = resources.files("adaprec.energy") / "profiles" / f"{text_path}.toml"
        return _parse(res.read_bytes(), f"<bundled profile {text_path}>")
    p = Path(text_path)
    if not p.is_file():
        raise ProfileError(
            f"no energy profile {text_path!r}: not a bundled profile ({', '.join(list_profiles())}) "
            "and not a file; pass one of those names or the path of a TOML profile"
        )
    return _parse(p.read_bytes(), str(p))


def _parse(data: bytes, where: str) -> Profile:
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"energy profile {where} is not valid TOML: {e}") from None

    def need(path: str, typ: type | tuple[type, ...] = object) -> Any:
        node: Any = doc
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ProfileError(
                    f"energy profile {where} is missing key {path!r}; add it (see docs/energy.md for the schema)"
                )
            node = node[part]
        if not isinstance(node, typ) or isinstance(node, bool):
            raise ProfileError(f"energy profile {where}: key {path!r} has the wrong type ({node!r})")
        return node

    kind = need("kind", str)
    if kind not in KINDS:
        raise ProfileError(f"energy profile {where}: kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    sources = need("sources", list)
    if not sources:
        raise ProfileError(f"energy profile {where}: 'sources' is empty; every profile names where its figures come from")
    uncertainty = float(need("uncertainty", (int, float)))
    common = dict(
        name=need("name", str),
        kind=kind,
        description=str(doc.get("description", "")),
        uncertainty=uncertainty,
        sources=tuple(str(s) for s in sources),
        path=where,
    )
    if kind == "energy_table":
        need("ops.fp32.mult", (int, float))
        ops = {}
        for key in need("ops", Mapping):
            mult = float(need(f"ops.{key}.mult", (int, float)))
            add = float(need(f"ops.{key}.add", (int, float)))
            ops.update(_op_entry(key, mult, add, where))
        level = need("memory.traffic_level", str)
        access_bits = int(need("memory.access_bits", int))
        lo_hi = need(f"memory.levels.{level}", list)
        if len(lo_hi) != 2:
            raise ProfileError(f"energy profile {where}: memory.levels.{level} must be [low, high] pJ per access")
        return Profile(
            **common, ops=ops, traffic_level=level, pj_per_byte=(float(lo_hi[0]) + float(lo_hi[1])) / 2 / (access_bits / 8)
        )
    peaks = {}
    need("roofline.peak_tflops.fp32", (int, float))
    for key in need("roofline.peak_tflops", Mapping):
        tf = float(need(f"roofline.peak_tflops.{key}", (int, float)))
        peaks[_format_name(key, where)] = tf * 1e12
    native: dict[str, tuple[str, ...]] = {}
    for op_class, fmts in dict(doc.get("roofline", {}).get("native", {})).items():
        if not isinstance(fmts, list):
            raise ProfileError(f"energy profile {where}: roofline.native.{op_class} must be a list of formats")
        native[str(op_class)] = tuple(_format_name(str(f), where) for f in fmts)
    achievable = doc.get("roofline", {}).get("achievable", {})
    eff = {}
    for key in ("compute", "memory"):
        v = achievable.get(key, 1.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= 1:
            raise ProfileError(f"energy profile {where}: roofline.achievable.{key} must be a fraction in (0, 1]")
        eff[key] = float(v)
    return Profile(
        **common,
        native=native,
        compute_efficiency=eff["compute"],
        memory_efficiency=eff["memory"],
        calibration=str(achievable.get("source", "")),
        peak_flops=peaks,
        bandwidth_bytes_s=float(need("roofline.memory_bandwidth_gb_s", (int, float))) * 1e9,
        board_power_w=float(need("roofline.board_power_w", (int, float))),
    )


def _format_name(key: str, where: str) -> str:
    try:
        return get(key).name
    except AdaprecError:
        raise ProfileError(f"energy profile {where}: {key!r} is not a number format adaprec knows") from None


def _op_entry(key: str, mult: float, add: float, where: str) -> dict[str, OpEnergy]:
    """Table rows keyed by format name; wide ints (int32) have no Format but anchor the rule."""
    if m := _INT_KEY.match(key):
        bits = int(m.group(1))
        try:
            name = get(key).name
        except AdaprecError:
            name = key
        return {name: OpEnergy("int", bits, bits, mult, add)}
    fmt = get(_format_name(key, where))
    return {fmt.name: OpEnergy(fmt.kind, fmt.bits, significand_bits(fmt), mult, add)}
