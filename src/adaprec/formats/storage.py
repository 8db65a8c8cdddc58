"""How a tensor is *kept* in memory: storage formats, and pack / unpack.

A number format (:mod:`adaprec.formats.registry`) says which values a
computation may produce; a storage format says which bytes hold a tensor
while it waits: a saved activation until backward, an optimizer moment
between steps. Rounding a value inside fp32 storage saves no byte, so here
a narrow format really is narrow: :func:`pack` returns the codes in their
own dtype plus fp32 scales, and :attr:`PackedTensor.nbytes` is what they
occupy. One spec string names a storage format everywhere::

    fp32 | bf16 | fp16                  plain casts (no scale)
    int8 | uint8 | int4 | uint4         integer codes times an fp32 absmax scale
    fp8_e4m3 | fp8_e5m2                 fp8 codes (1 byte, valid on any CPU) times a scale
    .../block<N> | /row | /tensor       scale granularity (int8, fp8: block256; 4-bit: block128)
    .../sqrt                            keep sign(x)*sqrt(|x|): twice the dynamic range in
                                        log terms, for values such as Adam's second moment

Values a code cannot hold never come back as a plausible number: NaN stays
NaN; +-inf stays +-inf where the code has infinities (fp32, bf16, fp16,
fp8_e5m2) and comes back NaN where it has none (fp8_e4m3, integer codes,
which reserve their most negative / largest code for NaN); a negative value
in an unsigned code comes back NaN. Scales come from the finite values
only, so one inf does not wipe out its block.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from adaprec.errors import FormatSpecError, UnknownFormatError
from adaprec.formats import int8_codec
from adaprec.formats.quantize import _use_compiled

__all__ = [
    "StorageFormat",
    "PackedTensor",
    "storage_format",
    "storage_bases",
    "pack",
    "unpack",
    "storage_nbytes",
    "packed_zeros",
    "as_bytes",
    "STORAGE_ROLES",
]

STORAGE_ROLES = ("activation", "optimizer_state", "output")
# what a GEMM hands the ops after it: a tensor those ops read as is, so only a dtype torch computes in
_OUTPUT_SPECS = ("fp32", "bf16", "fp16")
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class _Base:
    kind: str  # "float" (cast) or "int" (scaled integer codes)
    dtype: torch.dtype  # dtype the codes are read in (4-bit: the unpacked nibble's meaning)
    bits: int
    signed: bool
    max_code: float  # largest code magnitude a scale maps the block absmax onto
    nan_code: int | None = None  # integer codes: the code reserved for NaN / inf
    default_granularity: str = "none"
    default_block: int | None = None


_BASES: dict[str, _Base] = {
    "fp32": _Base("float", torch.float32, 32, True, torch.finfo(torch.float32).max),
    "bf16": _Base("float", torch.bfloat16, 16, True, torch.finfo(torch.bfloat16).max),
    "fp16": _Base("float", torch.float16, 16, True, torch.finfo(torch.float16).max),
    "fp8_e4m3": _Base("float", torch.float8_e4m3fn, 8, True, 448.0, None, "block", 256),
    "fp8_e5m2": _Base("float", torch.float8_e5m2, 8, True, 57344.0, None, "block", 256),
    "int8": _Base("int", torch.int8, 8, True, 127, -128, "block", 256),
    "uint8": _Base("int", torch.uint8, 8, False, 254, 255, "block", 256),
    "int4": _Base("int", torch.uint8, 4, True, 7, -8, "block", 128),
    "uint4": _Base("int", torch.uint8, 4, False, 14, 15, "block", 128),
}
_UNSCALED_ONLY = ("fp32", "bf16")  # fp32's exponent range already: a scale adds bytes, no range
_GRANULARITIES = ("none", "tensor", "row", "block")


def storage_bases() -> tuple[str, ...]:
    """The base names a storage spec may start with."""
    return tuple(_BASES)


@dataclass(frozen=True)
class StorageFormat:
    """How one tensor is kept: the codes' dtype, the scale granularity, the map.

    ``granularity``: ``"none"`` (a plain cast), ``"tensor"`` (one scale),
    ``"row"`` (one scale per row of the last dimension) or ``"block"`` (one
    per ``block_size`` consecutive elements of the flattened tensor).
    ``mapping``: ``"linear"`` or ``"sqrt"`` (codes hold sign(x)*sqrt(|x|)).
    """

    spec: str
    base: str
    kind: str
    code_dtype: torch.dtype
    bits: int
    signed: bool
    granularity: str
    block_size: int | None
    mapping: str

    @property
    def scaled(self) -> bool:
        return self.granularity != "none"

    @property
    def identity(self) -> bool:
        """Packing an fp32 tensor returns it unchanged (and unpack too)."""
        return self.base == "fp32"

    @property
    def max_code(self) -> float:
        return _BASES[self.base].max_code

    @property
    def nan_code(self) -> int | None:
        return _BASES[self.base].nan_code

    @property
    def bits_per_element(self) -> float:
        """Code bits plus the scale's share (32 bits per block or per row of unknown length: 0)."""
        if self.granularity == "block":
            return self.bits + 32 / self.block_size  # type: ignore[operator]
        return float(self.bits)

    def __str__(self) -> str:
        return self.spec


