"""What a training step ran: per module, every GEMM (with the format it executed in) and the traffic.

Plain data, filled by the engine as the ops run (``adaprec.engine``
recognises every matmul-like op of the model, whoever calls it) and priced
by :mod:`adaprec.energy.model`. A GEMM records the format it *executed* in
and whether it ran on hardware units of that format (``native``) or was
emulated in fp32; a module the plan does not cover (the user filtered it
out, a fused recurrent kernel, ...) runs fp32 and is marked ``covered=False``
with the reason, so every MAC of the model is in the ledger.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from adaprec.errors import AdaprecError

__all__ = ["GemmCost", "ModuleCost", "StepCost", "GEMMS", "OPERAND_ROLES", "BYTE_ROLES", "CountingError", "Traffic"]

GEMMS = ("forward", "input_grad", "weight_grad")
OPERAND_ROLES = ("weight", "activation", "grad_output")
# Roles whose element counts become bytes moved.
BYTE_ROLES = ("weight", "activation", "grad_output", "grad_weight", "optimizer_state")


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


@dataclass
class ModuleCost:
    """All GEMMs and element traffic of one module in one step."""

    kind: str
    gemms: list[GemmCost] = field(default_factory=list)
    traffic: dict[Traffic, int] = field(default_factory=dict)
    covered: bool = True
    reason: str = ""

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

    def key(self) -> tuple:
        return (self.kind, self.covered, tuple(sorted(_merge(self.gemms))), tuple(sorted(self.traffic.items())))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "covered": self.covered,
            "reason": self.reason,
            "gemms": [list(g.key()) for g in self.gemms],
            "traffic": [[*k, n] for k, n in self.traffic.items()],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModuleCost:
        return cls(
            kind=d["kind"],
            gemms=[GemmCost(g[0], int(g[1]), g[2], g[3], g[4], g[5], bool(g[6])) for g in d["gemms"]],
            traffic={(t[0], t[1], t[2], t[3], int(t[4])): int(t[5]) for t in d["traffic"]},
            covered=bool(d.get("covered", True)),
            reason=str(d.get("reason", "")),
        )


def _merge(gemms: Iterable[GemmCost]) -> list[tuple]:
    """Sum MACs of GEMMs that differ only in MACs, so repeated calls collapse."""
    acc: dict[tuple, int] = {}
    for g in gemms:
        k = (g.gemm, g.a_role, g.b_role, g.op, g.fmt, g.native)
        acc[k] = acc.get(k, 0) + g.macs
    return [(*k, m) for k, m in acc.items()]


@dataclass
class StepCost:
    """Plain data: per module name, the GEMMs and traffic of one step."""

    modules: dict[str, ModuleCost] = field(default_factory=dict)

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
        return tuple(sorted((name, m.key()) for name, m in self.modules.items()))

    def to_dict(self) -> dict[str, Any]:
        return {name: m.to_dict() for name, m in self.modules.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepCost:
        return cls({name: ModuleCost.from_dict(m) for name, m in d.items()})
