"""Bridges to the tools users already run: experiment loggers and trainer callbacks.

Each module imports its third-party package lazily, so adaprec itself never
needs them; installing the matching extra makes the bridge usable.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module; resolved on first use, so importing this package imports no bridge
_LAZY = {
    "ExperimentLogger": "adaprec.integrations.logging",
    "RunLoggers": "adaprec.integrations.logging",
    "TensorBoardLogger": "adaprec.integrations.tensorboard",
    "MlflowLogger": "adaprec.integrations.mlflow",
    "AdaptivePrecisionPlugin": "adaprec.integrations.lightning",
    "AdaptivePrecisionCallback": "adaprec.integrations.lightning",
    "AdaptivePrecisionTrainer": "adaprec.integrations.huggingface",
    "AdaptivePrecisionMixin": "adaprec.integrations.huggingface",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
