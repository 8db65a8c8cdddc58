"""Task registry: built-in tasks by name, user tasks by ``"module:function"``.

Built-in tasks load their data only when asked for, so listing names and
validating a config stay fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from adaprec.errors import TaskError
from adaprec.experiments.tasks.base import Task, TensorLoader

__all__ = ["Task", "TensorLoader", "get_task", "task_names", "resolve_entry_point"]

_BUILTIN: dict[str, str] = {
    "digits-cnn": "adaprec.experiments.tasks.digits",
    "mnist1d-cnn": "adaprec.experiments.tasks.mnist1d",
    "mnist-mlp": "adaprec.experiments.tasks.mnist_mlp",
    "char-transformer": "adaprec.experiments.tasks.char_transformer",
    "shakespeare-gpt": "adaprec.experiments.tasks.shakespeare_gpt",
}


def task_names() -> list[str]:
    """Names of the built-in tasks."""
    return list(_BUILTIN)


def resolve_entry_point(spec: str) -> Callable[[], Task]:
    """The function named by ``"package.module:function"``, imported but not called."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise TaskError(f"task entry point {spec!r} must look like 'package.module:function'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise TaskError(
            f"task entry point {spec!r}: cannot import module {mod_name!r} ({e}); "
            "make it importable (install it, or add its folder to PYTHONPATH)"
        ) from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise TaskError(f"task entry point {spec!r}: module {mod_name!r} has no function {fn_name!r}")
    return fn


def get_task(name: str) -> Task:
    """Build the task ``name``: a built-in name or a ``"module:function"`` returning a Task."""
    if ":" in name:
        task = resolve_entry_point(name)()
        if not isinstance(task, Task):
            raise TaskError(
                f"task entry point {name!r} returned {type(task).__name__}, not an "
                "adaprec.experiments.tasks.Task; build and return a Task"
            )
        return task
    if name not in _BUILTIN:
        raise TaskError(
            f"unknown task {name!r}; known tasks: {', '.join(_BUILTIN)}, or 'package.module:function' for your own"
        )
    return importlib.import_module(_BUILTIN[name]).make_task()
