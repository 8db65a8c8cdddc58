"""Text tables, one renderer for every table adaprec prints (explain, simulate, reports)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["render_rows"]


def render_rows(head: Sequence[str], body: Sequence[Sequence[str]], style: str, rule: bool = False) -> list[str]:
    """A table's lines: Markdown (``|`` escaped in cells) or plain aligned columns (``rule``: dashes under the head)."""
    if style == "markdown":
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body)]
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    if rule:
        lines.append("  ".join("-" * w for w in widths))
    return lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in body]
