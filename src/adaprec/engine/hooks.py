"""Module hooks that leave no trace of adaprec in copies of the model.

A hook registered on the user's model travels with it: ``copy.deepcopy(model)``
(an EMA copy, a reference model) would copy the hook's owner (the engine, its
plans, the ledger's books) and pickling would fail on it. :class:`WeakHook`
calls a method of its owner while the owner lives, and becomes a no-op in a
copy or a pickle: the copied model is plain PyTorch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["WeakHook"]


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _noop_hook() -> Callable[..., None]:
    return _noop


class WeakHook:
    """``method(*args)`` while its object lives; nothing in a deep copy or a pickle of the module."""

    __slots__ = ("_owner", "_func", "__weakref__")

    def __init__(self, method: Callable[..., Any]) -> None:
        # a weak reference to the owner and its plain function (torch.compile traces these; not WeakMethod)
        self._owner = weakref.ref(method.__self__)  # type: ignore[attr-defined]
        self._func = method.__func__  # type: ignore[attr-defined]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner()
        return None if owner is None else self._func(owner, *args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return _noop

    def __reduce__(self) -> tuple[Callable[[], Callable[..., None]], tuple[()]]:
        return _noop_hook, ()
