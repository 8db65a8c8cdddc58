"""Number formats and their emulation: registry, rounding, scaling, loss scaling."""

from adaprec.formats.loss_scaling import DynamicLossScaler
from adaprec.formats.modes import SCALINGS, Rounding, Scaling
from adaprec.formats.quantize import ROUNDING_MODES, compiled, quantize, quantize_each
from adaprec.formats.registry import (
    FLOAT16_DTYPES,
    Format,
    format_of_dtype,
    get,
    is_registered,
    names,
    register,
    wider,
    width_key,
)
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
    "width_key",
    "FLOAT16_DTYPES",
    "wider",
    "format_of_dtype",
    "quantize",
    "quantize_each",
    "compiled",
    "ROUNDING_MODES",
    "Rounding",
    "Scaling",
    "SCALINGS",
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
