"""What a training step ran: per module, every GEMM (with the format it executed in) and the traffic.

Plain data, filled by the engine as the ops run (``adaprec.engine``
recognises every matmul-like op of the model, whoever calls it) and priced
by :mod:`adaprec.energy.model`. A GEMM records the format it *executed* in
and whether it ran on hardware units of that format (``native``) or was
emulated in fp32; a module the plan does not cover (the user filtered it
out, a fused recurrent kernel, ...) runs fp32 and is marked ``covered=False``
with the reason, so every MAC of the model is in the ledger.

Bytes come from one of two sources. The engine models the traffic of GEMM
operands per role (``ModuleCost.traffic``). An op-level count
(:mod:`adaprec.energy.traffic`) sees every byte every op read and wrote, in
the dtype it had (``ModuleCost.ops``); a step that carries one
(``StepCost.bytes_source`` is ``"counted"`` or ``"replayed"``) is priced from
it alone, GEMM operands included, and the role model is kept for reference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from adaprec.errors import AdaprecError

__all__ = [
    "GemmCost", "ModuleCost", "StepCost", "GEMMS", "OPERAND_ROLES", "BYTE_ROLES", "CountingError", "Traffic",
    "OpTraffic", "OP_CLASSES", "BYTE_SOURCES", "is_float_label",
]

GEMMS = ("forward", "input_grad", "weight_grad")
OPERAND_ROLES = ("weight", "activation", "grad_output")
# Roles whose element counts become bytes moved.
BYTE_ROLES = ("weight", "activation", "grad_output", "grad_weight", "optimizer_state")
# The classes an op-level count sorts ops into (``view``: ops that move no data; ``other``: counted, not classified).
OP_CLASSES = (
    "gemm", "attention", "elementwise", "normalization", "softmax", "loss", "reduction", "copy", "cast", "gather",
    "scatter", "fill", "optimizer", "other", "view",
)
# Where a step's bytes come from: the engine's GEMM-operand model only (""), or an op-level count of the step
# itself ("counted") or of an earlier step with the same plan and inputs ("replayed").
BYTE_SOURCES = ("", "counted", "replayed")


def is_float_label(dtype: str) -> bool:
    """Whether a dtype label of an op-level count names a floating-point type (``fp32``, ``bf16``, ``fp8_e4m3``,
    ``float8_e4m3fnuz``), as opposed to integers, booleans and complex numbers."""
    return dtype.startswith(("fp", "bf", "tf", "float"))


class CountingError(AdaprecError, ValueError):
    """Counting asked of something the model does not have, or counter state from another model."""


@dataclass(frozen=True)
class GemmCost:
    """One GEMM that ran: which of the three, MACs, operand roles, and the format it executed in.

    ``fmt`` is the format the plan put this GEMM in (the wider of its
    operands'); ``native`` says whether it ran on units of that format
    (``False``: emulated, i.e. computed in fp32 on rounded values).
    """

    gemm: str
    macs: int
    a_role: str
    b_role: str
    op: str = ""  # which product inside the module (e.g. "linear", "qk", "pv", "conv2d")
    fmt: str = "fp32"
    native: bool = True

    @property
    def executed(self) -> str:
        """The arithmetic that really ran: ``fmt`` when native, else fp32."""
        return self.fmt if self.native else "fp32"

    @property
    def label(self) -> str:
        """``fmt``, marked ``(emulated)`` when it did not run natively."""
        return self.fmt if self.native or self.fmt == "fp32" else f"{self.fmt} (emulated)"

    def key(self) -> tuple[str, int, str, str, str, str, bool]:
        return (self.gemm, self.macs, self.a_role, self.b_role, self.op, self.fmt, self.native)


# (role, executed storage format, planned format, planned scaling, planned block size)
Traffic = tuple[str, str, str, str, int]
# (phase, op class, dtype label, bits per element, "read" | "write")
OpTraffic = tuple[str, str, str, int, str]


@dataclass
class ModuleCost:
    """All GEMMs and element traffic of one module in one step.

    ``traffic``: the engine's model of its GEMM operands, elements per role;
    ``ops``: an op-level count, elements per (phase, op class, dtype, bits, direction).
    """

    kind: str
    gemms: list[GemmCost] = field(default_factory=list)
    traffic: dict[Traffic, int] = field(default_factory=dict)
    covered: bool = True
    reason: str = ""
    ops: dict[OpTraffic, int] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        return sum(g.macs for g in self.gemms)

    @property
    def elements(self) -> dict[str, int]:
        """Elements moved per role (all formats together)."""
        out = dict.fromkeys(BYTE_ROLES, 0)
        for t, n in self.traffic.items():
            out[t[0]] = out.get(t[0], 0) + n
        return out

    def add_traffic(self, role: str, n: int, executed: str = "fp32", planned: str = "fp32",
                    scaling: str = "none", block: int = 32) -> None:
        if n:
            key = (role, executed, planned, scaling, int(block))
            self.traffic[key] = self.traffic.get(key, 0) + int(n)

    def add_ops(self, phase: str, op_class: str, dtype: str, bits: int, direction: str, n: int) -> None:
        """Add ``n`` elements of ``bits`` each that ops of ``op_class`` read or wrote in ``phase``."""
        if op_class not in OP_CLASSES:
            raise CountingError(f"op class {op_class!r} is unknown; use one of {OP_CLASSES}")
        if direction not in ("read", "write"):
            raise CountingError(f"direction {direction!r}: use 'read' or 'write'")
        if n:
            key = (phase, op_class, dtype, int(bits), direction)
            self.ops[key] = self.ops.get(key, 0) + int(n)

    @property
    def op_bytes(self) -> int:
        """Bytes the op-level count saw for this module (0 without one)."""
        return sum(n * k[3] // 8 for k, n in self.ops.items())

    def key(self) -> tuple:
        return (self.kind, self.covered, tuple(sorted(_merge(self.gemms))), tuple(sorted(self.traffic.items())),
                tuple(sorted(self.ops.items())))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "covered": self.covered,
            "reason": self.reason,
            "gemms": [list(g.key()) for g in self.gemms],
            "traffic": [[*k, n] for k, n in self.traffic.items()],
            "ops": [[*k, n] for k, n in self.ops.items()],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModuleCost:
        return cls(
            kind=d["kind"],
            gemms=[GemmCost(g[0], int(g[1]), g[2], g[3], g[4], g[5], bool(g[6])) for g in d["gemms"]],
            traffic={(t[0], t[1], t[2], t[3], int(t[4])): int(t[5]) for t in d["traffic"]},
            covered=bool(d.get("covered", True)),
            reason=str(d.get("reason", "")),
            ops={(o[0], o[1], o[2], int(o[3]), o[4]): int(o[5]) for o in d.get("ops", [])},
        )


def _merge(gemms: Iterable[GemmCost]) -> list[tuple]:
    """Sum MACs of GEMMs that differ only in MACs, so repeated calls collapse."""
    acc: dict[tuple, int] = {}
    for g in gemms:
        k = (g.gemm, g.a_role, g.b_role, g.op, g.fmt, g.native)
        acc[k] = acc.get(k, 0) + g.macs
    return [(*k, m) for k, m in acc.items()]


_META = "__bytes__"  # the key of a StepCost's own fields in its to_dict() (no module is named so)


@dataclass
class StepCost:
    """Plain data: per module name, the GEMMs and traffic of one step.

    ``bytes_source``: where the step's bytes come from (:data:`BYTE_SOURCES`);
    ``unclassified_ops``: aten ops the op-level count could not classify (their bytes are counted under ``other``).
    """

    modules: dict[str, ModuleCost] = field(default_factory=dict)
    bytes_source: str = ""
    unclassified_ops: dict[str, int] = field(default_factory=dict)

    def copy(self) -> StepCost:
        """An independent copy (its GEMMs are frozen and its keys tuples: containers copied, not contents;
        a fraction of ``copy.deepcopy``'s time on a replayed step)."""
        return StepCost({n: ModuleCost(m.kind, list(m.gemms), dict(m.traffic), m.covered, m.reason, dict(m.ops))
                         for n, m in self.modules.items()}, self.bytes_source, dict(self.unclassified_ops))

    @property
    def op_counted(self) -> bool:
        """Whether the step's bytes come from an op-level count (counted or replayed)."""
        return bool(self.bytes_source)

    def add_op_traffic(self, module: str, phase: str, op_class: str, dtype: str, bits: int, direction: str,
                       n: int, kind: str = "") -> None:
        """Add op-level traffic to ``module`` (created, with ``kind``, if the step has no GEMM of it)."""
        mc = self.modules.get(module)
        if mc is None:
            mc = self.modules[module] = ModuleCost(kind)
        mc.add_ops(phase, op_class, dtype, bits, direction, n)

    @property
    def op_bytes(self) -> int:
        """Bytes the op-level count saw (0 without one)."""
        return sum(m.op_bytes for m in self.modules.values())

    @property
    def macs(self) -> int:
        return sum(m.macs for m in self.modules.values())

    @property
    def covered_macs(self) -> int:
        return sum(m.macs for m in self.modules.values() if m.covered)

    def macs_by_gemm(self) -> dict[str, int]:
        out = dict.fromkeys(GEMMS, 0)
        for m in self.modules.values():
            for g in m.gemms:
                out[g.gemm] += g.macs
        return out

    def macs_by_format(self) -> dict[str, int]:
        """MACs per executed kernel label (``int8``, ``bf16``, ``fp8_e4m3 (emulated)``, ``fp32``)."""
        out: dict[str, int] = {}
        for m in self.modules.values():
            for g in m.gemms:
                out[g.label] = out.get(g.label, 0) + g.macs
        return out

    def elements(self) -> dict[str, int]:
        out = dict.fromkeys(BYTE_ROLES, 0)
        for m in self.modules.values():
            for r, n in m.elements.items():
                out[r] = out.get(r, 0) + n
        return out

    def signature(self) -> tuple:
        """A hashable summary: equal signatures price identically."""
        return (*sorted((name, m.key()) for name, m in self.modules.items()), (_META, self.op_counted))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: m.to_dict() for name, m in self.modules.items()}
        if self.bytes_source or self.unclassified_ops:
            out[_META] = {"source": self.bytes_source, "unclassified_ops": dict(self.unclassified_ops)}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepCost:
        meta = d.get(_META, {})
        if meta.get("source", "") not in BYTE_SOURCES:
            raise CountingError(f"step cost bytes source {meta.get('source')!r} is unknown; one of {BYTE_SOURCES}")
        return cls({name: ModuleCost.from_dict(m) for name, m in d.items() if name != _META},
                   str(meta.get("source", "")), dict(meta.get("unclassified_ops", {})))
