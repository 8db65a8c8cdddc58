"""Shape-aware GEMM measurements: does narrowing *this* GEMM pay, casts included, on this device?

The device probe (:func:`adaprec.hardware.probe`) times three fixed shapes and
says per format whether it beats fp32. Whether one GEMM of a model pays
depends on its shape and on the casts around it: on one CPU, int8 GEMMs of
64x128x384 lost to fp32 (quantizing the operands and dequantizing the result
cost more than the GEMM saved) while large ones ran 3-5x faster. So at
discovery each distinct GEMM shape of the model is measured once, the way
adaprec runs it, against fp32; the table is cached on disk like the device
report and memoised; and a module is narrowed only where it pays
(:func:`formats_that_pay`). A run saves the table in its state
(:meth:`ShapeTable.state_dict`) and replays the same decisions from it
without timing anything.

A linear ``Y = X W^T`` (X: M x K, W: N x K) runs three GEMMs, each named
``(m, k, n, gemm)``: output m x n, contraction k (see :func:`linear_gemms`):

===========  =====================  ==========  ======================
gemm         product                (m, k, n)   operands as stored
===========  =====================  ==========  ======================
forward      X @ W^T                (M, K, N)   X (M, K); W (N, K), read transposed
input_grad   G @ W                  (M, N, K)   G (M, N); W (N, K)
weight_grad  G^T @ X                (N, M, K)   G (M, N), read transposed; X (M, K)
===========  =====================  ==========  ======================

Each is timed as :func:`adaprec.engine.gemm.planned_gemm` runs it: both
operands cast along the contraction (int8: ``quantize_int8`` per row, or
per tensor, gradients rounded stochastically; bf16/fp16: a copy in that
dtype), the kernel (``torch._int_mm`` / ``torch.mm`` in the dtype), and the
epilogue (dequantize, or the cast back to fp32). fp32 runs the same call
with fp32 operands (plain ``torch.mm``). Casting both operands in every GEMM
is what int8 with row scales does; with per-tensor scales or bf16 modules
adaprec shares some casts between the three GEMMs (the weight's is cached for
the step, the activation's serves forward and weight gradient), so the
measurement counts those casts more than once: it errs toward fp32, never
toward a slower step.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from adaprec.hardware import cache as _cache
from adaprec.hardware import sweep as _sweep
from adaprec.hardware.probing import device_key, resolve_device
from adaprec.hardware.report import DeviceReport, HardwareError, format_speedup

__all__ = [
    "GEMMS",
    "MEASURABLE",
    "PAY_MARGIN",
    "FormatTiming",
    "GemmRun",
    "GemmShape",
    "ShapeTable",
    "ShapeTiming",
    "clear_memo",
    "formats_by_module",
    "formats_that_pay",
    "linear_gemms",
    "measure_gemms",
    "pays",
]

SCHEMA = 1
GEMMS = ("forward", "input_grad", "weight_grad")
MEASURABLE = ("int8", "bf16", "fp16")  # the formats planned_gemm runs natively; fp8 (fp8_linear) is not measured yet
_BITS = {"int8": 8, "bf16": 16, "fp16": 16}  # of the MEASURABLE formats
PAY_MARGIN = 1.05  # a GEMM is narrowed only where it is measured this much faster than fp32, casts included
INT8_SCALINGS = ("row", "tensor")

# Budget: the distinct shapes of a whole model in a few seconds on a 2-core CPU.
DEFAULT_BUDGET_S = 5.0  # seconds of timed runs; shapes left when it is spent are not measured (stay fp32)
DEFAULT_MAX_SHAPES = 24  # at most this many shapes timed, the largest (MACs x calls) first
SKIP_BELOW = 0.8  # a format the probe's own sweep measured below this speed of fp32 (no casts) is not timed
FAR_SLOWER = 4.0  # a format this many times slower than fp32 in warm-up is not timed further at smaller shapes
_WARMUP_FP32 = 3  # fp32 calls before timing (the first calls page in fresh operands and outputs)
_CONFIRM_S = 0.2  # a format's first call this slow and far slower than fp32 is not repeated to confirm it
_MIN_ROUNDS, _MAX_ROUNDS = 3, 5  # timed rounds; more only while a verdict is unclear
_CLEAR = 1.25  # all rounds >= this speedup, or all <= its inverse: the verdict is clear, stop timing
_MIN_SAMPLE_S = 2e-3  # one sample runs a small GEMM this long (back to back), so timer overhead does not count
_MAX_NUMBER = 64

_LAYOUT = {  # gemm -> (read A transposed, read B transposed, role of A, role of B)
    "forward": (False, True, "activation", "weight"),
    "input_grad": (False, False, "grad_output", "weight"),
    "weight_grad": (True, False, "grad_output", "activation"),
}


class GemmShape(NamedTuple):
    """One GEMM of a linear-like op: output ``m x n``, contraction ``k``, and which of the op's GEMMs it is.

    The ``gemm`` decides how the operands are stored (which one is read
    transposed) and so which dimension each cast reduces over: two GEMMs of
    the same (m, k, n) but different layouts can cost differently.
    """

    m: int
    k: int
    n: int
    gemm: str = "forward"

    @property
    def macs(self) -> int:
        return self.m * self.k * self.n

    def __str__(self) -> str:
        return f"{self.m}x{self.k}x{self.n} {self.gemm}"

    @classmethod
    def of(cls, shape: GemmShape | Sequence[Any]) -> GemmShape:
        """``shape`` as a GemmShape: a GemmShape, (m, k, n) (a forward GEMM) or (m, k, n, gemm)."""
        if isinstance(shape, GemmShape):
            s = shape
        else:
            try:
                s = cls(*shape)
            except TypeError:
                raise HardwareError(f"a GEMM shape is (m, k, n) or (m, k, n, gemm), got {shape!r}") from None
        dims = (s.m, s.k, s.n)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise HardwareError(f"GEMM shape {shape!r}: m, k and n must be positive integers")
        if s.gemm not in GEMMS:
            raise HardwareError(f"GEMM shape {shape!r}: gemm must be one of {', '.join(GEMMS)}, got {s.gemm!r}")
        return s


def linear_gemms(
    rows: int, in_features: int, out_features: int, *, input_grad: bool = True, weight_grad: bool = True
) -> tuple[GemmShape, ...]:
    """The GEMMs a linear ``Y = X W^T`` runs in a training step, X of ``rows`` x ``in_features``.

    (M, K, N) = (rows, in_features, out_features): forward (M, K, N); input
    gradient ``G @ W``, (M, N, K), when X needs a gradient; weight gradient
    ``G^T @ X``, (N, M, K), when W does. These are the shapes autograd's
    ``aten.mm`` / ``aten.addmm`` see for ``F.linear`` (tested).
    """
    m, k, n = (int(v) for v in (rows, in_features, out_features))
    out = [GemmShape.of((m, k, n, "forward"))]
    if input_grad:
        out.append(GemmShape(m, n, k, "input_grad"))
    if weight_grad:
        out.append(GemmShape(n, m, k, "weight_grad"))
    return tuple(out)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class FormatTiming:
    """One format at one shape: fp32 time / this format's time (casts included), or why not measured."""

    speedup: float | None  # median over interleaved rounds of fp32 seconds / this format's seconds
    seconds: float | None  # median seconds of one call
    note: str = ""  # how it was measured when not in full ("far slower in warm-up"), or why not at all

    def to_dict(self) -> dict[str, Any]:
        return {"speedup": self.speedup, "seconds": self.seconds, "note": self.note}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FormatTiming:
        sp, sec = d["speedup"], d["seconds"]
        return cls(None if sp is None else float(sp), None if sec is None else float(sec), str(d.get("note", "")))


