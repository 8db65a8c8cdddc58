"""On-disk cache of device reports (and GEMM shape tables), so that a machine is measured once, not every run.

One JSON file per key (machine, torch version, thread count, sweep kind),
named by a hash of the key and holding the key itself, so that a file
copied from another machine or left by another version is recognised as
foreign and measured afresh. Writes go to a temporary file that replaces
the old one atomically: a crash never leaves half a file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adaprec.hardware.report import SCHEMA, DeviceReport, HardwareError

__all__ = ["ENV_VAR", "cache_path", "default_cache_dir", "key_digest", "load", "load_json", "store", "store_json"]

ENV_VAR = "ADAPREC_CACHE_DIR"


def default_cache_dir(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``$ADAPREC_CACHE_DIR``, else ``~/.cache/adaprec``."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "adaprec"


def key_digest(key: Mapping[str, Any]) -> str:
    """A short stable hash of a cache key."""
    blob = json.dumps(dict(key), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(directory: str | Path | None, key: Mapping[str, Any], prefix: str = "hardware") -> Path:
    """Where the entry for ``key`` lives (``prefix`` names what kind of entry: device report, shape table)."""
    return default_cache_dir(directory) / f"{prefix}-{key_digest(key)}.json"


def load_json(path: Path, key: Mapping[str, Any], schema: int, field: str) -> Any | None:
    """``field`` of the cache file at ``path`` if it is readable JSON written for ``key`` under ``schema``; else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("schema") != schema or data.get("key") != dict(key):
        return None  # foreign: another machine, version or measurement
    return data.get(field)


def load(path: Path, key: Mapping[str, Any]) -> DeviceReport | None:
    """The cached report at ``path`` if it is readable, well-formed and made for ``key``; else None."""
    data = load_json(path, key, SCHEMA, "report")
    if data is None:
        return None
    try:
        return DeviceReport.from_dict(data)
    except HardwareError:
        return None


def store(path: Path, key: Mapping[str, Any], report: DeviceReport) -> None:
    """Write ``report`` for ``key`` atomically (temporary file, then os.replace). Raises OSError on failure."""
    store_json(path, key, SCHEMA, "report", report.to_dict())


def store_json(path: Path, key: Mapping[str, Any], schema: int, field: str, payload: Any) -> None:
    """Write ``payload`` as ``field`` for ``key`` atomically (temporary file, then os.replace). Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps({"schema": schema, "key": dict(key), field: payload}, indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
