"""adaprec: adaptive precision training for PyTorch."""

from adaprec import formats
from adaprec.errors import AdaprecError
from adaprec.formats import quantize

__version__ = "0.1.0"
__all__ = ["AdaprecError", "formats", "quantize", "__version__"]
