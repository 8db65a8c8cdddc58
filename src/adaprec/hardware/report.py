"""The answer a probe gives: per format, native or not, which kernel, how fast, and why.

Frozen and serialisable, so that it can be cached on disk, shared between
callers in one process without anyone changing it under another, and shown
to a user as a table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from adaprec.errors import AdaprecError
from adaprec.hardware.flags import FORMATS

__all__ = ["FAST_MARGIN", "OPS", "DeviceReport", "FormatSupport", "HardwareError", "format_speedup"]

# A format must beat fp32 by this factor to be offered: below it, the gain is
# within timing noise and not worth the precision it costs.
FAST_MARGIN = 1.1
OPS = ("gemm", "conv", "attention")
# Version of the report's layout. 2 added ``attention``: a report (or cache file) of an older
# schema lacks a verdict policies now ask for, so it is refused and measured afresh.
SCHEMA = 2


class HardwareError(AdaprecError, ValueError):
    """A device that cannot be probed, an unknown op or sweep kind, or a malformed report."""


def format_speedup(s: float | None) -> str:
    """'2.41x' for a measured speedup, '-' when not measured."""
    return "-" if s is None else f"{s:.2f}x"


@dataclass(frozen=True)
class FormatSupport:
    """How one number format runs on one device for one op."""

    format: str
    native: bool  # the device has arithmetic for it and the kernel ran correctly
    kernel: str  # what was executed, e.g. "torch._int_mm"
    speedup: float | None  # fp32 time / this format's time (geometric mean over shapes); None if not measured
    reason: str  # why not native, or how it was measured

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "native": self.native,
            "kernel": self.kernel,
            "speedup": self.speedup,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FormatSupport:
        try:
            sp = d["speedup"]
            fs = cls(
                format=str(d["format"]),
                native=d["native"],
                kernel=str(d["kernel"]),
                speedup=None if sp is None else float(sp),
                reason=str(d["reason"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise HardwareError(f"malformed format entry {dict(d)!r}: {e}") from None
        if not isinstance(fs.native, bool):
            raise HardwareError(f"malformed format entry {dict(d)!r}: 'native' must be true or false")
        return fs


def _freeze(m: Mapping[str, FormatSupport]) -> Mapping[str, FormatSupport]:
    return MappingProxyType(dict(m))


@dataclass(frozen=True)
class DeviceReport:
    """What one device runs natively and how fast, as probed (see :func:`adaprec.hardware.probe`).

    ``formats`` covers GEMMs (fp32, bf16, fp16, int8, fp8_e4m3, fp8_e5m2);
    ``conv`` covers a training-like conv2d forward and backward (fp32, bf16);
    ``attention`` covers causal ``F.scaled_dot_product_attention`` forward and
    backward (fp32, bf16, and fp16 on CUDA). Each op class has its own verdict
    because one does not predict another: a CPU's bf16 GEMMs may be twice as
    fast as fp32 while its bf16 attention is not faster at all. All three are
    read-only mappings: one report is shared by every caller.
    """

    device: str  # "cpu", "cuda:0"
    name: str  # CPU model name or GPU name
    torch_version: str
    threads: int  # torch.get_num_threads() when measured
    capability: str  # CPU: torch.backends.cpu.get_cpu_capability(); CUDA: "sm_90"
    flags: tuple[str, ...]  # relevant CPU flags found (empty on GPUs)
    formats: Mapping[str, FormatSupport]
    conv: Mapping[str, FormatSupport] = field(default_factory=dict)
    attention: Mapping[str, FormatSupport] = field(default_factory=dict)
    sweep: str = "full"  # "full", "quick" or "none"
    measured_at: str = ""  # ISO 8601 UTC time of the measurement
    notes: tuple[str, ...] = ()  # anything the probe could not find out

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", _freeze(self.formats))
        object.__setattr__(self, "conv", _freeze(self.conv))
        object.__setattr__(self, "attention", _freeze(self.attention))
        object.__setattr__(self, "flags", tuple(self.flags))
        object.__setattr__(self, "notes", tuple(self.notes))

    def table_for(self, op: str) -> Mapping[str, FormatSupport]:
        if op == "gemm":
            return self.formats
        if op == "conv":
            return self.conv
        if op == "attention":
            return self.attention
        raise HardwareError(f"unknown op {op!r}: use one of {', '.join(OPS)}")

    def is_native(self, fmt: str, op: str = "gemm") -> bool:
        """Whether ``fmt`` runs natively (and correctly) here for ``op``; unlisted formats are not."""
        fs = self.table_for(op).get(fmt)
        return bool(fs and fs.native)

    def fast_formats(self, op: str = "gemm") -> tuple[str, ...]:
        """Formats a policy may choose here: native and measured >= FAST_MARGIN x fp32, cheapest first.

        fp32 is always included (last), so a policy always has somewhere to go.
        Formats that were not measured (sweep="none") are not offered.
        """
        table = self.table_for(op)
        out = []
        for fmt in FORMATS:
            if fmt == "fp32":
                continue
            fs = table.get(fmt)
            if fs and fs.native and fs.speedup is not None and fs.speedup >= FAST_MARGIN:
                out.append(fmt)
        return (*out, "fp32")

    def table(self) -> str:
        """A markdown table per op: format | native? | kernel | speed vs fp32 | reason."""
        head = (
            f"{self.device}: {self.name} (torch {self.torch_version}, {self.threads} threads, "
            f"capability {self.capability}, sweep={self.sweep}"
            + (f", measured {self.measured_at}" if self.measured_at else "")
            + ")"
        )
        lines = [head]
        if self.flags:
            lines.append(f"flags: {' '.join(self.flags)}")
        lines.extend(f"note: {n}" for n in self.notes)
        for op, title in (("gemm", "GEMM"), ("conv", "conv2d fwd+bwd"), ("attention", "attention fwd+bwd")):
            table = self.table_for(op)
            if not table:
                continue
            lines += [
                "",
                f"| format | native? | kernel | {title} speed vs fp32 | reason |",
                "|---|---|---|---|---|",
            ]
            order = [f for f in FORMATS if f in table] + [f for f in table if f not in FORMATS]
            for fmt in order:
                fs = table[fmt]
                reason = fs.reason.replace("|", "/")
                lines.append(
                    f"| {fmt} | {'yes' if fs.native else 'no'} | `{fs.kernel}` | "
                    f"{format_speedup(fs.speedup)} | {reason} |"
                )
            lines += ["", f"fast here ({op}): {', '.join(self.fast_formats(op))}"]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; :meth:`from_dict` reads it back equal."""
        return {
            "schema": SCHEMA,
            "device": self.device,
            "name": self.name,
            "torch_version": self.torch_version,
            "threads": self.threads,
            "capability": self.capability,
            "flags": list(self.flags),
            "formats": {k: v.to_dict() for k, v in self.formats.items()},
            "conv": {k: v.to_dict() for k, v in self.conv.items()},
            "attention": {k: v.to_dict() for k, v in self.attention.items()},
            "sweep": self.sweep,
            "measured_at": self.measured_at,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceReport:
        """Inverse of :meth:`to_dict`; raises :class:`HardwareError` on anything malformed."""
        if not isinstance(d, Mapping):
            raise HardwareError(f"a device report must be a mapping, got {type(d).__name__}")
        if d.get("schema") != SCHEMA:
            raise HardwareError(f"device report schema {d.get('schema')!r}, this adaprec reads {SCHEMA}")
        if "attention" not in d:
            raise HardwareError("device report has no 'attention' verdicts (an older probe wrote it): "
                                "measure again with probe(refresh=True)")  # fmt: skip
        try:
            formats, conv, attention = d["formats"], d.get("conv", {}), d["attention"]
            if not all(isinstance(t, Mapping) for t in (formats, conv, attention)):
                raise TypeError("formats, conv and attention must be mappings")
            return cls(
                device=str(d["device"]),
                name=str(d["name"]),
                torch_version=str(d["torch_version"]),
                threads=int(d["threads"]),
                capability=str(d["capability"]),
                flags=tuple(str(f) for f in d["flags"]),
                formats={str(k): FormatSupport.from_dict(v) for k, v in formats.items()},
                conv={str(k): FormatSupport.from_dict(v) for k, v in conv.items()},
                attention={str(k): FormatSupport.from_dict(v) for k, v in attention.items()},
                sweep=str(d.get("sweep", "full")),
                measured_at=str(d.get("measured_at", "")),
                notes=tuple(str(n) for n in d.get("notes", ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise HardwareError(f"malformed device report: {type(e).__name__}: {e}") from None
