"""adaprec: adaptive precision training for PyTorch.

Per-layer number formats for weights, activations and gradients, decided
during training from measured numerical health, with an energy ledger that
says what the choice saved (modeled from a named device profile, or
measured where a meter exists).
"""

import importlib
from typing import Any

from adaprec import formats, plan
from adaprec.errors import AdaprecError
from adaprec.formats import quantize
from adaprec.plan import ModulePrecision, PrecisionPlan, TensorRecipe

__version__ = "0.1.0"
__all__ = [
    "AdaprecError",
    "AdaptivePrecision",
    "Explanation",
    "ModulePrecision",
    "PrecisionPlan",
    "StepResult",
    "TensorRecipe",
    "formats",
    "plan",
    "quantize",
    "explain",
    "simulate",
    "Simulation",
    "__version__",
]


# The controller, explain and simulation pull in every part: each is imported on first use only.
_LAZY = {
    "AdaptivePrecision": "adaprec.controller",
    "StepResult": "adaprec.controller",
    "explain": "adaprec.explainer",
    "Explanation": "adaprec.explainer",
    "simulate": "adaprec.explainer",
    "Simulation": "adaprec.simulation",
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'adaprec' has no attribute {name!r}")
    return getattr(importlib.import_module(where), name)
