"""The energy ledger: every step's work as it ran, its modeled cost, wall time, and what a meter saw.

Modeled, simulated and measured figures are kept apart and labelled; a step
without a meter reading has ``measured_j = None`` and the reason, never 0.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from adaprec.energy.counting import StepCost
from adaprec.energy.model import PricedStep, price_step
from adaprec.energy.profiles import Profile, load_profile
from adaprec.errors import CheckpointError
from adaprec.formats import names as _format_names
from adaprec.plan import PrecisionPlan

__all__ = ["EnergyLedger", "saving_fraction", "WORLD_LABELS"]

_CACHE_SIZE = 128
_STATE_KEYS = ("version", "profile", "grid_intensity_g_per_kwh", "rows", "modules", "macs_by_format", "assumptions")
_TOTALS = (
    "macs", "covered_macs", "narrow_macs", "emulated_macs", "bitops", "bytes_moved", "compute_j", "memory_j",
    "modeled_j", "fp32_modeled_j", "bf16_modeled_j", "op_bytes",
)
# Under torch.distributed each step's figures travel between ranks as one fixed-length vector: the totals,
# then the MACs per executed-format label of the built-in formats (fixed at import, the same on every rank),
# then the MACs of any other (user-registered) format.
WORLD_LABELS: tuple[str, ...] = tuple(
    lab for f in _format_names() for lab in ((f,) if f == "fp32" else (f, f"{f} (emulated)"))
)
_OTHER = "other formats"
_PER_RANK = ("macs", "bytes_moved", "modeled_j", "fp32_modeled_j", "bf16_modeled_j")


class EnergyLedger:
    """Records what every training step ran and what it cost.

    Each step is priced on what executed (every GEMM at the format it ran in
    natively, emulated ones as the fp32 they were), and against the two
    counterfactuals a reader compares with (everything fp32; everything
    static bf16), so a saving needs no second run. With ``target`` set, the
    plan is also priced as if ``target`` ran every planned format natively:
    the *simulated* figure, kept apart from what ran. Measured wall time and
    meter joules sit beside the modeled figures, labelled.

    Args:
        profile: the device profile pricing what executed: a bundled name
            (``"7nm"``, ``"45nm"``, ``"h100-sxm"``), a TOML path or a :class:`Profile`.
        grid_intensity_g_per_kwh: grams CO2e per kWh; when given, summaries add ``co2e_g``.
        target: a profile to simulate the plan on (research mode), or None.
    """

    def __init__(
        self,
        profile: str | Path | Profile = "7nm",
        grid_intensity_g_per_kwh: float | None = None,
        target: str | Path | Profile | None = None,
    ) -> None:
        self.profile = load_profile(profile)
        self.target = load_profile(target) if target is not None else None
        self.grid_intensity_g_per_kwh = grid_intensity_g_per_kwh
        self._cache: OrderedDict[tuple, PricedStep] = OrderedDict()
        self._fixed: dict[tuple, dict[str, Any]] = {}  # (signature, profile) -> the row's derived figures
        self.world_size = 1  # ranks the current steps are summed over (set by the controller)
        self.rank = 0
        self._reset()

    def _reset(self) -> None:
        self._rows: list[_Row] = []
        self._index: dict[int, int] = {}
        self._modules: dict[str, dict[str, float]] = {}
        self._macs_by_format: dict[str, int] = {}
        self._bytes_by_format: dict[str, float] = {}
        self._bytes_by_class: dict[str, float] = {}
        self._bytes_sources: dict[str, int] = {}
        self._unclassified_ops: dict[str, int] = {}
        self._uncovered: dict[str, str] = {}
        self._assumptions: set[str] = set()
        # per rank, totals over the steps recorded under torch.distributed (what each rank ran)
        self._per_rank: list[dict[str, float]] = []

    # --- pricing -----------------------------------------------------------
    def _price(self, cost: StepCost, sig: tuple, mode: str, profile: Profile) -> PricedStep:
        key = (sig, mode, profile.name)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        priced = price_step(cost, profile, mode)
        self._cache[key] = priced
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return priced

    # --- recording -----------------------------------------------------------
    def record(
        self,
        step: int,
        plan: PrecisionPlan,
        cost: StepCost,
        measured_j: float | None = None,
        measured_reason: str | None = None,
        meter: str | None = None,
        wall_s: float | None = None,
    ) -> Mapping[str, Any]:
        """Price ``cost`` (what ran under ``plan``) and the counterfactuals; append a row.

        ``measured_j`` is a meter's reading for this step, if any; otherwise
        say why in ``measured_reason``. ``wall_s``: the step's measured wall
        time. Returns the row.
        """
        sig = cost.signature()
        actual = self._price(cost, sig, "executed", self.profile)
        fp32 = self._price(cost, sig, "fp32", self.profile)
        bf16 = self._price(cost, sig, "bf16", self.profile)
        fixed = self._fixed.get((sig, self.profile.name))
        if fixed is None:  # what depends on the priced cost alone, derived once per distinct step
            fixed = self._fixed[(sig, self.profile.name)] = {"profile": self.profile.name,
                                                             **self._derive(cost, actual, fp32, bf16)}
            if len(self._fixed) > _CACHE_SIZE:
                self._fixed.pop(next(iter(self._fixed)))
        by_fmt = fixed["macs_by_format"]
        row = _Row(fixed, int(step), sys.intern(plan.summary()), cost.bytes_source or "modeled",
                   None if wall_s is None else float(wall_s), None if measured_j is None else float(measured_j),
                   measured_reason if measured_j is None else (measured_reason or f"measured ({meter or 'meter'})"))
        if self.target is not None:
            row["simulated_j"] = self._price(cost, sig, "planned", self.target).modeled_j
            row["simulated_fp32_j"] = self._price(cost, sig, "fp32", self.target).modeled_j
        if measured_j is None and not measured_reason:
            row["measured_reason"] = "no meter reading was given for this step"
        self._index[row["step"]] = len(self._rows)
        self._rows.append(row)
        for f, n in by_fmt.items():
            self._macs_by_format[f] = self._macs_by_format.get(f, 0) + n
        _add(self._bytes_by_format, row["bytes_by_format"])
        _add(self._bytes_by_class, row["bytes_by_class"])
        _add(self._bytes_sources, {row["bytes_source"]: 1})
        _add(self._unclassified_ops, cost.unclassified_ops)
        for name, mc in cost.modules.items():
            if not mc.covered:
                self._uncovered[name] = mc.reason
        for name, pm in actual.modules.items():
            acc = self._modules.setdefault(name, dict.fromkeys(("macs", "bitops", "bytes_moved", "modeled_j"), 0))
            acc["macs"] += pm.macs
            acc["bitops"] += pm.bitops
            acc["bytes_moved"] += pm.bytes_moved
            acc["modeled_j"] += pm.modeled_j
        self._assumptions |= actual.assumptions
        self._assumptions |= {f"(fp32/bf16 counterfactuals) {a}" for a in (fp32.assumptions | bf16.assumptions) - actual.assumptions}
        return row

    @staticmethod
    def _derive(cost: StepCost, actual: PricedStep, fp32: PricedStep, bf16: PricedStep) -> dict[str, Any]:
        """The row's figures that follow from the priced cost (the same for every step of one signature)."""
        gemms = [g for m in cost.modules.values() for g in m.gemms]
        return {
            "macs": int(actual.total("macs")),
            "covered_macs": int(cost.covered_macs),
            "narrow_macs": int(sum(g.macs for g in gemms if g.native and g.fmt != "fp32")),
            "emulated_macs": int(sum(g.macs for g in gemms if not g.native)),
            "bitops": int(actual.total("bitops")),
            "bytes_moved": float(actual.total("bytes_moved")),
            "op_bytes": float(actual.total("op_bytes")),
            "bytes_by_format": actual.bytes_by_format(),
            "bytes_by_class": actual.bytes_by_class(),
            "compute_j": actual.total("compute_j"),
            "memory_j": actual.total("memory_j"),
            "modeled_j": actual.modeled_j,
            "fp32_modeled_j": fp32.modeled_j,
            "bf16_modeled_j": bf16.modeled_j,
            "macs_by_format": actual.macs_by_format(),
        }

    # --- torch.distributed: one ledger for all ranks ----------------------------------
    @staticmethod
    def world_vector(row: Mapping[str, Any]) -> list[float]:
        """This rank's figures of one recorded step, as the fixed-length vector ranks exchange."""
        by_fmt = row["macs_by_format"]
        known = set(WORLD_LABELS)
        return (
            [float(row.get(k, 0.0)) for k in _TOTALS]
            + [float(by_fmt.get(lab, 0)) for lab in WORLD_LABELS]
            + [float(sum(n for f, n in by_fmt.items() if f not in known))]
        )

    def set_world(self, step: int, per_rank: Sequence[Sequence[float]]) -> None:
        """Attach every rank's figures of ``step`` (vectors from :meth:`world_vector`, in rank order).

        The run totals of :meth:`summary` then sum over ranks; the step's row
        keeps this rank's own figures beside them, under ``"world"``.
        """
        i = self._index.get(int(step))
        if i is None:
            return
        n_tot = len(_TOTALS)
        world: dict[str, Any] = {"world_size": len(per_rank)}
        for j, k in enumerate(_TOTALS):
            v = sum(float(r[j]) for r in per_rank)
            world[k] = int(round(v)) if k.endswith("macs") or k == "bitops" else v
        fmts: dict[str, int] = {}
        for j, lab in enumerate([*WORLD_LABELS, _OTHER]):
            n = int(round(sum(float(r[n_tot + j]) for r in per_rank)))
            if n:
                fmts[lab] = n
        world["macs_by_format"] = fmts
        world["wall_s"] = None
        self._rows[i]["world"] = world
        while len(self._per_rank) < len(per_rank):
            self._per_rank.append({**dict.fromkeys(_PER_RANK, 0.0), "steps": 0, "wall_s": 0.0, "timed_steps": 0})
        for r, vec in enumerate(per_rank):
            acc = self._per_rank[r]
            for k in _PER_RANK:
                acc[k] += float(vec[_TOTALS.index(k)])
            acc["steps"] += 1

    def set_world_wall(self, step: int, walls: Sequence[float]) -> None:
        """Every rank's measured wall time of ``step`` (nan where a rank did not time it)."""
        i = self._index.get(int(step))
        if i is None or "world" not in self._rows[i]:
            return
        timed = [float(w) for w in walls if w is not None and math.isfinite(float(w))]
        if not timed:
            return
        self._rows[i]["world"]["wall_s"] = sum(timed)
        for r, w in enumerate(walls):
            if r < len(self._per_rank) and w is not None and math.isfinite(float(w)):
                self._per_rank[r]["wall_s"] += float(w)
                self._per_rank[r]["timed_steps"] += 1

    def set_wall(self, step: int, wall_s: float | None) -> None:
        """The measured wall time of a step recorded before its end (distributed steps are priced early)."""
        i = self._index.get(int(step))
        if i is not None:
            self._rows[i]["wall_s"] = None if wall_s is None else float(wall_s)

    def attribute_measured(self, allocations: Iterable[tuple[int, float]], meter: str) -> None:
        """Fill in measured joules for recorded steps (from a :class:`MeasurementWindow`)."""
        for step, joules in allocations:
            i = self._index.get(int(step))
            if i is None:
                continue
            self._rows[i]["measured_j"] = float(joules)
            self._rows[i]["measured_reason"] = f"measured ({meter}), window share by step time"

    # --- reading -------------------------------------------------------------
    def steps(self) -> list[dict[str, Any]]:
        """One plain dict per recorded step, for a result store.

        A step run under torch.distributed shows the figures summed over ranks
        (MACs, bytes, joules, MACs per format; the wall time once every rank's is
        known, which is one step later); this rank's own are under ``"rank_local"``.
        """
        out = []
        for r in self._rows:
            row = _copy_row(r)
            world = row.pop("world", None)
            if world is not None:
                row["rank_local"] = {k: r.get(k, 0.0) for k in (*_TOTALS, "wall_s")} | {"macs_by_format": dict(r["macs_by_format"])}
                row.update({k: world[k] for k in _TOTALS}, macs_by_format=dict(world["macs_by_format"]))
                row["world_size"] = world["world_size"]
                if world.get("wall_s") is not None:
                    row["wall_s"] = world["wall_s"]
            out.append(row)
        return out

    def summary(self) -> dict[str, Any]:
        """Totals over every step so far, with labels saying what is modeled, measured and simulated."""
        rows = self._rows
        distributed = any("world" in r for r in rows)
        # run totals: summed over ranks where the step ran under torch.distributed
        tot = {k: sum((r["world"] if "world" in r else r).get(k, 0.0) for r in rows) for k in _TOTALS}
        measured = [r for r in rows if r["measured_j"] is not None]
        timed, wall_pending = [], 0
        for r in rows:
            w = r.get("world", {}).get("wall_s")
            if w is not None:
                timed.append(w)
            elif r.get("wall_s") is not None:
                timed.append(r["wall_s"])
                wall_pending += "world" in r
        by_format = dict(self._macs_by_format)
        if distributed:
            by_format = {}
            for r in rows:
                for f, n in (r["world"] if "world" in r else r)["macs_by_format"].items():
                    by_format[f] = by_format.get(f, 0) + n
        p = self.profile
        label = f"modeled (profile {p.name}) on what executed"
        macs = int(tot["macs"])
        native = sorted({f for f in by_format if "(emulated)" not in f and f != "fp32" and f != _OTHER})
        emulated = sorted({f.removesuffix(" (emulated)") for f in by_format if "(emulated)" in f})
        out: dict[str, Any] = {
            "profile": p.name,
            "profile_sources": list(p.sources),
            "uncertainty": p.uncertainty,
            "steps": len(rows),
            "macs": macs,
            "covered_macs": int(tot["covered_macs"]),
            "coverage": tot["covered_macs"] / macs if macs else 0.0,
            "uncovered": dict(self._uncovered),
            "narrow_mac_fraction": tot["narrow_macs"] / macs if macs else 0.0,
            "emulated_mac_fraction": tot["emulated_macs"] / macs if macs else 0.0,
            "native_formats": native,
            "emulated_formats": emulated,
            "macs_by_format": by_format,
            "bitops": int(tot["bitops"]),
            "bytes_moved": tot["bytes_moved"],
            "bytes": tot["bytes_moved"],
            "bytes_by_format": dict(self._bytes_by_format),
            "bytes_by_class": dict(self._bytes_by_class),
            "byte_coverage": tot["op_bytes"] / tot["bytes_moved"] if tot["bytes_moved"] else 0.0,
            "bytes_steps": {k: self._bytes_sources.get(k, 0) for k in ("counted", "replayed", "modeled")},
            "unclassified_ops": dict(self._unclassified_ops),
            "compute_j": tot["compute_j"],
            "memory_j": tot["memory_j"],
            "modeled_j": tot["modeled_j"],
            "fp32_modeled_j": tot["fp32_modeled_j"],
            "bf16_modeled_j": tot["bf16_modeled_j"],
            "saving_vs_fp32": saving_fraction(tot["modeled_j"], tot["fp32_modeled_j"]),
            "saving_vs_bf16": saving_fraction(tot["modeled_j"], tot["bf16_modeled_j"]),
            "wall_s": sum(timed) if timed else None,
            "timed_steps": len(timed),
            "modules": {n: dict(v) for n, v in self._modules.items()},
            "measured_j": sum(r["measured_j"] for r in measured) if measured else None,
            "measured_steps": len(measured),
            "modeled_j_on_measured_steps": sum(r["modeled_j"] for r in measured) if measured else None,
            "measured_reason": _measured_reason(rows, measured),
            "kind": {
                "modeled_j": label,
                "fp32_modeled_j": f"modeled counterfactual: every GEMM fp32 (profile {p.name})",
                "bf16_modeled_j": f"modeled counterfactual: every GEMM static bf16 (profile {p.name})",
                "measured_j": "measured" if measured else "not measured",
                "wall_s": "measured wall time (perf_counter) of the steps",
                "bytes": _bytes_kind(self._bytes_sources),
            },
            "assumptions": sorted(self._assumptions),
            "world_size": self.world_size,
        }
        if distributed:
            out["rank"] = self.rank
            out["per_rank"] = [{"rank": r, **acc} for r, acc in enumerate(self._per_rank)]
            out["kind"].update({
                "macs": "summed over ranks",
                "modeled_j": f"{label}, summed over ranks",
                "wall_s": "measured wall time (perf_counter) of the steps, summed over ranks (rank-seconds)"
                + (f"; {wall_pending} last step(s) count this rank's time only (the others' arrive with the "
                   "next step)" if wall_pending else ""),
                "modules": f"rank {self.rank}'s share (ranks run the same modules on their own batches)",
                "bytes_by_format": f"rank {self.rank}'s bytes", "bytes_by_class": f"rank {self.rank}'s bytes",
                "measured_j": ("measured on rank " + str(self.rank) + " only") if measured else "not measured",
            })
        if self.target is not None:
            sim = sum(r.get("simulated_j", 0.0) for r in rows)
            sim32 = sum(r.get("simulated_fp32_j", 0.0) for r in rows)
            out["simulated"] = {
                "target": self.target.name,
                "label": f"simulated for {self.target.name}: the plan's formats priced as if they ran natively there",
                "modeled_j": sim,
                "fp32_modeled_j": sim32,
                "saving_vs_fp32": saving_fraction(sim, sim32),
            }
        if self.grid_intensity_g_per_kwh is not None:
            full = bool(rows) and len(measured) == len(rows)
            joules = out["measured_j"] if full else tot["modeled_j"]
            out["co2e_g"] = joules / 3.6e6 * self.grid_intensity_g_per_kwh
            out["co2e_basis"] = "measured" if full else label
        return out

    # --- state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only: loadable with ``torch.load(weights_only=True)``."""
        return {
            "version": 3,
            "profile": self.profile.name,
            "target": None if self.target is None else self.target.name,
            "grid_intensity_g_per_kwh": self.grid_intensity_g_per_kwh,
            "rows": _rows_state(self._rows),
            "modules": {n: dict(v) for n, v in self._modules.items()},
            "macs_by_format": dict(self._macs_by_format),
            "bytes_by_format": dict(self._bytes_by_format),
            "bytes_by_class": dict(self._bytes_by_class),
            "bytes_sources": dict(self._bytes_sources),
            "unclassified_ops": dict(self._unclassified_ops),
            "uncovered": dict(self._uncovered),
            "assumptions": sorted(self._assumptions),
            "per_rank": [dict(acc) for acc in self._per_rank],
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        missing = [k for k in _STATE_KEYS if k not in d]
        if missing:
            raise CheckpointError(f"energy ledger state is missing keys {missing}; was it written by EnergyLedger.state_dict()?")
        if d["profile"] != self.profile.name:
            raise CheckpointError(
                f"energy ledger state was priced with profile {d['profile']!r}, this ledger uses "
                f"{self.profile.name!r}; build EnergyLedger(profile=...) with the same profile"
            )
        target = None if self.target is None else self.target.name
        if d.get("target") != target:
            raise CheckpointError(
                f"energy ledger state simulated target {d.get('target')!r}, this ledger {target!r}; use the same target="
            )
        try:
            rows = _rows_from_state(d["rows"])
        except (KeyError, TypeError, ValueError, IndexError) as e:  # before anything is reset: all or nothing
            raise CheckpointError(f"energy ledger state has malformed rows ({e!r}); pass the dict written by "
                                  "EnergyLedger.state_dict()") from None
        self._reset()
        self.grid_intensity_g_per_kwh = d["grid_intensity_g_per_kwh"]
        self._rows = rows
        self._index = {r["step"]: i for i, r in enumerate(self._rows)}
        self._modules = {n: dict(v) for n, v in d["modules"].items()}
        self._macs_by_format = dict(d["macs_by_format"])
        self._bytes_by_format = dict(d.get("bytes_by_format", {}))
        self._bytes_by_class = dict(d.get("bytes_by_class", {}))
        self._bytes_sources = dict(d.get("bytes_sources", {}))
        self._unclassified_ops = dict(d.get("unclassified_ops", {}))
        self._uncovered = dict(d.get("uncovered", {}))
        self._assumptions = set(d["assumptions"])
        self._per_rank = [dict(acc) for acc in d.get("per_rank", [])]


def _add(acc: dict, more: Mapping) -> None:
    for k, v in more.items():
        acc[k] = acc.get(k, 0) + v


def _bytes_kind(sources: Mapping[str, int]) -> str:
    """What the ledger's byte figures are, from how many steps were counted, replayed or modeled."""
    counted, replayed, modeled = (sources.get(k, 0) for k in ("counted", "replayed", "modeled"))
    if not counted + replayed:
        return "modeled: GEMM operands only (no op-level count was given); byte_coverage 0"
    out = f"op-level count (dispatch mode) on {counted} step(s), replayed on {replayed}"
    if modeled:
        out += f"; {modeled} step(s) priced by the GEMM-operand model only (a lower bound)"
    return out


class _Row(Mapping[str, Any]):
    """One step's row, read as a dict: the figures every step of one priced signature shares (one dict, never
    written after it is made), and this step's own. A dict per step copied those shared figures each time: 1.5
    KB a step measured on a two-layer model (1.7 KB on a small transformer), 150 MB over 100k steps; a row like
    this one keeps about 200 bytes (tests/test_energy_model.py measures it)."""

    __slots__ = ("shared", "step", "plan", "bytes_source", "wall_s", "measured_j", "measured_reason", "extra")
    _OWN = ("step", "plan", "bytes_source", "wall_s", "measured_j", "measured_reason")

    def __init__(self, shared: Mapping[str, Any], step: int, plan: str, bytes_source: str, wall_s: float | None,
                 measured_j: float | None, measured_reason: str | None) -> None:
        self.shared = shared
        self.step, self.plan, self.bytes_source = step, plan, bytes_source
        self.wall_s, self.measured_j, self.measured_reason = wall_s, measured_j, measured_reason
        self.extra: dict[str, Any] | None = None  # world, simulated figures: what few steps have

    def __getitem__(self, key: str) -> Any:
        if key in _Row._OWN:
            return getattr(self, key)
        if self.extra is not None and key in self.extra:
            return self.extra[key]
        return self.shared[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in _Row._OWN:
            setattr(self, key, value)
        else:
            if self.extra is None:
                self.extra = {}
            self.extra[key] = value

    def __iter__(self) -> Iterator[str]:
        yield "step"
        yield "plan"
        yield from self.shared
        yield from _Row._OWN[2:]
        if self.extra is not None:
            yield from self.extra

    def __len__(self) -> int:
        return len(self.shared) + len(_Row._OWN) + (len(self.extra) if self.extra is not None else 0)


def _rows_state(rows: Sequence[_Row]) -> dict[str, Any]:
    """The rows as columns, each set of shared figures once: a checkpoint grows by a few numbers a step.

    Version 2 wrote a dict per step (about 450 bytes pickled); a list per field costs tens of bytes a step,
    strings repeated from step to step being one object that pickle writes once."""
    by_id: dict[int, int] = {}
    by_value: dict[str, int] = {}  # a resumed run's new rows share equal figures, not the loaded dict itself
    tables: list[dict[str, Any]] = []
    columns: dict[str, list[Any]] = {k: [] for k in ("shared", *_Row._OWN)}
    extra: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(rows):
        j = by_id.get(id(r.shared))
        if j is None:
            j = by_id[id(r.shared)] = by_value.setdefault(repr(r.shared), len(tables))
            if j == len(tables):
                tables.append(_copy_row(r.shared))
        columns["shared"].append(j)
        for k in _Row._OWN:
            columns[k].append(getattr(r, k))
        if r.extra:
            extra[str(i)] = {k: (_copy_row(v) if k == "world" else v) for k, v in r.extra.items()}
    return {"shared": tables, "columns": columns, "extra": extra}


def _rows_from_state(rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> list[_Row]:
    """Rows of a saved ledger (columns, or version 2's dict per step), the figures steps share shared again."""
    if isinstance(rows, Mapping):
        tables = [_copy_row(t) for t in rows["shared"]]
        cols = rows["columns"]
        out = [_Row(tables[j], int(step), sys.intern(str(plan)), source, wall, joules, reason)
               for j, step, plan, source, wall, joules, reason
               in zip(cols["shared"], *(cols[k] for k in _Row._OWN), strict=True)]
        for i, more in rows.get("extra", {}).items():
            for k, v in more.items():
                out[int(i)][k] = _copy_row(v) if k == "world" else v
        return out
    shared: dict[str, Mapping[str, Any]] = {}
    out = []
    for r in rows:
        fixed = {k: v for k, v in r.items() if k not in _Row._OWN and k not in _EXTRA_KEYS}
        fixed = shared.setdefault(repr(fixed), _copy_row(fixed))
        row = _Row(fixed, int(r["step"]), sys.intern(str(r["plan"])), r.get("bytes_source", "modeled"), r.get("wall_s"),
                   r.get("measured_j"), r.get("measured_reason"))
        for k in _EXTRA_KEYS:
            if k in r:
                row[k] = _copy_row(r[k]) if k == "world" else r[k]
        out.append(row)
    return out


_EXTRA_KEYS = ("world", "simulated_j", "simulated_fp32_j")


def _copy_row(r: Mapping[str, Any]) -> dict[str, Any]:
    row = dict(r, macs_by_format=dict(r["macs_by_format"]))
    for k in ("bytes_by_format", "bytes_by_class"):
        if k in r:
            row[k] = dict(r[k])
    if "world" in r:
        row["world"] = dict(r["world"], macs_by_format=dict(r["world"]["macs_by_format"]))
    return row


def saving_fraction(x: float, base: float) -> float:
    """1 - x / base: the share of ``base`` (e.g. the fp32 counterfactual) that ``x`` saved; 0 without a base."""
    return 1.0 - x / base if base > 0 else 0.0


def _measured_reason(rows: list[dict[str, Any]], measured: list[dict[str, Any]]) -> str:
    if not rows:
        return "no steps recorded"
    if not measured:
        return rows[-1]["measured_reason"]
    if len(measured) < len(rows):
        return f"measured on {len(measured)} of {len(rows)} steps; compare with modeled_j_on_measured_steps"
    return "measured on every step"
