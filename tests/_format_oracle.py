"""A slow, obviously-correct reference for rounding one Python float to a format.

Written independently of adaprec.formats.quantize (no bit tricks): the grid
spacing of the binade is a power of two, so ``|x| / spacing`` is exact in
double precision and Python's ``round`` rounds half to even.
"""

from __future__ import annotations

import math

from adaprec.formats import Format


def spacing(a: float, f: Format) -> float:
    """Distance between neighbouring values of ``f`` around the magnitude ``a``."""
    if f.kind == "int":
        return f.scale
    e = math.frexp(a)[1] - 1 if a > 0 else f.emin
    return 2.0 ** (max(e, f.emin) - f.mbits)


def neighbours(x: float, f: Format) -> tuple[float, float]:
    """(largest grid value <= x, smallest grid value >= x), ignoring the range limit."""
    a = abs(x)
    q = spacing(a, f)
    lo = math.floor(a / q) * q
    hi = lo if lo == a else lo + q
    return (lo, hi) if x >= 0 else (-hi, -lo)


def nearest(x: float, f: Format, saturate: bool | None = None) -> float:
    """x rounded to nearest-even in ``f`` with the quantize() overflow rules."""
    if math.isnan(x):
        return x
    limit = f.max_finite
    if math.isinf(x):
        v = math.inf
    else:
        q = spacing(abs(x), f)
        v = round(abs(x) / q) * q
    if v > limit:
        if saturate or (saturate is None and not f.has_inf):
            v = limit
        elif f.has_inf:
            v = math.inf
        else:
            return math.nan
    return math.copysign(v, x)
