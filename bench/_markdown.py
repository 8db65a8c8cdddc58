"""Write one benchmark's section of docs/BENCHMARKS.md, leaving the others as they are."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every figure here was measured by a script in `bench/`, side by side in one run; "
    "rerun it to refresh its section. Nothing is typed in by hand.\n"
)


def write_section(title: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the section headed ``## title`` with ``body``; atomic write."""
    text = doc.read_text() if doc.exists() else HEADER
    heading = f"## {title}"
    start = text.find(heading)
    block = f"{heading}\n\n{body.strip()}\n"
    if start < 0:
        text = text.rstrip() + "\n\n" + block
    else:
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + block + (text[nxt:] if nxt >= 0 else "")
    doc.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=doc.parent, prefix=".bench-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, doc)