def _bad(msg: str) -> FormatSpecError:
    return FormatSpecError(msg)


@functools.lru_cache(maxsize=256)
def _parse(spec: str) -> StorageFormat:
    parts = [s.strip() for s in spec.strip().lower().split("/")]
    name = parts[0]
    if name not in _BASES:
        raise UnknownFormatError(
            f"unknown storage format {spec!r}: the base must be one of {list(_BASES)}, "
            "optionally followed by /block<N>, /row, /tensor and /sqrt (e.g. 'int8/block256')"
        )
    base = _BASES[name]
    granularity: str | None = None
    block: int | None = None
    mapping: str | None = None
    for mod in parts[1:]:
        if mod in ("none", "tensor", "row") or mod.startswith("block"):
            if granularity is not None:
                raise _bad(f"storage format {spec!r} names two scale granularities; keep one")
            if mod.startswith("block"):
                digits = mod[len("block"):]
                if not digits.isdigit() or int(digits) < 1:
                    raise _bad(
                        f"storage format {spec!r}: a block size must be a whole number >= 1, "
                        f"e.g. '{name}/block256'"
                    )
                granularity, block = "block", int(digits)
            else:
                granularity = mod
        elif mod in ("linear", "sqrt"):
            if mapping is not None:
                raise _bad(f"storage format {spec!r} names two maps; keep one of linear, sqrt")
            mapping = mod
        else:
            raise _bad(
                f"storage format {spec!r}: unknown modifier {mod!r}; "
                "the modifiers are /block<N>, /row, /tensor, /none, /linear, /sqrt"
            )
    if granularity is None:
        granularity, block = base.default_granularity, base.default_block
    mapping = mapping or "linear"
    if name in _UNSCALED_ONLY and granularity != "none":
        raise _bad(
            f"storage format {spec!r}: {name} already spans fp32's exponent range, so a scale "
            f"adds bytes and no range; use plain '{name}'"
        )
    if name == "fp32" and mapping != "linear":
        raise _bad(f"storage format {spec!r}: fp32 keeps values exactly; a map would only add rounding")
    if base.kind == "int" and base.bits < 8 and granularity != "block":
        raise _bad(
            f"storage format {spec!r}: {base.bits}-bit storage needs block scales "
            f"(one scale per {'row' if granularity == 'row' else 'tensor'} leaves most values at "
            f"zero); use '{name}/block{base.default_block}'"
        )
    if granularity == "none" and (base.kind == "int" or base.bits == 8):
        raise _bad(
            f"storage format {spec!r}: {name} codes need a scale; use '{name}/block{base.default_block}', "
            f"'{name}/row' or '{name}/tensor'"
        )
    if base.bits < 8 and block is not None and block % 2:
        raise _bad(
            f"storage format {spec!r}: {base.bits}-bit codes are kept two to a byte, so the block "
            f"size must be even; use '{name}/block{block + 1}'"
        )
    parts_out = [name]
    if granularity != "none":
        parts_out.append(f"block{block}" if granularity == "block" else granularity)
    if mapping != "linear":
        parts_out.append(mapping)
    return StorageFormat(
        spec="/".join(parts_out),
        base=name,
        kind=base.kind,
        code_dtype=base.dtype,
        bits=base.bits,
        signed=base.signed,
        granularity=granularity,
        block_size=block,
        mapping=mapping,
    )


