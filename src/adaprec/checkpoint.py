"""Saving and loading training checkpoints safely: atomic writes, a checksum, ``weights_only`` loads.

Why: a run killed while writing leaves half a file, and a bit flipped on disk
loads without complaint if nothing checks it; torch's own errors for both
(``OSError``, ``UnpicklingError``) name neither the file nor the fix.
:func:`save_checkpoint` writes to a temporary file in the same folder, syncs
it and renames it over the target (readers see the old file or the new one,
never a mix), with a SHA-256 of the payload in a short header;
:func:`load_checkpoint` checks length and checksum before unpickling (with
``weights_only=True``) and raises :class:`~adaprec.errors.CheckpointError`
naming what is wrong. Files written by plain ``torch.save`` load too, without
the checksum (there is none to check).

    from adaprec.checkpoint import load_checkpoint, save_checkpoint
    save_checkpoint("run.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "adaprec": ap.state_dict()})
    state = load_checkpoint("run.pt")
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from adaprec.errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint"]

_MAGIC = b"ADAPRECK1\n"  # then: 64 hex digits of the payload's SHA-256, " ", its length in bytes, "\n"


def save_checkpoint(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` (state dicts: tensors, numbers, strings, lists, dicts) to ``path`` atomically, with a checksum."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    header = _MAGIC + f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _quiet():
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = None) -> Any:
    """Read what :func:`save_checkpoint` (or ``torch.save``) wrote, checked; ``weights_only=True``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e})") from None
    payload = raw
    if raw.startswith(_MAGIC):
        end = raw.find(b"\n", len(_MAGIC))
        try:
            digest, length = raw[len(_MAGIC):end].decode().split(" ")
            length_n = int(length)
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"checkpoint {path} is corrupt: its header is unreadable") from None
        payload = raw[end + 1:]
        if len(payload) < length_n:
            raise CheckpointError(
                f"checkpoint {path} is truncated: {len(payload)} of {length_n} bytes (the write was cut short); "
                "use an earlier checkpoint"
            )
        if len(payload) > length_n or hashlib.sha256(payload).hexdigest() != digest:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its checksum does not match its contents (the file changed after "
                "it was written); use an earlier checkpoint"
            )
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
        what = "truncated or corrupt" if not raw.startswith(_MAGIC) else "unreadable"
        raise CheckpointError(
            f"checkpoint {path} is {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "use an earlier checkpoint"
        ) from None


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)
