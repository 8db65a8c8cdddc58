"""Temporary stand-in for ``adaprec.formats.storage`` (bf16 only), until that module lands.

Delete this file once ``adaprec.formats.storage`` is merged: :mod:`adaprec.engine.saved`
imports the real module first and falls back here only while it is absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaprec.errors import UnknownFormatError


@dataclass(frozen=True)
class StorageFormat:
    spec: str
    bits: int
    identity: bool = False

    def __str__(self) -> str:
        return self.spec


@dataclass
class PackedTensor:
    data: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    fmt: StorageFormat

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def codes(self) -> torch.Tensor:
        return self.data


_FORMATS = {"bf16": StorageFormat("bf16", 16), "fp32": StorageFormat("fp32", 32, True)}


def storage_format(name: str | StorageFormat) -> StorageFormat:
    if isinstance(name, StorageFormat):
        return name
    if name not in _FORMATS:
        raise UnknownFormatError(f"storage format {name!r}: the stand-in knows only bf16")
    return _FORMATS[name]


def pack(x: torch.Tensor, fmt: str | StorageFormat) -> PackedTensor:
    f = storage_format(fmt)
    if f.identity:
        return PackedTensor(x.detach(), x.shape, x.dtype, f)
    return PackedTensor(x.detach().to(torch.bfloat16), x.shape, x.dtype, f)


def unpack(p: PackedTensor) -> torch.Tensor:
    return p.data.to(p.dtype)
