"""Number formats and their emulation: registry, rounding, scaling, loss scaling."""

from adaprec.formats.loss_scaling import DynamicLossScaler
from adaprec.formats.quantize import ROUNDING_MODES, compiled, quantize, quantize_each
from adaprec.formats.registry import Format, get, is_registered, names, register
from adaprec.formats.scaling import (
    MX_FORMATS,
    CurrentScaler,
    DelayedScaler,
    ScalingError,
    mx_formats,
    pow2_scale,
    quantize_mx,
)
from adaprec.formats.storage import (
    PackedTensor,
    StorageFormat,
    pack,
    storage_format,
    storage_nbytes,
    unpack,
)
from adaprec.formats.table import format_table

__all__ = [
    "Format",
    "get",
    "names",
    "register",
    "is_registered",
    "quantize",
    "quantize_each",
    "compiled",
    "ROUNDING_MODES",
    "CurrentScaler",
    "DelayedScaler",
    "ScalingError",
    "pow2_scale",
    "quantize_mx",
    "mx_formats",
    "MX_FORMATS",
    "DynamicLossScaler",
    "format_table",
    "StorageFormat",
    "PackedTensor",
    "storage_format",
    "storage_nbytes",
    "pack",
    "unpack",
]
