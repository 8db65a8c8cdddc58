"""Number formats and their emulation: registry, rounding, scaling, loss scaling."""

from adaprec.formats.quantize import ROUNDING_MODES, compiled, quantize
from adaprec.formats.registry import Format, get, is_registered, names, register

__all__ = ["Format", "get", "names", "register", "is_registered", "quantize", "compiled", "ROUNDING_MODES"]