@dataclass(frozen=True)
class ShapeTiming:
    """What timing one GEMM shape showed: fp32's time and each candidate format's."""

    shape: GemmShape
    calls: int  # how many times the model runs this GEMM per step (it weighs the shape's priority)
    fp32_seconds: float | None  # median seconds of one fp32 call; None: not measured (see note)
    number: int = 0  # calls per timed sample (small GEMMs run back to back)
    rounds: int = 0  # interleaved rounds timed after the warm-up
    fp32_spread: float | None = None  # slowest / fastest fp32 sample: > 1.5 means a busy machine
    formats: Mapping[str, FormatTiming] = field(default_factory=dict)
    note: str = ""  # why the shape was not measured

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", MappingProxyType(dict(self.formats)))

    def to_dict(self) -> dict[str, Any]:
        s = self.shape
        return {"shape": [s.m, s.k, s.n], "gemm": s.gemm, "calls": self.calls, "fp32_seconds": self.fp32_seconds,
                "number": self.number, "rounds": self.rounds, "fp32_spread": self.fp32_spread,
                "formats": {f: t.to_dict() for f, t in self.formats.items()}, "note": self.note}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShapeTiming:
        f32, spread = d["fp32_seconds"], d.get("fp32_spread")
        return cls(
            shape=GemmShape.of((*d["shape"], d["gemm"])),
            calls=int(d["calls"]),
            fp32_seconds=None if f32 is None else float(f32),
            number=int(d.get("number", 0)),
            rounds=int(d.get("rounds", 0)),
            fp32_spread=None if spread is None else float(spread),
            formats={str(f): FormatTiming.from_dict(t) for f, t in d["formats"].items()},
            note=str(d.get("note", "")),
        )


