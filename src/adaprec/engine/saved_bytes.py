"""The tally of what autograd kept for backward: bytes by module, role, format and why.

Why a record of its own: issue 19 asks for "the bytes autograd keeps for
backward, by role and format", before and after packing, and the ledger, the
report and the memory bench all read the same figures.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

__all__ = ["SavedRow", "SavedBytes", "PACKED", "DERIVED", "OUTSIDE_GRAPH"]

PACKED = "packed"
DERIVED = "derived"  # recomputed in backward from another saved tensor (adaprec.engine.saved_derive): no bytes
# kept tensors that autograd holds but that exist whether or not the model trains: not counted in the totals
OUTSIDE_GRAPH = frozenset({"parameter"})


@dataclass(frozen=True)
class SavedRow:
    """Saved tensors of one (module, role, format, reason): how many, and their bytes before and after packing.

    ``format``: the storage format of packed rows, else the dtype kept.
    ``reason``: ``packed``, ``derived`` (recomputed from another saved
    tensor in backward: zero bytes after) or why the tensors were kept as they are (see
    :mod:`adaprec.engine.saved`). ``shared`` rows count a second save of
    memory already packed: zero bytes.
    """

    module: str | None
    role: str | None
    format: str
    reason: str
    tensors: int
    bytes_before: int
    bytes_after: int


@dataclass(frozen=True)
class SavedBytes:
    """All rows of one forward pass."""

    rows: tuple[SavedRow, ...] = ()

    @property
    def bytes_before(self) -> int:
        """What autograd would keep without packing (parameters excluded: they exist anyway)."""
        return sum(r.bytes_before for r in self.rows if r.reason not in OUTSIDE_GRAPH)

    @property
    def bytes_after(self) -> int:
        """What it keeps with packing (same exclusions)."""
        return sum(r.bytes_after for r in self.rows if r.reason not in OUTSIDE_GRAPH)

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def by(self, field: str) -> dict[str, tuple[int, int]]:
        """(bytes before, bytes after) grouped by ``module``, ``role``, ``format`` or ``reason``."""
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in self.rows:
            acc = out[str(getattr(r, field))]
            acc[0] += r.bytes_before
            acc[1] += r.bytes_after
        return {k: (v[0], v[1]) for k, v in out.items()}

    def to_dict(self) -> dict[str, object]:
        return {"bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "rows": [asdict(r) for r in self.rows]}

    def __str__(self) -> str:
        mib = 2**20
        lines = [f"saved for backward: {self.bytes_before / mib:,.1f} MiB -> {self.bytes_after / mib:,.1f} MiB "
                 f"({self.ratio:.2f}x; parameters not counted)",
                 f"{'module':<28} {'role':<30} {'format':<10} {'reason':<18} {'n':>4} {'before MiB':>11} "
                 f"{'after MiB':>10}"]
        for r in sorted(self.rows, key=lambda r: (-r.bytes_before, str(r.module), str(r.role))):
            lines.append(f"{str(r.module):<28} {str(r.role):<30} {r.format:<10} {r.reason:<18} {r.tensors:>4} "
                         f"{r.bytes_before / mib:>11.2f} {r.bytes_after / mib:>10.2f}")
        return "\n".join(lines)
