"""Named number formats: one immutable description per format.

A format is data, not behaviour: widths, bias and the derived range. The
quantizer reads these fields; plans and energy profiles refer to formats by
name, so a name is the stable identity of a format.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from adaprec.errors import FormatSpecError, UnknownFormatError

__all__ = ["Format", "get", "names", "register", "is_registered"]


@dataclass(frozen=True)
class Format:
    """One number format.

    ``kind`` is ``"float"`` (sign, ``ebits`` exponent, ``mbits`` mantissa) or
    ``"int"`` (signed, symmetric two's complement fixed point: values are
    integers in ``[-(2^(bits-1)-1), 2^(bits-1)-1]`` times ``scale``).
    """

    name: str
    kind: str
    bits: int
    ebits: int
    mbits: int
    bias: int
    max_finite: float
    min_normal: float
    min_subnormal: float
    eps: float
    has_inf: bool
    has_nan: bool
    torch_dtype: torch.dtype | None = field(default=None, compare=False)
    scale: float = 1.0
    description: str = ""

    @property
    def emax(self) -> int:
        """Largest unbiased exponent of a finite value."""
        if self.kind != "float":
            raise FormatSpecError(f"{self.name} is a fixed-point format and has no exponent")
        return math.frexp(self.max_finite)[1] - 1

    @property
    def emin(self) -> int:
        """Smallest unbiased exponent of a normal value."""
        return 1 - self.bias

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def holds_float32(self) -> bool:
        """Every float32 value is representable: rounding to this format changes nothing."""
        return self.kind == "float" and self.ebits >= 8 and self.mbits >= 23

    @property
    def qmax(self) -> int:
        """Largest integer code of a fixed-point format."""
        if self.kind != "int":
            raise FormatSpecError(f"{self.name} is a floating-point format and has no integer range")
        return 2 ** (self.bits - 1) - 1

    def __str__(self) -> str:
        return self.name


def _float_format(
    name: str,
    ebits: int,
    mbits: int,
    *,
    ieee: bool,
    fn: bool = False,
    dtype: torch.dtype | None = None,
    description: str = "",
    storage_bits: int | None = None,
) -> Format:
    """Build a float format.

    ``ieee``: the top exponent code is reserved for inf/NaN (fp32, fp16, bf16,
    E5M2). ``fn`` ("finite, NaN"): no inf; only the all-ones exponent *and*
    mantissa pattern is NaN (OCP E4M3FN). Neither: every code is a finite
    value and there is no inf or NaN (OCP MX fp6/fp4).
    """
    if ebits < 1 or mbits < 0 or 1 + ebits + mbits > 32 or ebits > 8 or mbits > 23:
        raise FormatSpecError(
            f"format {name!r}: exponent bits must be 1..8 and mantissa bits 0..23 "
            f"(1 + e + m <= 32), got e={ebits} m={mbits}"
        )
    bias = 2 ** (ebits - 1) - 1
    if ieee:
        emax = (2**ebits - 2) - bias
        max_finite = 2.0**emax * (2.0 - 2.0**-mbits)
    elif fn:
        emax = (2**ebits - 1) - bias
        # the all-ones mantissa at the top exponent is NaN, so one code less
        max_finite = 2.0**emax * (2.0 - 2.0 ** (1 - mbits)) if mbits > 0 else 2.0 ** (emax - 1)
    else:
        emax = (2**ebits - 1) - bias
        max_finite = 2.0**emax * (2.0 - 2.0**-mbits)
    emin = 1 - bias
    return Format(
        name=name,
        kind="float",
        bits=storage_bits if storage_bits is not None else 1 + ebits + mbits,
        ebits=ebits,
        mbits=mbits,
        bias=bias,
        max_finite=max_finite,
        min_normal=2.0**emin,
        min_subnormal=2.0 ** (emin - mbits),
        eps=2.0**-mbits,
        has_inf=ieee,
        has_nan=ieee or fn,
        torch_dtype=dtype,
        description=description,
    )


def _int_format(name: str, bits: int, frac_bits: int = 0, description: str = "") -> Format:
    if not 2 <= bits <= 24:
        raise FormatSpecError(
            f"format {name!r}: fixed-point formats need 2..24 bits (float32 holds "
            f"24-bit integers exactly), got {bits}"
        )
    if not 0 <= frac_bits < bits + 64:
        raise FormatSpecError(f"format {name!r}: fractional bits must be >= 0, got {frac_bits}")
    scale = 2.0**-frac_bits
    qmax = 2 ** (bits - 1) - 1
    return Format(
        name=name,
        kind="int",
        bits=bits,
        ebits=0,
        mbits=bits - 1,
        bias=0,
        max_finite=qmax * scale,
        min_normal=scale,
        min_subnormal=scale,
        eps=scale,
        has_inf=False,
        has_nan=False,
        torch_dtype=torch.int8 if bits == 8 and frac_bits == 0 else None,
        scale=scale,
        description=description or f"signed {bits}-bit fixed point, {frac_bits} fractional bits",
    )


_REGISTRY: dict[str, Format] = {}
_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "e4m3": "fp8_e4m3",
    "e4m3fn": "fp8_e4m3",
    "fp8": "fp8_e4m3",
    "e5m2": "fp8_e5m2",
    "e3m2": "fp6_e3m2",
    "e2m3": "fp6_e2m3",
    "e2m1": "fp4_e2m1",
    "fp4": "fp4_e2m1",
}


def register(fmt: Format) -> Format:
    """Add a format under its name (users may register their own)."""
    _REGISTRY[fmt.name] = fmt
    return fmt


for _f in (
    _float_format("fp32", 8, 23, ieee=True, dtype=torch.float32, description="IEEE binary32"),
    _float_format(
        "tf32", 8, 10, ieee=True, storage_bits=19,
        description="NVIDIA TensorFloat-32: fp32 range, 10-bit mantissa (stored as fp32)",
    ),
    _float_format("bf16", 8, 7, ieee=True, dtype=torch.bfloat16, description="bfloat16"),
    _float_format("fp16", 5, 10, ieee=True, dtype=torch.float16, description="IEEE binary16"),
    _float_format(
        "fp8_e4m3", 4, 3, ieee=False, fn=True, dtype=torch.float8_e4m3fn,
        description="OCP FP8 E4M3FN: no inf, max 448",
    ),
    _float_format(
        "fp8_e5m2", 5, 2, ieee=True, dtype=torch.float8_e5m2, description="OCP FP8 E5M2"
    ),
    _float_format("fp6_e3m2", 3, 2, ieee=False, description="OCP MX FP6 E3M2: no inf/NaN"),
    _float_format("fp6_e2m3", 2, 3, ieee=False, description="OCP MX FP6 E2M3: no inf/NaN"),
    _float_format("fp4_e2m1", 2, 1, ieee=False, description="OCP MX FP4 E2M1: no inf/NaN"),
):
    register(_f)
for _bits in (2, 3, 4, 5, 6, 8, 12, 14, 16):
    register(_int_format(f"int{_bits}", _bits))

_EXMY = re.compile(r"^e(\d+)m(\d+)$")
_INT = re.compile(r"^int(\d+)$")
_FIXED = re.compile(r"^fixed(\d+)_(\d+)$")


def names() -> list[str]:
    """Registered format names, in registration order."""
    return list(_REGISTRY)


def is_registered(name: str) -> bool:
    return name in _REGISTRY or name in _ALIASES


def get(name: str | Format) -> Format:
    """Return the format called ``name``.

    Besides the registered names this accepts ``eXmY`` (any float format with
    X exponent and Y mantissa bits, IEEE-style inf/NaN reserved when X >= 5,
    otherwise all codes finite as in the MX formats), ``intN`` and
    ``fixedN_F`` (N bits, F of them fractional).
    """
    if isinstance(name, Format):
        return name
    if not isinstance(name, str):
        raise UnknownFormatError(f"a format is named by a string, got {type(name).__name__} {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    if m := _EXMY.match(key):
        e, mb = int(m.group(1)), int(m.group(2))
        return register(
            _float_format(key, e, mb, ieee=e >= 5, description=f"custom E{e}M{mb}")
        )
    if m := _INT.match(key):
        return register(_int_format(key, int(m.group(1))))
    if m := _FIXED.match(key):
        return register(_int_format(key, int(m.group(1)), int(m.group(2))))
    known = ", ".join(_REGISTRY)
    raise UnknownFormatError(
        f"unknown number format {name!r}. Known formats: {known}; or spell one as "
        "'eXmY' (e.g. 'e3m4'), 'intN' (e.g. 'int6') or 'fixedN_F' (e.g. 'fixed16_8')."
    )


# the 16-bit float formats torch computes in natively (a dtype of their own), by name
FLOAT16_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def width_key(fmt: str | Format | Any) -> tuple[int, int, int]:
    """Sort key of "wider", the one rule policies, engine and ledger share.

    More storage bits is wider. At equal bits a float format ranks above
    fixed point: it carries its own dynamic range where fixed point needs a
    scale for it, so a guard widening an int8 role that overflowed moves
    towards fp8, never the other way. Then more mantissa bits (bf16 < fp16).
    Accepts a name, a :class:`Format`, or anything with a ``.format`` name
    (a plan's recipe).
    """
    f = get(fmt if isinstance(fmt, (str, Format)) else fmt.format)
    return (f.bits, int(f.kind == "float"), f.mbits)


def wider(a: str, b: str) -> str:
    """The wider of two format names by :func:`width_key` (``a`` on a tie): what a mixed-operand GEMM runs in."""
    return a if width_key(a) >= width_key(b) else b


def format_of_dtype(dtype: torch.dtype) -> str | None:
    """The registered format a torch dtype stores exactly (``torch.bfloat16`` -> ``"bf16"``), or None."""
    for f in _REGISTRY.values():
        if f.torch_dtype == dtype and f.kind == "float":
            return f.name
    return None
