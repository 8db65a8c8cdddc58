"""Which number formats a device has arithmetic units for, decided from its flags.

These are pure decisions (flags in, verdicts out) so that they can be tested
for machines we do not have. They say what the silicon *claims*; the sweep in
:mod:`adaprec.hardware.sweep` then checks that the kernel really runs, gives
right answers and is faster than fp32 before a policy may use the format.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FORMATS",
    "RELEVANT_CPU_FLAGS",
    "CpuInfo",
    "cpu_native_formats",
    "cpu_conditional_formats",
    "cuda_native_formats",
    "normalize_arch",
    "read_cpu_info",
]

# The formats every report covers, cheapest first (the order fast_formats uses).
FORMATS: tuple[str, ...] = ("int8", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16", "fp32")

# Flags that change which formats run natively; only these enter the report
# and the cache key (so a kernel update that adds an unrelated flag keeps the cache).
RELEVANT_CPU_FLAGS: frozenset[str] = frozenset(
    {
        # x86
        "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni",
        "avx_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "avx_vnni_int8",
        # aarch64
        "asimd", "asimddp", "i8mm", "bf16", "fphp", "asimdhp", "sve", "sve2", "svebf16", "svei8mm", "sme",
    }
)  # fmt: skip

_FP8_CPU = (
    "no fp8 arithmetic on CPUs: torch's CPU _scaled_mm is a software path "
    "(it upcasts the operands and multiplies in a wider type)"
)


def normalize_arch(machine: str) -> str:
    """'x86_64' or 'aarch64' for the spellings platforms use, else the name lower-cased."""
    m = machine.lower()
    if m in ("x86_64", "amd64", "x64", "i386", "i686"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8", "armv8l"):
        return "aarch64"
    return m


def cpu_native_formats(flags: Iterable[str], arch: str) -> dict[str, tuple[bool, str]]:
    """For each format, whether these CPU flags give it native arithmetic, and why.

    Pure: pass the flags of any machine. int8 on an x86 CPU with AVX2 but no
    VNNI is answered False here; the probe upgrades it to native only when
    ``torch._int_mm`` is measured faster than fp32 (see
    :func:`cpu_conditional_formats`).
    """
    f = {x.lower() for x in flags}
    arch = normalize_arch(arch)
    out: dict[str, tuple[bool, str]] = {"fp32": (True, "fp32 is the reference format")}
    out["fp8_e4m3"] = (False, _FP8_CPU)
    out["fp8_e5m2"] = (False, _FP8_CPU)

    def first(*names: str) -> str | None:
        return next((n for n in names if n in f), None)

    if arch == "x86_64":
        hit = first("amx_bf16", "avx512_bf16")
        out["bf16"] = (
            (True, hit)
            if hit
            else (False, "no avx512_bf16 or amx_bf16: bf16 is converted to fp32 to compute, no bf16 units")
        )
        hit = first("amx_int8", "avx512_vnni", "avx_vnni")
        if hit:
            out["int8"] = (True, hit)
        elif "avx2" in f:
            out["int8"] = (
                False,
                "no VNNI (avx512_vnni, avx_vnni, amx_int8): int8 runs through AVX2 vpmaddubsw, "
                "native only if torch._int_mm measures faster than fp32",
            )
        else:
            out["int8"] = (False, "no VNNI and no AVX2: no int8 dot-product instructions")
        hit = first("amx_fp16", "avx512_fp16")
        out["fp16"] = (
            (True, hit)
            if hit
            else (False, "no avx512_fp16 or amx_fp16: fp16 is converted to fp32 to compute, no fp16 units")
        )
    elif arch == "aarch64":
        out["bf16"] = (True, "bf16") if "bf16" in f else (False, "no bf16 flag (BFDOT/BFMMLA missing)")
        hit = first("i8mm", "asimddp")
        out["int8"] = (True, hit) if hit else (False, "no asimddp or i8mm: no int8 dot-product instructions")
        hit = first("asimdhp", "fphp")
        out["fp16"] = (True, hit) if hit else (False, "no fphp or asimdhp: no fp16 arithmetic")
    else:
        why = f"adaprec knows no native-format flags for CPU architecture {arch!r}"
        for fmt in ("bf16", "int8", "fp16"):
            out[fmt] = (False, why)
    return out


def cpu_conditional_formats(flags: Iterable[str], arch: str) -> frozenset[str]:
    """Formats that count as native here only if the sweep measures them faster than fp32.

    Today only int8 on x86 with AVX2 but no VNNI: ``vpmaddubsw`` can still beat
    an fp32 GEMM, or not, depending on the chip; only a measurement says.
    """
    f = {x.lower() for x in flags}
    if normalize_arch(arch) == "x86_64" and "avx2" in f and not f & {"amx_int8", "avx512_vnni", "avx_vnni"}:
        return frozenset({"int8"})
    return frozenset()


def cuda_native_formats(major: int, minor: int) -> dict[str, tuple[bool, str]]:
    """For each format, whether a GPU of compute capability ``major.minor`` runs it natively, and why."""
    cc = (major, minor)
    sm = f"sm_{major}{minor}"

    def need(ok_from: tuple[int, int], what: str) -> tuple[bool, str]:
        want = f"sm_{ok_from[0]}{ok_from[1]}"
        if cc >= ok_from:
            return True, f"{sm} >= {want}: {what}"
        return False, f"{what} needs {want}+, this GPU is {sm}"

    return {
        "fp32": (True, "fp32 is the reference format"),
        "bf16": need((8, 0), "bf16 tensor cores"),
        "fp16": need((7, 0), "fp16 tensor cores"),
        "int8": need(
            (7, 5),
            "int8 tensor cores via torch._int_mm (which needs M > 16 and K, N multiples of 8)",
        ),
        "fp8_e4m3": need((8, 9), "fp8 tensor cores via torch._scaled_mm"),
        "fp8_e5m2": need((8, 9), "fp8 tensor cores via torch._scaled_mm"),
    }


@dataclass(frozen=True)
class CpuInfo:
    """What the operating system says about this CPU; ``note`` says why something is missing."""

    name: str
    arch: str
    flags: tuple[str, ...]  # the relevant flags found, sorted
    note: str = ""


def read_cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """CPU model name and relevant flags, from /proc/cpuinfo on Linux; empty flags elsewhere."""
    arch = normalize_arch(platform.machine() or "unknown")
    fallback = platform.processor() or platform.machine() or "unknown CPU"
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError as e:
        return CpuInfo(fallback, arch, (), f"could not read CPU flags from {cpuinfo} ({e.strerror or e})")
    name = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:  # x86 says flags, arm says Features
            flags = set(value.split())
        elif key == "cpu part" and not name:  # arm cores often give no model name
            name = f"ARM CPU part {value.strip()}"
    found = tuple(sorted(flags & RELEVANT_CPU_FLAGS))
    note = "" if flags else f"no flags line in {cpuinfo}"
    return CpuInfo(name or fallback, arch, found, note)
