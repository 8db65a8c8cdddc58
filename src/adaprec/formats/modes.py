"""The closed sets of how a tensor is cast: rounding and scaling modes.

String enums, so a plan written as JSON (``"stochastic"``, ``"row"``) and
code comparing with ``Rounding.STOCHASTIC`` agree; validation lives here,
once.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Rounding", "Scaling", "ROUNDING_MODES", "SCALINGS"]


class Rounding(StrEnum):
    """How a value between two representable ones is rounded."""

    NEAREST = "nearest"  # to nearest, ties to even
    STOCHASTIC = "stochastic"  # up with probability proportional to the distance (unbiased)


class Scaling(StrEnum):
    """Where a cast's scale comes from (see :class:`adaprec.plan.TensorRecipe`)."""

    NONE = "none"  # cast as is
    TENSOR = "tensor"  # one scale from this tensor's amax
    ROW = "row"  # a scale per row (every index but the last dimension's)
    DELAYED = "delayed"  # one scale from an amax history
    BLOCK = "block"  # MX: a power-of-two scale per block of the last dimension


ROUNDING_MODES: tuple[str, ...] = tuple(r.value for r in Rounding)
SCALINGS: tuple[str, ...] = tuple(s.value for s in Scaling)
