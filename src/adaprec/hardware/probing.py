"""probe(): what this device runs natively and how fast, measured once and cached.

Machines change between sessions (a CPU with bf16 units today, one without
tomorrow), so nothing here is hard-coded: flags say what the silicon claims,
the sweep runs every kernel, checks its answers and times it against fp32,
and the verdicts are kept per machine, torch version and thread count.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from adaprec.hardware import cache as _cache
from adaprec.hardware import sweep as _sweep
from adaprec.hardware.flags import (
    FORMATS,
    CpuInfo,
    cpu_conditional_formats,
    cpu_native_formats,
    cuda_native_formats,
    read_cpu_info,
)
from adaprec.hardware.report import (
    FAST_MARGIN,
    OPS,
    SCHEMA,
    DeviceReport,
    FormatSupport,
    HardwareError,
    format_speedup,
)

__all__ = ["clear_memo", "device_key", "probe", "resolve_device"]

_MEMO: dict[str, DeviceReport] = {}
_LOCK = threading.Lock()


@functools.cache
def _cpu_info() -> CpuInfo:
    return read_cpu_info()  # the CPU does not change while a process runs


def clear_memo() -> None:
    """Forget the reports probed in this process (the disk cache is kept)."""
    with _LOCK:
        _MEMO.clear()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to probe: None means cpu; 'cuda' means the current CUDA device."""
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise HardwareError(f"cannot probe device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HardwareError(
                f"cannot probe {device!r}: torch.cuda.is_available() is False here "
                f"(torch {torch.__version__}); probe('cpu') instead, or install a CUDA build of torch"
            )
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise HardwareError(f"cannot probe {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        dev = torch.device("cuda", index)
    return dev


def _identify(dev: torch.device, sweep: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cache key, facts about the device) without measuring anything."""
    # schema and ops: a file written before an op class was measured lacks its verdicts, so it must miss
    base = {"schema": SCHEMA, "ops": list(OPS), "device": str(dev), "torch": str(torch.__version__),
            "threads": torch.get_num_threads(), "sweep": sweep}  # fmt: skip
    if dev.type == "cpu":
        info = _cpu_info()
        capability = torch.backends.cpu.get_cpu_capability()
        notes = [info.note] if info.note else []
        if not torch.backends.mkldnn.is_available():
            notes.append("torch was built without oneDNN (mkldnn): bf16 GEMM and conv may be slow")
        flags_hash = hashlib.sha256(" ".join(info.flags).encode()).hexdigest()[:16]
        key = {**base, "machine": info.name, "arch": info.arch, "flags": flags_hash, "capability": capability}
        facts = {
            "name": info.name,
            "capability": capability,
            "flags": info.flags,
            "decisions": cpu_native_formats(info.flags, info.arch),
            "conditional": cpu_conditional_formats(info.flags, info.arch),
            "notes": notes,
            "measure": True,
        }
        return key, facts
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        name = torch.cuda.get_device_name(dev)
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        key = {**base, "machine": name, "capability": f"sm_{major}{minor}", "cuda": torch.version.cuda,
               "allow_tf32": tf32}  # fmt: skip
        notes = ["fp32 GEMMs may run in TF32 (torch.backends.cuda.matmul.allow_tf32 is True)"] if tf32 else []
        facts = {
            "name": name,
            "capability": f"sm_{major}{minor}",
            "flags": (),
            "decisions": cuda_native_formats(major, minor),
            "conditional": frozenset(),
            "notes": notes,
            "measure": True,
        }
        return key, facts
    why = f"adaprec probes cpu and cuda devices; on {dev.type} only fp32 is offered"
    decisions = {f: (f == "fp32", "fp32 is the reference format" if f == "fp32" else why) for f in FORMATS}
    key = {**base, "machine": dev.type}
    facts = {"name": dev.type, "capability": "unknown", "flags": (), "decisions": decisions,
             "conditional": frozenset(), "notes": [why], "measure": False}  # fmt: skip
    return key, facts


def device_key(device: str | torch.device | None) -> dict[str, Any]:
    """What identifies this device for a cache of measurements: machine, flags, torch version, threads.

    The device report's own key without its sweep kind and schema, for other
    measurements (e.g. :mod:`adaprec.hardware.shapes`) that must miss on another
    machine, torch version or thread count just as the report does."""
    return {k: v for k, v in cache_key(device, "none").items() if k not in ("schema", "ops", "sweep")}


def _how_measured(m: _sweep.Measurement) -> str:
    if m.speedup is None:
        return "not timed (sweep='none')" if m.shapes_total == 0 else "not timed"
    s = f"measured {format_speedup(m.speedup)} fp32"
    if m.stopped_early:
        return f"{s} (timed on {m.shapes_measured} of {m.shapes_total} shapes, then dropped: far slower)"
    shapes = "1 shape" if m.shapes_total == 1 else f"geomean of {m.shapes_measured} shapes"
    return f"{s} ({shapes}, median of {m.repeats} runs each)"


def _support(
    fmt: str,
    decision: tuple[bool, str],
    conditional: bool,
    m: _sweep.Measurement | None,
) -> FormatSupport:
    """One verdict from what the flags claim and what running the kernel showed."""
    flag_ok, why = decision
    if m is None:  # not run at all (a device type adaprec does not sweep)
        return FormatSupport(fmt, flag_ok and fmt == "fp32", "-", 1.0 if fmt == "fp32" else None, why)
    if fmt == "fp32":
        rate = f"; {m.gflops:.0f} GFLOP/s" if m.gflops else ""
        note = "" if m.ok else f"; warning: {m.error}"
        return FormatSupport(fmt, True, m.kernel, 1.0 if m.speedup is not None else None,
                             f"reference format{rate}{note}")  # fmt: skip
    how = _how_measured(m)
    if not m.ok:
        lead = f"flags say native ({why}) but " if flag_ok else f"{why}; "
        return FormatSupport(fmt, False, m.kernel, None, f"{lead}{m.error}")
    s = m.speedup
    if conditional:
        native = s is not None and s >= FAST_MARGIN
        verdict = "counted native" if native else "not counted native"
        return FormatSupport(fmt, native, m.kernel, s, f"{why}; {how}: {verdict}")
    if not flag_ok:
        return FormatSupport(fmt, False, m.kernel, s, f"{why}; {how}")
    tail = ""
    if s is not None and s < 1.0:
        tail = ": slower than fp32 here, not offered"
    elif s is not None and s < FAST_MARGIN:
        tail = f": within the {FAST_MARGIN}x margin of fp32, not offered"
    return FormatSupport(fmt, True, m.kernel, s, f"{why}; {how}{tail}")


def _assemble(dev: torch.device, facts: Mapping[str, Any], result: _sweep.SweepResult | None, sweep: str) -> DeviceReport:
    decisions, conditional = facts["decisions"], facts["conditional"]
    gemm = result.gemm if result else {}
    conv = result.conv if result else {}
    attn = result.attention if result else {}
    formats = {f: _support(f, decisions[f], f in conditional, gemm.get(f)) for f in FORMATS}
    convs = {f: _support(f, decisions[f], False, conv.get(f)) for f in _sweep.CONV_FORMATS}
    attention = {f: _support(f, decisions[f], False, attn.get(f)) for f in _sweep.attention_formats(dev.type)}
    notes = list(facts["notes"])
    for op, ms in (("GEMM", gemm), ("conv", conv), ("attention", attn)):
        spread = ms["fp32"].fp32_spread if "fp32" in ms else None
        if spread is not None and spread > _sweep.NOISY_SPREAD:
            notes.append(
                f"{op} timings were noisy even when repeated (fp32 runs of one shape differ {spread:.1f}x): "
                "another process was probably using the device; probe(refresh=True) when it is idle"
            )
    return DeviceReport(
        device=str(dev),
        name=facts["name"],
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        capability=facts["capability"],
        flags=tuple(facts["flags"]),
        formats=formats,
        conv=convs,
        attention=attention,
        sweep=sweep,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        notes=tuple(notes),
    )


def cache_key(device: str | torch.device | None = None, sweep: str = "full") -> dict[str, Any]:
    """The key :func:`probe` files ``device``'s report under (machine, torch, thread count, sweep, op classes)."""
    return _identify(resolve_device(device), sweep)[0]


def probe(
    device: str | torch.device | None = None,
    *,
    refresh: bool = False,
    sweep: str = "full",
    cache_dir: str | Path | None = None,
) -> DeviceReport:
    """What ``device`` (default cpu) runs natively and how fast, so policies pick only formats that pay here.

    ``sweep``: "full" times 3 training-like GEMM shapes, a conv2d and a causal
    attention, each forward and backward (a few seconds on a 2-core CPU),
    "quick" one small shape each (well under a second), "none" only checks
    that each kernel runs (no speedups, so only fp32 is fast). The report is
    cached as JSON in ``cache_dir``, else ``$ADAPREC_CACHE_DIR``, else
    ``~/.cache/adaprec``, keyed by machine, torch version, thread count, sweep
    kind and the op classes measured, and memoised in this process;
    ``refresh=True`` measures again and overwrites both.
    """
    if sweep not in _sweep.SWEEP_KINDS:
        raise HardwareError(f"unknown sweep {sweep!r}: use one of {', '.join(_sweep.SWEEP_KINDS)}")
    dev = resolve_device(device)
    key, facts = _identify(dev, sweep)
    path = _cache.cache_path(cache_dir, key)
    memo_key = str(path.absolute())
    with _LOCK:
        if not refresh:
            hit = _MEMO.get(memo_key) or _cache.load(path, key)
            if hit is not None:
                _MEMO[memo_key] = hit
                return hit
        result = _sweep.run(dev, sweep) if facts["measure"] else None
        report = _assemble(dev, facts, result, sweep)
        try:
            _cache.store(path, key, report)
        except OSError as e:
            warnings.warn(f"adaprec could not cache the device report at {path} ({e}); it will be measured again",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
        _MEMO[memo_key] = report
        return report
