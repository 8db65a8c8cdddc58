"""How one op runs under a module's precision: natively, emulated, or in fp32.

The engine asks :func:`decide` once per (module, op kind, module precision)
and caches the answer. Native means the arithmetic really runs in the
format: int8 GEMMs through ``torch._int_mm``, bf16/fp16 in those dtypes,
fp8 through ``torch._scaled_mm``, where the device probe
(:mod:`adaprec.hardware`) found units for it, and, under ``backend="auto"``,
found them faster than fp32. Everything else a plan asks for is emulated:
rounded in fp32 and computed in fp32, the research mode, recorded as such.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from adaprec.engine.gemm import LinearExec, RoleCast, gemm_format
from adaprec.engine.ops import LINEAR_LIKE, OP_CLASS
from adaprec.formats import FLOAT16_DTYPES, Rounding, Scaling, wider
from adaprec.hardware.report import OPS
from adaprec.plan import ModulePrecision, TensorRecipe

__all__ = ["Backend", "Exec", "ExecMode", "Capabilities", "decide", "FP32_EXEC", "allowed_formats"]



@dataclass(frozen=True)
class Capabilities:
    """What this device runs natively, and which of those formats run faster than fp32, per op class."""

    native: Mapping[str, frozenset[str]] = field(default_factory=dict)  # op class -> formats
    fast: Mapping[str, frozenset[str]] = field(default_factory=dict)
    device_type: str = "cpu"
    reasons: Mapping[str, str] = field(default_factory=dict)  # format -> why it is not native / how fast

    @classmethod
    def from_report(cls, report) -> Capabilities:  # noqa: ANN001 - adaprec.hardware.DeviceReport
        """Capabilities from a device probe (:func:`adaprec.hardware.probe`)."""
        native, fast = {}, {}
        for op in OPS:
            table = report.table_for(op)
            native[op] = frozenset(f for f, fs in table.items() if fs.native)
            fast[op] = frozenset(report.fast_formats(op)) if table else frozenset({"fp32"})
        reasons = {f: fs.reason for f, fs in report.formats.items()}
        return cls(native, fast, report.device.split(":")[0], reasons)

    def allows(self, fmt: str, op_class: str, backend: str) -> bool:
        """Whether a plan's ``fmt`` runs natively for ``op_class`` under ``backend``.

        ``auto``: where the probe found it native (it ran correctly on units of
        that format; policies choose only among the *fast* ones, but a plan that
        asks for a native format that is merely not faster still runs natively).
        ``native``: wherever torch has a kernel, even a slow software path.
        ``emulate``: never.
        """
        if fmt == "fp32":
            return True
        if backend == "emulate":
            return False
        if backend == "native":
            return fmt in ("bf16", "fp16", "int8") or (self.device_type == "cuda" and fmt.startswith("fp8"))
        return fmt in self.native.get(op_class, frozenset())


class Backend(StrEnum):
    """Where a plan's narrow formats run (see :class:`~adaprec.AdaptivePrecision`)."""

    AUTO = "auto"  # natively where the probe found the format native and faster than fp32, else emulated
    NATIVE = "native"  # natively wherever a kernel exists, even a slow one
    EMULATE = "emulate"  # rounded in fp32 everywhere (research mode)


class ExecMode(StrEnum):
    """How one op runs: the closed set the engine dispatches on."""

    FP32 = "fp32"  # as the model wrote it (fp32, or its own dtype outside the plan)
    CAST16 = "cast16"  # operands cast to bf16/fp16, the op in that dtype
    PLANNED = "planned"  # adaprec's linear kernels: int8 `_int_mm`, bf16, per-role casts
    FP8 = "fp8"  # `_scaled_mm` on fp8 units
    EMULATE = "emulate"  # rounded in fp32, computed in fp32 (research mode)


@dataclass(frozen=True)
class Exec:
    """The decision for one op: mode, and per GEMM the (format, native) it executes in."""

    mode: ExecMode
    formats: Mapping[str, tuple[str, bool]]
    storage: Mapping[str, str]  # role -> format the tensor is really stored in
    dtype: torch.dtype | None = None  # cast16
    linear: LinearExec | None = None  # planned
    out_dtype: torch.dtype | None = None  # cast16: the dtype the op's output flows on in (None: its input's)
    emulated: tuple[str, ...] = ()  # formats this op only emulates (for the one-time note)


_FP32_FORMATS = {"forward": ("fp32", True), "input_grad": ("fp32", True), "weight_grad": ("fp32", True)}
_FP32_STORAGE = dict.fromkeys(("weight", "activation", "grad_output", "grad_weight", "optimizer_state"), "fp32")
FP32_EXEC = Exec(ExecMode.FP32, _FP32_FORMATS, _FP32_STORAGE)


def _uniform16(mp: ModulePrecision) -> str | None:
    """bf16/fp16 when activation, weight and output gradient all are that dtype, unscaled, to nearest."""
    rs = (mp.activation, mp.weight, mp.grad_output)
    f = rs[0].format
    if f not in FLOAT16_DTYPES:
        return None
    if all(r.format == f and r.rounding == Rounding.NEAREST and r.scaling == Scaling.NONE for r in rs):
        if mp.grad_weight.format in ("fp32", f):
            return f
    return None


def _out_dtype(mp: ModulePrecision, caps: Capabilities, backend: str, op_class: str) -> torch.dtype | None:
    """The 16-bit dtype the module's output flows on in (its ``output`` role), where this device runs it
    natively; None: the output keeps its input's dtype (fp32 in, fp32 out)."""
    f = mp.output
    if f in FLOAT16_DTYPES and caps.allows(f, op_class, backend):
        return FLOAT16_DTYPES[f]
    return None


