"""Build and load adaprec's small C kernels: once per source, compiler and CPU, cached on disk.

Why one module: the fused 8-bit Adam step (:mod:`adaprec.optim.fused_adam`) and the int8 saved-tensor
codec (:mod:`adaprec.formats.int8_codec`) are each a C file without Python or torch headers, built with the
system C compiler (the one ``torch.compile`` needs on CPU) for this CPU (``-march=native``) and loaded with
ctypes; nothing else is imported, so a kernel costs no resident memory beyond its small library
(``torch.compile`` would add about 140 MiB of compiler modules). The library is built aside and moved in
atomically, under ``$ADAPREC_CACHE_DIR/kernels`` keyed by the source, the compiler, the flags and this
CPU's model and flags (a library built on another CPU could hold instructions this one lacks). Where no
compiler works, :func:`load` says why and the caller keeps its eager path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

__all__ = ["load", "available", "split", "FLAGS"]

# no contraction into fused multiply-adds (the eager path's order of roundings, as far as C can); no errno
# or trap semantics, so the loops vectorise; 512-bit vectors where the CPU has them
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         "-mprefer-vector-width=512", "-shared", "-fPIC"]


def _cpu_key() -> str:
    """What ``-march=native`` compiles for: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    from adaprec.hardware.cache import default_cache_dir  # $ADAPREC_CACHE_DIR, else ~/.cache/adaprec

    return default_cache_dir() / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def load(source: Path, what: str) -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why not) for the C file ``source``; ``what`` names it in messages."""
    if platform.system() not in ("Linux", "Darwin"):
        return None, f"{what} is built for Linux and macOS, not {platform.system()}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (cc, gcc or clang; set CC)"
    code = source.read_bytes()
    key = hashlib.sha256(b"\0".join([code, cc.encode(), " ".join(FLAGS).encode(), _cpu_key().encode()]))
    target = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then moved in atomically
                out = Path(tmp) / target.name
                run = subprocess.run([cc, *FLAGS, str(source), "-o", str(out), "-lm"],
                                     capture_output=True, text=True, timeout=120)
                if run.returncode != 0:
                    return None, f"{what} did not build with {cc}: {run.stderr.strip()[:300]}"
                os.replace(out, target)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"{what} could not be built in {target.parent}: {e}"
    try:
        return ctypes.CDLL(str(target)), ""
    except OSError as e:
        return None, f"{what} did not load: {e}"


_lock = threading.Lock()


def available(library: Callable[[], tuple[ctypes.CDLL | None, str]]) -> tuple[bool, str]:
    """Whether ``library()`` (a kernel module's cached loader) gives a library, and why not; one build at a time."""
    with _lock:
        lib, why = library()
    return lib is not None, why


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adaprec-kernel")


def split(call: Callable[[int, int], Any], groups: int, elements: int, min_share: int) -> list[Any]:
    """``call(g0, g1)`` over ``groups`` groups holding ``elements`` values, in shares for the threads torch uses.

    A thread gets ``min_share`` elements at least: handing a range to a pool thread costs tens of microseconds
    (measured for the fused Adam step: 65 Ki elements took about 1.5x as long split in two as on one thread).
    ctypes releases the GIL, so pool threads run the later shares while the calling thread runs the first.
    """
    workers = max(1, min(torch.get_num_threads(), elements // min_share))
    if workers == 1:
        return [call(0, groups)]
    cuts = [groups * k // workers for k in range(workers + 1)]
    futures = [_pool(workers - 1).submit(call, cuts[k], cuts[k + 1]) for k in range(1, workers)]
    return [call(cuts[0], cuts[1])] + [f.result() for f in futures]
