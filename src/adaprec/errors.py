"""Errors a user can cause. Each names the problem and the fix.

All derive from :class:`AdaprecError`, so ``except adaprec.AdaprecError``
catches every mistake adaprec reports, and nothing else.
"""

from __future__ import annotations


class AdaprecError(Exception):
    """Base class of every error adaprec raises for a user mistake."""


class UnknownFormatError(AdaprecError, KeyError):
    """A number format name that the registry does not know."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class FormatSpecError(AdaprecError, ValueError):
    """A format spelled in a recognised pattern but with impossible widths."""


class RoundingError(AdaprecError, ValueError):
    """An unknown rounding mode, or a stochastic rounding seed that is not an int."""


class PlanError(AdaprecError, ValueError):
    """A precision plan that cannot be built, parsed or applied."""


class ModuleNotSupportedError(AdaprecError, TypeError):
    """A module that the engine cannot quantize was pinned to a narrow format."""


class PolicyError(AdaprecError, ValueError):
    """A policy name or policy arguments that do not make sense."""


class TrainingUnstableError(AdaprecError, RuntimeError):
    """Training produced inf/NaN even with every module in fp32; nothing more to raise."""


class SavedTensorModifiedError(AdaprecError, RuntimeError):
    """A tensor saved for backward was modified in place before backward read it (PyTorch raises the same)."""


class UsageError(AdaprecError, RuntimeError):
    """Methods called in the wrong order (e.g. ``step()`` before ``backward()``)."""


class CheckpointError(AdaprecError, ValueError):
    """A checkpoint or state dict that is missing keys, corrupt, or from another model."""


class ConfigError(AdaprecError, ValueError):
    """An experiment config that fails validation."""


class ProfileError(AdaprecError, ValueError):
    """An energy device profile that is missing or malformed."""


class TaskError(AdaprecError, ValueError):
    """An unknown experiment task, or a user task entry point that cannot be loaded."""


class MissingExtraError(AdaprecError, ImportError):
    """An optional feature whose third-party package is not installed; names the extra that installs it."""


class RunDirError(ConfigError):
    """A run directory that cannot be used: ``--out`` names a file, or ``--resume`` of nothing to resume."""


class StoreError(AdaprecError, RuntimeError):
    """A result store that cannot be opened or written (not a database, read-only, disk full)."""


class StoreLockedError(StoreError):
    """A run directory whose result store another live process is writing; names that process."""


class OptimizerStateError(AdaprecError, ValueError):
    """An optimizer, option or parameter whose state adaprec cannot keep narrow; names what is supported."""
