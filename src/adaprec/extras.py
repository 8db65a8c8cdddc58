"""Optional extras (loggers, trainers, model zoos): imported on use, or a clear error naming what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from adaprec.errors import MissingExtraError

__all__ = ["require"]


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or say which ``adaprec[extra]`` to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{what} needs the {extra!r} package, which cannot be imported ({e}); "
            f"install it with: pip install 'adaprec[{extra}]'"
        ) from None
