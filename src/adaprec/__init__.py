"""adaprec: adaptive precision training for PyTorch.

Per-layer number formats for weights, activations and gradients, decided
during training from measured numerical health, with an energy ledger that
says what the choice saved (modeled from a named device profile, or
measured where a meter exists).
"""

from typing import Any

from adaprec import formats, plan
from adaprec.errors import AdaprecError
from adaprec.explain import Explanation, explain  # light: its heavy imports wait for the first call
from adaprec.formats import quantize
from adaprec.plan import ModulePrecision, PrecisionPlan, TensorRecipe
from adaprec.simulation import Simulation, simulate  # light, as explain

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


def __getattr__(name: str) -> Any:
    # The controller pulls in every part; import it on first use only.
    if name in ("AdaptivePrecision", "StepResult"):
        from adaprec import controller

        return getattr(controller, name)
    raise AttributeError(f"module 'adaprec' has no attribute {name!r}")
