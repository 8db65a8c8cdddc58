"""A readable table of every registered number format (``adaprec formats``).

Users pick formats by name; the table shows what each name buys them: range,
resolution and what happens at the edges.
"""

from __future__ import annotations

import io
import math

from adaprec.formats.registry import Format, get, names

__all__ = ["format_table", "format_rows", "COLUMNS"]

COLUMNS = (
    "name", "bits", "e", "m", "bias", "max finite", "min normal",
    "min subnormal", "eps", "inf/NaN", "native dtype",
)


def _num(v: float) -> str:
    """Small integers as they are, other powers of two as 2^k, the rest in %g."""
    if v.is_integer() and abs(v) < 1e6:
        return f"{v:g}"
    m, e = math.frexp(v)
    return f"2^{e - 1}" if m == 0.5 else f"{v:.6g}"


def _specials(f: Format) -> str:
    if f.has_inf:
        return "inf, NaN"
    return "NaN only" if f.has_nan else "none (saturates)"


def format_rows() -> list[tuple[str, ...]]:
    """One tuple of strings per registered format, in :data:`COLUMNS` order."""
    rows: list[tuple[str, ...]] = []
    for name in names():
        f = get(name)
        is_float = f.kind == "float"
        rows.append((
            f.name,
            str(f.bits),
            str(f.ebits) if is_float else "-",
            str(f.mbits) if is_float else f"{f.mbits}+sign",
            str(f.bias) if is_float else "-",
            _num(f.max_finite),
            _num(f.min_normal),
            _num(f.min_subnormal) if is_float else "-",
            _num(f.eps),
            _specials(f),
            str(f.torch_dtype).replace("torch.", "") if f.torch_dtype is not None else "-",
        ))
    return rows


def format_table(rich: bool = True) -> str:
    """The table as text: drawn with rich when it is installed, plain columns otherwise."""
    rows = format_rows()
    if rich:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # pragma: no cover - rich is a dependency, plain text still works
            rich = False
    if rich:
        table = Table(title="adaprec number formats (eps = spacing just above 1; int: the step)")
        for i, col in enumerate(COLUMNS):
            table.add_column(col, justify="left" if i in (0, 9, 10) else "right", no_wrap=True)
        for r in rows:
            table.add_row(*r)
        buf = io.StringIO()
        Console(file=buf, width=160, color_system=None, force_terminal=False).print(table)
        return buf.getvalue()
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    line = "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out) + "\n"