def _role_cast(recipe: TensorRecipe, caps: Capabilities, backend: str) -> RoleCast:
    f = recipe.format
    if f == "fp32":
        return RoleCast("fp32", recipe)
    if f in FLOAT16_DTYPES and recipe.scaling == Scaling.NONE and recipe.rounding == Rounding.NEAREST and caps.allows(f, "gemm", backend):
        return RoleCast(f, recipe)
    if f == "int8" and recipe.scaling in ("tensor", "row"):
        return RoleCast("int8", recipe, per_gemm=recipe.scaling == "row")
    return RoleCast("emulate", recipe)


def _planned_formats(mp: ModulePrecision, weight_op: bool) -> dict[str, str]:
    b = mp.weight.format if weight_op else mp.activation.format
    return {
        "forward": wider(mp.activation.format, b),
        "input_grad": wider(mp.grad_output.format, b),
        "weight_grad": wider(mp.grad_output.format, mp.activation.format),
    }


def decide(
    kind: str, mp: ModulePrecision | None, caps: Capabilities, backend: str, weight_op: bool = True
) -> Exec:
    """How an op of ``kind`` runs under ``mp`` on this device (``backend``: auto | native | emulate)."""
    if mp is None or kind == "rnn" or mp.is_fp32:
        return FP32_EXEC
    planned = _planned_formats(mp, weight_op)
    op_class = OP_CLASS.get(kind, "gemm")
    f16 = _uniform16(mp)
    if f16 is not None and kind != "embedding" and caps.allows(f16, op_class, backend):
        storage = dict(_FP32_STORAGE, weight=f16, activation=f16, grad_output=f16)
        return Exec(ExecMode.CAST16, {g: (f16, True) for g in planned}, storage, dtype=FLOAT16_DTYPES[f16],
                    out_dtype=_out_dtype(mp, caps, backend, op_class))
    if kind == "linear":
        if (
            caps.device_type == "cuda"
            and mp.weight.format == mp.activation.format == "fp8_e4m3"
            and mp.grad_output.format in ("fp8_e4m3", "fp8_e5m2")
            and mp.weight.scaling == mp.activation.scaling
            and mp.weight.scaling in ("tensor", "row")
            and mp.grad_output.scaling == "tensor"
            and all(caps.allows(f, "gemm", backend) for f in ("fp8_e4m3", mp.grad_output.format))
        ):
            storage = dict(_FP32_STORAGE, weight="fp8_e4m3", activation="fp8_e4m3", grad_output=mp.grad_output.format)
            return Exec(ExecMode.FP8, {g: (f, True) for g, f in planned.items()}, storage)
        int8_native = caps.allows("int8", "gemm", backend)
        ex = LinearExec(
            activation=_role_cast(mp.activation, caps, backend),
            weight=_role_cast(mp.weight, caps, backend),
            grad_output=_role_cast(mp.grad_output, caps, backend),
            grad_weight=mp.grad_weight,
            int8_native=int8_native,
            out_dtype=_out_dtype(mp, caps, backend, op_class),
        )
        formats = ex.formats()
        storage = dict(_FP32_STORAGE)
        for role in ("activation", "weight", "grad_output"):
            rc: RoleCast = getattr(ex, role)
            if rc.kind == "int8" and int8_native:
                storage[role] = "int8"
            elif rc.kind in FLOAT16_DTYPES:
                storage[role] = rc.kind
        emulated = tuple(sorted({f for f, nat in formats.values() if not nat}))
        return Exec(ExecMode.PLANNED, formats, storage, linear=ex, emulated=emulated)
    formats = {g: (f, f == "fp32") for g, f in planned.items()}
    emulated = tuple(sorted({f for f, nat in formats.values() if not nat}))
    return Exec(ExecMode.EMULATE, formats, _FP32_STORAGE, emulated=emulated)


def gemm_name(role_with_grad: str) -> str:
    """The backward GEMM that computes the gradient of an operand of ``role``."""
    return "weight_grad" if role_with_grad == "weight" else "input_grad"


__all__ += ["gemm_name", "gemm_format"]


_CANDIDATES = frozenset({"fp32", "int8", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"})


def allowed_formats(
    sites: Mapping[str, Any], caps: Capabilities, backend: str
) -> tuple[dict[str, frozenset[str]] | None, set[str]]:
    """The hardware filter: per covered module, the formats this device runs natively (and, under
    ``auto``, faster than fp32) for every op kind the module runs; and the modules whose kernels need
    activation, weight and output gradient in one format (every kind but linear).

    ``None`` under ``backend="emulate"`` (research mode: any format, emulated). Policies choose only
    among these (:meth:`adaprec.policies.Policy.restrict`); explain shows them.
    """
    if backend == "emulate":
        return None, set()
    table = caps.native if backend == "native" else caps.fast
    allowed: dict[str, frozenset[str]] = {}
    coupled: set[str] = set()
    for name, site in sites.items():
        if not site.covered:
            continue
        fmts = set(_CANDIDATES)
        for kind in site.kinds:
            fmts &= set(table.get(OP_CLASS.get(kind, "gemm"), ()))
            if kind not in LINEAR_LIKE:  # their kernels cast to one 16-bit dtype (no int8 path)
                fmts &= set(FLOAT16_DTYPES)
            if kind == "embedding":
                fmts = set()
        if site.kinds - LINEAR_LIKE:
            coupled.add(name)
        allowed[name] = frozenset(fmts | {"fp32"})
    return allowed, coupled