class ShapeTable:
    """Per GEMM shape, per format: the measured speedup over fp32 with casts, and how it was measured.

    Plain data, serialisable (:meth:`to_dict`), cached on disk and
    restorable (:meth:`state_dict` / :meth:`load_state_dict`): decisions
    replayed from a saved table are the decisions of the run that measured it.
    """

    def __init__(
        self,
        rows: Iterable[ShapeTiming] = (),
        formats: Sequence[str] = (),
        skipped: Mapping[str, str] | None = None,
        how: Mapping[str, Any] | None = None,
    ) -> None:
        self._set(rows, formats, skipped or {}, how or {})

    def _set(self, rows: Iterable[ShapeTiming], formats: Sequence[str], skipped: Mapping[str, str],
             how: Mapping[str, Any]) -> None:  # fmt: skip
        self._rows = {r.shape: r for r in rows}
        self._formats = tuple(formats)
        self._skipped = MappingProxyType(dict(skipped))
        self._how = MappingProxyType(dict(how))

    @property
    def rows(self) -> Mapping[GemmShape, ShapeTiming]:
        return MappingProxyType(self._rows)

    @property
    def formats(self) -> tuple[str, ...]:
        """The candidate formats asked for (timed or not)."""
        return self._formats

    @property
    def skipped(self) -> Mapping[str, str]:
        """Formats not timed at any shape, and why (e.g. the device probe found them far slower)."""
        return self._skipped

    @property
    def how(self) -> Mapping[str, Any]:
        """How and where it was measured: device, torch, threads, casts, budget, seconds spent, load."""
        return self._how

    def speedup(self, shape: GemmShape | Sequence[Any], fmt: str) -> float | None:
        """fp32 time / ``fmt`` time at ``shape``, casts included; None where it was not measured."""
        row = self._rows.get(GemmShape.of(shape))
        t = row.formats.get(fmt) if row is not None else None
        return t.speedup if t is not None else None

    def fp32_seconds(self, shape: GemmShape | Sequence[Any]) -> float | None:
        row = self._rows.get(GemmShape.of(shape))
        return row.fp32_seconds if row is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; :meth:`from_dict` reads it back equal."""
        return {"schema": SCHEMA, "formats": list(self._formats), "skipped": dict(self._skipped),
                "how": dict(self._how), "rows": [r.to_dict() for r in self._rows.values()]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShapeTable:
        """Inverse of :meth:`to_dict`; raises :class:`HardwareError` on anything malformed."""
        t = cls()
        t.load_state_dict(d)
        return t

    def state_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this table by a saved one (a run's measurements, replayed without timing)."""
        if not isinstance(state, Mapping) or state.get("schema") != SCHEMA:
            got = state.get("schema") if isinstance(state, Mapping) else type(state).__name__
            raise HardwareError(f"GEMM shape table schema {got!r}, this adaprec reads {SCHEMA}: "
                                "measure again with measure_gemms(..., refresh=True)")  # fmt: skip
        try:
            rows = [ShapeTiming.from_dict(r) for r in state["rows"]]
            formats = [str(f) for f in state["formats"]]
            skipped = {str(f): str(w) for f, w in state["skipped"].items()}
            how = dict(state["how"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise HardwareError(f"malformed GEMM shape table: {type(e).__name__}: {e}") from None
        self._set(rows, formats, skipped, how)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShapeTable) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable through load_state_dict

    def __repr__(self) -> str:
        return f"ShapeTable({len(self._rows)} shapes, formats={self._formats})"

    def table(self) -> str:
        """A markdown table: shape | gemm | calls | fp32 ms | speedup per format (casts included)."""
        h = self._how
        threads = h.get("threads", "?")
        head = (f"{h.get('device', '?')}: {h.get('name', '?')} (torch {h.get('torch_version', '?')}, "
                f"{threads} thread{'' if threads == 1 else 's'}); int8 scaled per {h.get('int8_scaling', '?')}, "
                f"gradients rounded {'stochastically' if h.get('stochastic_grads') else 'to nearest'}; "
                f"{h.get('timed_seconds', 0.0):.1f} s timed, {h.get('seconds', 0.0):.1f} s in all")  # fmt: skip
        load = h.get("load")
        if load:
            head += f"; load average {load[0]:.2f} on {os.cpu_count()} CPUs"
        lines = [head]
        lines += [f"not timed: {f}: {why}" for f, why in self._skipped.items()]
        lines += ["", f"| GEMM (m x k x n) | gemm | calls | fp32 ms | {' | '.join(self._formats)} | note |",
                  "|---|---|---:|---:|" + "---:|" * len(self._formats) + "---|"]  # fmt: skip
        for r in self._rows.values():
            s = r.shape
            ms = "-" if r.fp32_seconds is None else f"{1e3 * r.fp32_seconds:.3g}"
            cells, notes = [], [r.note] if r.note else []
            for f in self._formats:
                t = r.formats.get(f)
                sp = t.speedup if t is not None else None
                cells.append("-" if sp is None else f"{sp:.3g}x")
                if t is not None and t.note and not r.note:
                    notes.append(f"{f}: {t.note}")
            lines.append(f"| {s.m}x{s.k}x{s.n} | {s.gemm} | {r.calls} | {ms} | {' | '.join(cells)} | "
                         f"{'; '.join(notes).replace('|', '/')} |")  # fmt: skip
        return "\n".join(lines)


# ---------------------------------------------------------------- decisions


def _check_margin(margin: float) -> None:
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
        raise HardwareError(f"margin must be a positive finite number (e.g. {PAY_MARGIN}), got {margin!r}")


def pays(table: ShapeTable, shape: GemmShape | Sequence[Any], fmt: str, margin: float = PAY_MARGIN) -> bool:
    """Whether running the GEMM ``shape`` in ``fmt`` was measured faster than fp32 by more than ``margin``.

    Casts included. A shape or format that was not measured does not pay (the
    GEMM stays fp32: never slower). fp32 always "pays": it is the reference
    every plan may fall back to.
    """
    _check_margin(margin)
    if fmt == "fp32":
        return True
    s = table.speedup(shape, fmt)
    return s is not None and s > margin


def formats_that_pay(
    table: ShapeTable,
    shapes_of_module: Iterable[GemmShape | Sequence[Any]],
    formats: Iterable[str],
    margin: float = PAY_MARGIN,
) -> frozenset[str]:
    """Of ``formats``, those in which a module with these GEMMs runs faster than in fp32; fp32 always.

    A plan narrows a module as a whole (its roles' formats set all its GEMMs),
    so the module's GEMMs are judged together: ``fmt`` pays when the
    module's fp32 GEMM time over its time in ``fmt`` exceeds ``margin``,
    ``sum(t32_i) / sum(t32_i / speedup_i)`` over its shapes (a shape listed
    twice, a GEMM run twice per step, counts twice). Weighting by measured
    fp32 time, not MACs, lets a large GEMM that gains carry a small one that
    loses, as it does in the step. If any of the module's shapes lacks a
    measurement in ``fmt``, ``fmt`` does not pay. A format that pays but is
    no faster than a wider one that also pays is left out (it would only add
    rounding error). With one shape and one format this is :func:`pays`.
    """
    _check_margin(margin)
    shapes = [GemmShape.of(s) for s in shapes_of_module]
    seconds: dict[str, float] = {"fp32": 0.0}  # the module's GEMM time in each format that pays
    for fmt in dict.fromkeys(formats):
        if fmt == "fp32" or not shapes:
            continue
        t32 = tf = 0.0
        for s in shapes:
            sp, sec = table.speedup(s, fmt), table.fp32_seconds(s)
            if sp is None or sec is None or sp <= 0:
                break
            t32 += sec
            tf += sec / sp
        else:
            if tf > 0 and t32 / tf > margin:
                seconds[fmt] = tf
    # a narrower format that runs no faster than a wider one that pays is dropped: it would add rounding
    # error for a slower step (int8 on a CPU whose AMX bf16 GEMMs outrun its int8 ones, casts included)
    return frozenset(f for f, t in seconds.items()
                     if not any(_BITS.get(g, 32) > _BITS.get(f, 32) and u <= t for g, u in seconds.items() if g != "fp32"))


def formats_by_module(
    table: ShapeTable,
    module_shapes: Mapping[str, Iterable[GemmShape | Sequence[Any]]],
    formats: Iterable[str] | Mapping[str, Iterable[str]],
    margin: float = PAY_MARGIN,
) -> dict[str, frozenset[str]]:
    """:func:`formats_that_pay` for every module: ``formats`` is one set for all, or one per module."""
    if isinstance(formats, Mapping):
        return {name: formats_that_pay(table, shapes, formats.get(name, ("fp32",)), margin)
                for name, shapes in module_shapes.items()}  # fmt: skip
    common = tuple(formats)
    return {name: formats_that_pay(table, shapes, common, margin) for name, shapes in module_shapes.items()}


# ---------------------------------------------------------------- measuring


@dataclass
class GemmRun:
    """One GEMM at one shape in one format, casts included: what a timer calls."""

    shape: GemmShape
    format: str
    fn: Callable[[], object]

    def __call__(self) -> object:
        return self.fn()


Timer = Callable[[GemmRun, int], float]
"""``timer(run, number)``: mean seconds of one call of ``run`` over ``number`` calls back to back."""


def _wall_timer(device: torch.device) -> Timer:
    once = _sweep.make_timer(device)

    def timer(run: GemmRun, number: int) -> float:
        def loop() -> None:
            for _ in range(number):
                run()

        return once(loop) / number

    return timer


def _role_casts(fmt: str, int8_scaling: str, stochastic_grads: bool) -> dict[str, Any]:
    """role -> the engine's RoleCast for a GEMM in ``fmt`` (the casts a plan of that format gives)."""
    from adaprec.engine.gemm import RoleCast  # the engine's casts: imported where they are timed
    from adaprec.plan import TensorRecipe

    out = {}
    for role in ("activation", "weight", "grad_output"):
        if fmt == "int8":
            rounding = "stochastic" if role == "grad_output" and stochastic_grads else "nearest"
            out[role] = RoleCast("int8", TensorRecipe("int8", rounding=rounding, scaling=int8_scaling),
                                 per_gemm=int8_scaling == "row")  # fmt: skip
        else:
            out[role] = RoleCast(fmt, TensorRecipe(fmt))
    return out


def _context() -> Any:
    """A GemmContext as the engine builds one (reused scratch, a noise table), reporting nothing."""
    from adaprec.engine.gemm import GemmContext
    from adaprec.engine.quant import NoiseTable, Scratch

    return GemmContext("adaprec.hardware.shapes", Scratch(), NoiseTable(0), {}, lambda role, t: t, None,
                       lambda role, amax: None, {})  # fmt: skip


def _build_run(shape: GemmShape, fmt: str, a: torch.Tensor, b: torch.Tensor, gc: Any, casts: dict[str, Any]) -> GemmRun:
    from adaprec.engine.gemm import planned_gemm

    at, bt, ra, rb = _LAYOUT[shape.gemm]
    ca, cb = casts[ra], casts[rb]
    return GemmRun(shape, fmt, lambda: planned_gemm(a, at, ca, ra, b, bt, cb, rb, gc))


def _operands(shape: GemmShape, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM's two operands as stored (an operand read transposed is stored transposed)."""
    at, bt, _, _ = _LAYOUT[shape.gemm]
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    a = torch.randn(*((shape.k, shape.m) if at else (shape.m, shape.k)), device=device, generator=g)
    b = torch.randn(*((shape.n, shape.k) if bt else (shape.k, shape.n)), device=device, generator=g)
    return a, b


def _failure(e: Exception) -> str:
    first = str(e).splitlines()[0][:160] if str(e) else ""
    return f"raised {type(e).__name__}: {first}"


@dataclass
class _Spent:
    seconds: float = 0.0


def _measure_shape(
    shape: GemmShape, calls: int, formats: Sequence[str], device: torch.device, seed: int,
    gc: Any, casts: Mapping[str, dict[str, Any]], timer: Timer, spent: _Spent, far_slower: float,
) -> ShapeTiming:  # fmt: skip
    """Warm up, then time fp32 and each format in interleaved, rotating rounds; the median per format."""
    a, b = _operands(shape, device, seed)
    runs = {f: _build_run(shape, f, a, b, gc, casts[f]) for f in ("fp32", *formats)}
    notes: dict[str, str] = {}

    def timed(f: str, number: int) -> float:
        t = timer(runs[f], number)
        spent.seconds += t * number
        return t

    # fp32 first, a few calls: the first ones page in fresh operands and outputs; warm-ups only err slow
    t32 = min(timed("fp32", 1) for _ in range(_WARMUP_FP32))
    warm: dict[str, float] = {}
    for f in [f for f in runs if f != "fp32"]:
        try:
            t = timed(f, 1)  # the first call also builds what later calls reuse (primitives, scratch, noise)
            if t <= far_slower * t32 or t < _CONFIRM_S:  # a second call, unless the first already took long
                t = min(t, timed(f, 1))
        except Exception as e:  # e.g. a kernel's shape rule, out of memory: this format does not run here
            notes[f] = f"not timed: {_failure(e)}"
            del runs[f]
            continue
        warm[f] = t
    number = max(1, min(_MAX_NUMBER, math.ceil(_MIN_SAMPLE_S / max(t32, 1e-9))))
    far = {f for f in runs if f != "fp32" and warm[f] > far_slower * t32}
    active = [f for f in runs if f not in far]
    samples: dict[str, list[float]] = {f: [] for f in active}
    ratios: dict[str, list[float]] = {f: [] for f in active if f != "fp32"}
    rounds = 0
    if ratios:
        for r in range(_MAX_ROUNDS):
            order = active[r % len(active):] + active[:r % len(active)]  # rotate: no format always goes first
            for f in order:
                samples[f].append(timed(f, number))
            for f in ratios:
                ratios[f].append(samples["fp32"][-1] / samples[f][-1])
            rounds = r + 1
            if rounds >= _MIN_ROUNDS and all(min(x) >= _CLEAR or max(x) <= 1 / _CLEAR for x in ratios.values()):
                break
    s32 = samples["fp32"]
    out: dict[str, FormatTiming] = {}
    for f in formats:
        if f in ratios:
            out[f] = FormatTiming(statistics.median(ratios[f]), statistics.median(samples[f]))
        elif f in far:
            out[f] = FormatTiming(t32 / warm[f], warm[f], f"over {far_slower:g}x slower than fp32 in warm-up: "
                                                          "not timed further")  # fmt: skip
        else:
            out[f] = FormatTiming(None, None, notes.get(f, "not timed"))
    return ShapeTiming(
        shape=shape,
        calls=calls,
        fp32_seconds=statistics.median(s32) if s32 else t32,
        number=number,
        rounds=rounds,
        fp32_spread=(max(s32) / min(s32)) if s32 else None,
        formats=out,
    )


def _skipped_by_probe(report: DeviceReport | None, formats: Sequence[str], skip_below: float) -> dict[str, str]:
    """Formats the device probe already rules out: not native here, or far slower than fp32 on its sweep."""
    if report is None:
        return {}
    out = {}
    for f in formats:
        fs = report.formats.get(f)
        if fs is None or not fs.native:
            out[f] = f"the device probe found it not native here ({fs.reason if fs else 'not probed'})"
        elif fs.speedup is not None and fs.speedup < skip_below:
            out[f] = (f"the device probe measured its bare GEMM at {format_speedup(fs.speedup)} fp32 "
                      f"(below {skip_below:g}x; casts only add to that)")  # fmt: skip
    return out


_MEMO: dict[str, dict[str, Any]] = {}  # cache file -> table data: each caller gets its own ShapeTable
_LOCK = threading.Lock()


def clear_memo() -> None:
    """Forget the shape tables measured in this process (the disk cache is kept)."""
    with _LOCK:
        _MEMO.clear()


def measure_gemms(
    shapes: Iterable[GemmShape | Sequence[Any]],
    formats: Iterable[str] = ("int8", "bf16"),
    device: str | torch.device | None = None,
    *,
    report: DeviceReport | None = None,
    int8_scaling: str = "row",
    stochastic_grads: bool = True,
    budget_s: float = DEFAULT_BUDGET_S,
    max_shapes: int = DEFAULT_MAX_SHAPES,
    skip_below: float = SKIP_BELOW,
    far_slower: float = FAR_SLOWER,
    refresh: bool = False,
    cache_dir: str | Path | None = None,
    timer: Timer | None = None,
) -> ShapeTable:
    """Time each distinct GEMM of ``shapes`` in fp32 and in each of ``formats``, casts included; cached.

    ``shapes``: the model's GEMMs (e.g. :func:`linear_gemms` of each linear
    call); repeats are merged and counted, and the largest (MACs x calls)
    are timed first. ``formats``: candidates from :data:`MEASURABLE`.
    ``report``: the device probe; formats it found not native, or whose bare
    GEMM ran below ``skip_below`` x fp32 on its sweep, are not timed. The
    time budget: no further shape is started once ``budget_s`` seconds of
    runs were spent, and at most ``max_shapes`` shapes are timed; shapes
    left over have no measurement and stay fp32. A format whose warm-up runs
    ``far_slower`` times slower than fp32 at a shape is recorded from that
    warm-up and not timed at smaller shapes (casts weigh more there):
    ``far_slower=math.inf`` times every shape.
    ``int8_scaling`` ("row" or "tensor") and ``stochastic_grads`` say how the
    int8 operands are cast (gradients round stochastically in adaprec's
    policies). The table is cached in ``cache_dir`` (else
    ``$ADAPREC_CACHE_DIR``, else ``~/.cache/adaprec``) keyed by machine,
    torch version, threads, shapes and how they are measured, and memoised
    in this process; ``refresh=True`` measures again. ``timer(run, number)``
    replaces the wall-clock timer (tests).
    """
    dev = resolve_device(device)
    counts = Counter(GemmShape.of(s) for s in shapes)
    fmts = []
    for f in dict.fromkeys(formats):
        if f == "fp32":
            continue
        if f not in MEASURABLE:
            raise HardwareError(f"cannot measure {f!r} GEMMs per shape: measure_gemms times "
                                f"{', '.join(MEASURABLE)} (leave {f!r} to the device probe's verdict)")  # fmt: skip
        fmts.append(f)
    if int8_scaling not in INT8_SCALINGS:
        raise HardwareError(f"int8_scaling must be one of {', '.join(INT8_SCALINGS)}, got {int8_scaling!r}")
    if not (budget_s > 0 and max_shapes >= 0 and far_slower > 1):
        raise HardwareError(f"budget_s must be > 0, max_shapes >= 0 and far_slower > 1, got {budget_s!r}, "
                            f"{max_shapes!r} and {far_slower!r}")
    skipped = _skipped_by_probe(report, fmts, skip_below)
    timed = [f for f in fmts if f not in skipped]
    order = sorted(counts, key=lambda s: (-s.macs * counts[s], s))
    key = {
        "what": "gemm-shapes", "schema": SCHEMA, **device_key(dev),
        "shapes": [[s.m, s.k, s.n, s.gemm, counts[s]] for s in order],
        "formats": fmts, "timed": timed, "int8_scaling": int8_scaling, "stochastic_grads": bool(stochastic_grads),
        "budget_s": float(budget_s), "max_shapes": int(max_shapes), "far_slower": str(float(far_slower)),
    }  # fmt: skip
    path = _cache.cache_path(cache_dir, key, prefix="gemm-shapes")
    memo_key = str(path.absolute())
    with _LOCK:
        if not refresh:
            data = _MEMO.get(memo_key) or _cache.load_json(path, key, SCHEMA, "table")
            try:
                hit = ShapeTable.from_dict(data) if data is not None else None
            except HardwareError:
                hit = None  # a damaged file: measure again
            if hit is not None:
                _MEMO[memo_key] = data
                return hit
        table = _measure(order, counts, fmts, timed, skipped, dev, int8_scaling, bool(stochastic_grads),
                         budget_s, max_shapes, far_slower, timer or _wall_timer(dev))  # fmt: skip
        try:
            _cache.store_json(path, key, SCHEMA, "table", table.to_dict())
        except OSError as e:
            warnings.warn(f"adaprec could not cache the GEMM shape table at {path} ({e}); it will be measured again",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
        _MEMO[memo_key] = table.to_dict()
        return table


def _measure(
    order: Sequence[GemmShape], counts: Mapping[GemmShape, int], fmts: Sequence[str], timed: Sequence[str],
    skipped: Mapping[str, str], dev: torch.device, int8_scaling: str, stochastic_grads: bool,
    budget_s: float, max_shapes: int, far_slower: float, timer: Timer,
) -> ShapeTable:  # fmt: skip
    gc = _context() if timed else None  # imports the engine's kernels (seconds in a cold process): before t0
    t0 = time.perf_counter()
    spent = _Spent()
    rows: list[ShapeTiming] = []
    far_at: dict[str, GemmShape] = {}  # format -> the first shape where it was far slower than fp32
    casts = {f: _role_casts(f, int8_scaling, stochastic_grads) for f in ("fp32", *timed)}
    with torch.no_grad():
        for i, shape in enumerate(order):
            calls = counts[shape]
            # a format far slower than fp32 at a GEMM at least this large is not timed here: casts weigh more
            # in smaller GEMMs, so it would not pay here either
            far = {f: at for f, at in far_at.items() if at.macs >= shape.macs}
            active = [f for f in timed if f not in far]
            why = ""
            if not timed:
                why = "no format to time"
            elif not active:
                why = "not timed: every format was far slower than fp32 at a larger shape"
            elif i >= max_shapes:
                why = f"not timed: beyond the {max_shapes} largest shapes"
            elif spent.seconds >= budget_s:
                why = f"not timed: the {budget_s:g} s budget was spent"
            if why:
                rows.append(ShapeTiming(shape, calls, None, formats={f: FormatTiming(None, None, why) for f in fmts},
                                        note=why))  # fmt: skip
                continue
            row = _measure_shape(shape, calls, active, dev, 1000 + i, gc, casts, timer, spent, far_slower)
            fm = dict(row.formats)
            for f in timed:
                if f in far:
                    fm[f] = FormatTiming(None, None, f"not timed: far slower than fp32 at {far[f]}")
                elif f in fm and "slower than fp32 in warm-up" in fm[f].note and f not in far_at:
                    far_at[f] = shape
            for f in skipped:
                fm[f] = FormatTiming(None, None, "not timed: " + skipped[f])
            rows.append(ShapeTiming(row.shape, calls, row.fp32_seconds, row.number, row.rounds, row.fp32_spread,
                                    {f: fm[f] for f in fmts}))  # fmt: skip
    load: list[float] | None
    try:
        load = list(os.getloadavg())
    except OSError:  # not on this OS
        load = None
    rep = device_key(dev)
    how = {
        "device": str(dev), "name": rep.get("machine", dev.type), "torch_version": str(torch.__version__),
        "threads": torch.get_num_threads(), "int8_scaling": int8_scaling, "stochastic_grads": stochastic_grads,
        "budget_s": budget_s, "max_shapes": max_shapes, "far_slower": str(float(far_slower)), "warmup_fp32": _WARMUP_FP32, "rounds": [_MIN_ROUNDS, _MAX_ROUNDS],
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "timed_seconds": spent.seconds, "seconds": time.perf_counter() - t0, "load": load,
    }  # fmt: skip
    return ShapeTable(rows, fmts, skipped, how)