def storage_format(spec: str | StorageFormat, role: str | None = None) -> StorageFormat:
    """Parse a storage spec (``"int8"``, ``"fp8_e4m3/block128"``, ``"uint8/sqrt"``...).

    ``role`` (``"activation"``, ``"optimizer_state"`` or ``"output"``) adds the
    rules of that role: optimizer moments refuse one scale per tensor (a single
    large value would zero the rest, step after step); a GEMM's output is a
    plain dtype (fp32, bf16, fp16), since the ops after it read it unpacked.
    """
    fmt = spec if isinstance(spec, StorageFormat) else _parse(str(spec))
    if role is None:
        return fmt
    if role not in STORAGE_ROLES:
        raise _bad(f"unknown storage role {role!r}; the roles are {list(STORAGE_ROLES)}")
    if role == "output" and fmt.spec not in _OUTPUT_SPECS:
        raise _bad(
            f"storage format {fmt.spec!r} cannot be a GEMM's output: the ops after it read the tensor as it is, "
            f"so it must be a dtype torch computes in; use one of {list(_OUTPUT_SPECS)}"
        )
    if role == "optimizer_state" and fmt.granularity == "tensor":
        raise _bad(
            f"storage format {fmt.spec!r} cannot hold optimizer state: one scale per tensor lets a "
            f"single large moment flush the others to zero; use '{fmt.base}/block256' or '{fmt.base}/row'"
        )
    return fmt


@dataclass(frozen=True, eq=False)
class PackedTensor:
    """A tensor kept in a storage format: ``codes`` (and fp32 ``scales``), the original shape and dtype.

    ``codes`` holds the format's codes (4-bit: two per byte), flattened and
    padded to whole blocks for block scales; ``scales`` has one entry per
    block, row or tensor (``None`` for plain casts).
    """

    fmt: StorageFormat
    codes: torch.Tensor
    scales: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """The bytes this tensor really occupies: codes plus scales."""
        n = self.codes.numel() * self.codes.element_size()
        if self.scales is not None:
            n += self.scales.numel() * self.scales.element_size()
        return n

    def numel(self) -> int:
        return math.prod(self.shape)

    def unpack(self) -> torch.Tensor:
        return unpack(self)

    def to_state(self) -> dict[str, torch.Tensor]:
        """Codes and scales as flat ``uint8`` views of the same bytes (no copy).

        ``torch.optim.Optimizer.load_state_dict`` casts every state tensor but
        ``step`` to its parameter's dtype. Bytes survive that cast exactly:
        every floating dtype holds the integers 0..255, and :meth:`from_state`
        turns them back into bytes, so a state saved this way resumes bit for bit.
        """
        out = {"codes": _bytes(self.codes)}
        if self.scales is not None:
            out["scales"] = _bytes(self.scales)
        return out

    @classmethod
    def from_state(
        cls, fmt: StorageFormat | str, state: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype
    ) -> PackedTensor:
        """The inverse of :meth:`to_state`: no copy for ``uint8`` input, an exact conversion for cast bytes."""
        fmt = storage_format(fmt)
        shape = torch.Size(shape)
        codes = as_bytes(state["codes"])
        if fmt.bits >= 8 and fmt.code_dtype != torch.uint8:
            codes = codes.view(fmt.code_dtype)
        if fmt.granularity == "none":
            codes = codes.view(shape)
        elif fmt.granularity == "row":
            codes = codes.view(_rows(shape))
        scales = as_bytes(state["scales"]).view(torch.float32) if "scales" in state else None
        return cls(fmt, codes, scales, shape, dtype)

    def __repr__(self) -> str:
        return f"PackedTensor({self.fmt.spec}, shape={tuple(self.shape)}, dtype={self.dtype}, nbytes={self.nbytes})"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1)
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A byte tensor from :meth:`PackedTensor.to_state`, undoing a cast to another dtype (exact: 0..255)."""
    return t if t.dtype == torch.uint8 else t.to(torch.uint8)


def _as_format(fmt: StorageFormat | str) -> StorageFormat:
    return fmt if isinstance(fmt, StorageFormat) else storage_format(fmt)


def _compand(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * sqrt(|x|), in fp32."""
    return x.abs().sqrt().copysign(x)


def _expand(y: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_compand`: sign(y) * y^2."""
    return y * y.abs()


def _rows(shape: torch.Size) -> tuple[int, int]:
    cols = shape[-1] if len(shape) else 1
    return (math.prod(shape) // cols if cols else 0), cols


def _grouped(x: torch.Tensor, fmt: StorageFormat) -> torch.Tensor:
    """``x`` (fp32) as a 2-d (groups, group size) tensor, padded with zeros to whole blocks."""
    n = x.numel()
    if fmt.granularity == "row":
        return x.reshape(_rows(x.shape))
    flat = x.reshape(-1)
    if fmt.granularity == "tensor":
        return flat.view(1, n)
    b = fmt.block_size
    assert b is not None
    pad = -n % b
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, b)


def _codec_takes(x: torch.Tensor, fmt: StorageFormat, dtype: torch.dtype | None = None) -> bool:
    """Whether the C int8 codec (:mod:`adaprec.formats.int8_codec`) packs or unpacks this: int8 block or row
    codes of an fp32 or bf16 CPU tensor, the kernel built, and no compiled path asked for."""
    if fmt.base != "int8" or fmt.mapping != "linear" or fmt.granularity not in ("block", "row") or \
            x.device.type != "cpu" or (dtype or x.dtype) not in (torch.float32, torch.bfloat16) or \
            x.numel() == 0 or x.dim() == 0 or _use_compiled.get():
        return False
    return int8_codec.available()[0]


def pack(x: torch.Tensor, fmt: StorageFormat | str) -> PackedTensor:
    """Keep ``x`` in ``fmt``; :func:`unpack` gives it back in its own dtype and shape.

    fp32 storage of an fp32 tensor is the tensor itself (no copy, bit-exact).
    Any shape, stride or size works (empty included); the last block is
    padded with zeros. Vectorised: a handful of passes over ``x``, no loop.
    """
    fmt = _as_format(fmt)
    if not x.is_floating_point():
        raise FormatSpecError(f"pack() keeps floating-point tensors; got {x.dtype}")
    x = x.detach()
    shape, dtype = x.shape, x.dtype
    if not fmt.scaled:
        if fmt.mapping == "sqrt":
            return PackedTensor(fmt, _compand(x.float()).to(fmt.code_dtype), None, shape, dtype)
        return PackedTensor(fmt, x.to(fmt.code_dtype), None, shape, dtype)
    if _codec_takes(x, fmt):
        group = int(shape[-1]) if fmt.granularity == "row" else int(fmt.block_size or 1)
        coded = int8_codec.encode(x, group, float(fmt.max_code), _scale_cap(fmt.max_code, False))
        if coded is not None:  # None: a value is not finite, the general rule below handles it
            codes, scales = coded
            return PackedTensor(fmt, codes.view(-1, group) if fmt.granularity == "row" else codes, scales, shape,
                                dtype)
    g = _grouped(x.float(), fmt)
    if fmt.mapping == "sqrt":
        g = _compand(g)
    if g.numel() == 0:
        n_scales = 1 if fmt.granularity == "tensor" else g.shape[0]
        scales = torch.ones(n_scales, dtype=torch.float32, device=x.device)
        codes = torch.empty(0 if fmt.granularity != "row" else g.shape, dtype=fmt.code_dtype, device=x.device)
        if fmt.bits < 8:
            codes = torch.empty(0, dtype=torch.uint8, device=x.device)
        return PackedTensor(fmt, codes, scales, shape, dtype)
    wide = fmt.bits >= 8  # 4-bit codes are paired into bytes after
    encode = _compiled_encode() if (_use_compiled.get() and wide) else _encode_eager
    codes, scale = encode(g, float(fmt.max_code), _scale_cap(fmt.max_code, fmt.mapping == "sqrt"), fmt.kind == "float",
                          fmt.code_dtype if wide else torch.float32, _has_inf(fmt.code_dtype), fmt.signed,
                          float(fmt.nan_code if fmt.nan_code is not None else 0))
    if not wide:
        codes = _to_nibbles(codes)
    if fmt.granularity != "row":
        codes = codes.reshape(-1)
    return PackedTensor(fmt, codes, scale.reshape(-1), shape, dtype)


def _encode(g: torch.Tensor, max_code: float, cap: float, is_float: bool, code_dtype: torch.dtype,
            keeps_inf: bool, signed: bool, nan_code: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and per-group scales of ``g`` (groups in rows, fp32): the scaled formats' one rule.

    A scale 1 for an all-zero group keeps 0/scale and code*scale finite; at least float32's smallest normal
    (a subnormal divisor loses bits); at most ``cap``, which keeps every code*scale finite. Scales come from
    the finite values only. Pure tensor code with its constants as arguments, so ``torch.compile`` fuses it
    into one pass (:func:`adaprec.formats.compiled`), bit for bit the same.
    """
    amax = g.abs().nan_to_num(nan=0.0, posinf=0.0).amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, (amax / max_code).clamp(_TINY, cap), 1.0)
    y = g / scale
    if is_float:
        if not keeps_inf:  # torch's cast would saturate inf to the max finite value
            y = torch.where(torch.isinf(y), torch.nan, y)
        return y.to(code_dtype), scale
    bad = ~torch.isfinite(y)
    if not signed:
        bad = bad | (y < 0)
    q = torch.where(bad, nan_code, y.round().clamp(-max_code if signed else 0.0, max_code))
    return q.to(code_dtype), scale


def _encode_eager(g: torch.Tensor, max_code: float, cap: float, is_float: bool, code_dtype: torch.dtype,
                  keeps_inf: bool, signed: bool, nan_code: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_encode` in fewer passes where every value is finite (the common case), bit for bit the same.

    Why: eager, the general rule makes about ten full-size passes and temporaries (measured: 28 ms to pack a
    32 MiB activation in int8 blocks, against 5 ms for a bf16 cast). With every value finite, the group
    absmax needs no ``nan_to_num`` (nor an ``abs`` temporary: the larger of max and -min), no code is bad,
    and the rounding and clamp run in place on the one quotient. A nonfinite value anywhere (seen in the
    amax: max and min propagate NaN and inf) takes the general rule.
    """
    if is_float:  # fp8 codes: the cast does the rounding; nothing to save
        return _encode(g, max_code, cap, is_float, code_dtype, keeps_inf, signed, nan_code)
    amax = torch.maximum(g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True).neg())  # no |g| temporary
    if not bool(torch.isfinite(amax).all()):
        return _encode(g, max_code, cap, is_float, code_dtype, keeps_inf, signed, nan_code)
    scale = torch.where(amax > 0, (amax / max_code).clamp(_TINY, cap), 1.0)
    y = g / scale
    if not signed:  # a negative value in an unsigned code is NaN's code
        neg = y < 0
        y.round_().clamp_(0.0, max_code).masked_fill_(neg, nan_code)
    else:
        y.round_().clamp_(-max_code, max_code)
    return y.to(code_dtype), scale


def _decode(c: torch.Tensor, scales: torch.Tensor, is_float: bool, nan_code: float) -> torch.Tensor:
    """Values of codes ``c`` grouped like ``scales`` (fp32), NaN where an integer code is the NaN code."""
    y = c.float() if is_float else torch.where(c == nan_code, torch.nan, c.float())
    return y.view(scales.numel(), -1) * scales.view(-1, 1)


def _decode_eager(c: torch.Tensor, scales: torch.Tensor, is_float: bool, nan_code: float) -> torch.Tensor:
    """:func:`_decode` with the scaling in place and the NaN mask only where a NaN code is present, bit for bit
    the same. The NaN code lies just outside the valid codes (-128 below -127..127, 255 above 0..254), so one
    min/max reduction finds it (measured: 0.01 ms per million codes, against 0.6 ms for ``(c == nan).any()``)."""
    if is_float:
        return _decode(c, scales, is_float, nan_code)
    lo, hi = torch.aminmax(c)
    if bool((lo == nan_code) | (hi == nan_code)):  # one host sync
        return _decode(c, scales, is_float, nan_code)
    return c.float().view(scales.numel(), -1).mul_(scales.view(-1, 1))


@functools.cache
def _compiled_encode() -> Any:
    return torch.compile(_encode, dynamic=True)


@functools.cache
def _compiled_decode() -> Any:
    return torch.compile(_decode, dynamic=True)


@functools.lru_cache(maxsize=64)
def _scale_cap(max_code: float, sqrt: bool) -> float:
    """The largest float32 scale whose ``max_code * scale`` (squared, for the sqrt map) stays finite.

    Computed for every base at import (below): a cache filled during a step would make a process's first
    step run tensor ops its later steps do not, which the ledger's byte count would see.
    """
    big = torch.tensor(torch.finfo(torch.float32).max)
    zero = torch.tensor(0.0)
    limit = big.sqrt() if sqrt else big
    while torch.isinf(limit * limit if sqrt else limit):
        limit = torch.nextafter(limit, zero)
    cap = limit / max_code
    while cap * max_code > limit:
        cap = torch.nextafter(cap, zero)
    return float(cap)


for _base in _BASES.values():
    for _sqrt in (False, True):
        _scale_cap(float(_base.max_code), _sqrt)


def _has_inf(dtype: torch.dtype) -> bool:
    return dtype not in (torch.float8_e4m3fn,)


def _to_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Integer-valued fp32 codes in [-8, 15] -> two 4-bit codes per byte (the first in the low nibble)."""
    nib = q.to(torch.int16).bitwise_and_(0xF).view(-1, 2)
    return (nib[:, 0] | (nib[:, 1] << 4)).to(torch.uint8)


def _from_nibbles(b: torch.Tensor, signed: bool) -> torch.Tensor:
    b = b.to(torch.int16)
    n = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(-1)
    return (n ^ 8) - 8 if signed else n


def unpack(p: PackedTensor) -> torch.Tensor:
    """The tensor ``p`` keeps, in its original dtype and shape (a new tensor, except fp32 in fp32)."""
    fmt = p.fmt
    if not fmt.scaled:
        if fmt.mapping == "sqrt":
            return _expand(p.codes.float()).to(p.dtype)
        return p.codes.to(p.dtype)
    n = p.numel()
    if n == 0:
        return torch.empty(p.shape, dtype=p.dtype, device=p.codes.device)
    assert p.scales is not None
    if p.codes.device.type == "cpu" and len(p.shape) > 0 and _codec_takes(p.codes, fmt, p.dtype):
        group = int(p.shape[-1]) if fmt.granularity == "row" else int(fmt.block_size or 1)
        return int8_codec.decode(p.codes, p.scales, p.shape, p.dtype, group, int(fmt.nan_code or 0))
    c = _from_nibbles(p.codes, fmt.signed) if fmt.bits < 8 else p.codes
    decode = _compiled_decode() if (_use_compiled.get() and fmt.bits >= 8) else _decode_eager
    y = decode(c, p.scales, fmt.kind == "float", float(fmt.nan_code if fmt.nan_code is not None else 0))
    if fmt.mapping == "sqrt":
        y = _expand(y)
    return y.reshape(-1)[:n].view(p.shape).to(p.dtype)


def packed_zeros(
    fmt: StorageFormat | str,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> PackedTensor:
    """A tensor of zeros kept in ``fmt``, built without a full-size fp32 temporary (as ``pack(zeros)`` gives)."""
    fmt = _as_format(fmt)
    shape = torch.Size(shape)
    n = math.prod(shape)
    if not fmt.scaled:
        return PackedTensor(fmt, torch.zeros(shape, dtype=fmt.code_dtype, device=device), None, shape, dtype)
    if fmt.granularity == "row":
        rows, cols = _rows(shape)
        codes = torch.zeros((rows, cols), dtype=fmt.code_dtype, device=device)
        return PackedTensor(fmt, codes, torch.ones(rows, device=device), shape, dtype)
    if fmt.granularity == "tensor":
        codes = torch.zeros(n, dtype=fmt.code_dtype, device=device)
        return PackedTensor(fmt, codes, torch.ones(1, device=device), shape, dtype)
    b = fmt.block_size
    assert b is not None
    blocks = -(-n // b)
    codes = torch.zeros(blocks * b if fmt.bits >= 8 else blocks * b // 2, dtype=fmt.code_dtype, device=device)
    return PackedTensor(fmt, codes, torch.ones(blocks, device=device), shape, dtype)


def storage_nbytes(fmt: StorageFormat | str, numel: int, *, last_dim: int | None = None) -> int:
    """Bytes a tensor of ``numel`` elements occupies in ``fmt`` (what :attr:`PackedTensor.nbytes` reports).

    ``last_dim``: the length of the last dimension, for row scales (a tensor
    without it counts as one row, as a 0-d or 1-d tensor packs).
    """
    fmt = _as_format(fmt)
    if numel < 0:
        raise FormatSpecError(f"storage_nbytes: numel must be >= 0, got {numel}")
    item = torch.empty(0, dtype=fmt.code_dtype).element_size()
    if fmt.granularity == "none":
        return numel * item
    if fmt.granularity == "tensor":
        return numel * fmt.bits // 8 + 4
    if fmt.granularity == "row":
        cols = last_dim if last_dim is not None else numel
        rows = numel // cols if cols else 0
        return numel * item + 4 * rows
    b = fmt.block_size
    assert b is not None
    blocks = -(-numel // b)
    return blocks * b * fmt.bits // 8 + 4 * blocks
