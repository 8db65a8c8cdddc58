"""Precision switching on gradient diversity (MuPPET, Rajagopal et al., ICML 2020).

Gradient diversity ``sum_i ||g_i||^2 / ||sum_i g_i||^2`` over recent
minibatches falls when minibatch gradients stop agreeing with each other
less than quantization noise lets them, i.e. when the current precision
no longer carries useful information; then precision goes up one rung.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from adaprec.errors import PlanError, PolicyError
from adaprec.monitor.snapshot import Snapshot
from adaprec.plan import PRESETS, ModulePrecision, PrecisionPlan, TensorRecipe
from adaprec.policies.base import RungPolicy, _check_keys
from adaprec.policies.ladder import fixed_point_module

__all__ = ["GradientDiversityPolicy", "muppet_threshold", "muppet_violation", "muppet_switch_epochs"]


def muppet_threshold(epoch: int, alpha: float = 1.0, beta: float = 1.5, lam: float = 0.1) -> float:
    """The ratio above which a check counts as a violation: ``alpha + beta * exp(-lam * epoch)``."""
    return alpha + beta * math.exp(-lam * epoch)


def muppet_violation(
    history: Sequence[float], current: float, epoch: int, alpha: float = 1.0, beta: float = 1.5, lam: float = 0.1
) -> tuple[bool, float]:
    """(violated, ratio) with ratio = max(history + [current]) / current.

    ``history``: diversities measured earlier at the current precision.
    """
    if current <= 0 or not math.isfinite(current):
        return False, math.nan
    ratio = max([*history, current]) / current
    return ratio > muppet_threshold(epoch, alpha, beta, lam), ratio


def muppet_switch_epochs(
    checks: Sequence[tuple[int, float]],
    patience: int = 2,
    rungs: int = 5,
    alpha: float = 1.0,
    beta: float = 1.5,
    lam: float = 0.1,
) -> list[int]:
    """Epochs at which MuPPET switches, given the (epoch, diversity) of every check in order.

    A switch happens at the check that brings the violation count at the
    current rung to ``patience``; history and count then reset. At most
    ``rungs - 1`` switches.
    """
    switches: list[int] = []
    history: list[float] = []
    violations = 0
    for epoch, div in checks:
        if len(switches) >= rungs - 1:
            break
        violated, _ = muppet_violation(history, div, epoch, alpha, beta, lam)
        history.append(div)
        violations += violated
        if violations >= patience:
            switches.append(epoch)
            history, violations = [], 0
    return switches


class GradientDiversityPolicy(RungPolicy):
    """MuPPET: fixed point 8, 12, 14, 16 bits, then fp32; a check every ``every_epochs`` epochs.

    At each check (epoch ``j``, a multiple of ``every_epochs``), the model's
    gradient diversity ``s(j)`` (from the monitor, pooled over modules) is
    compared with the running maximum at this rung: ``p = max(S)/s(j)``; a
    violation when ``p > alpha + beta * exp(-lam * j)`` (defaults 1, 1.5,
    0.1); ``patience`` (2) violations switch to the next rung. Weights,
    activations and errors use the rung's width (errors with stochastic
    rounding), all per-tensor scaled; weight gradients stay fp32.
    """

    name = "gradient-diversity"

    def __init__(
        self,
        bits: Sequence[int] = (8, 12, 14, 16),
        every_epochs: int = 3,
        patience: int = 2,
        alpha: float = 1.0,
        beta: float = 1.5,
        lam: float = 0.1,
        final: str = "fp32",
    ) -> None:
        super().__init__()
        if not bits:
            raise PolicyError("gradient-diversity policy: bits needs at least one width")
        for b in bits:
            if not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 24:
                raise PolicyError(f"gradient-diversity policy: bit-widths must be ints in 2..24, got {b!r}")
        if not isinstance(every_epochs, int) or every_epochs < 1:
            raise PolicyError(f"gradient-diversity policy: every_epochs must be a positive int, got {every_epochs!r}")
        if not isinstance(patience, int) or patience < 1:
            raise PolicyError(f"gradient-diversity policy: patience must be a positive int, got {patience!r}")
        try:
            rungs: list[ModulePrecision] = [fixed_point_module(b, b) for b in bits]
            if final in PRESETS:
                rungs.append(PRESETS[final])
            else:
                r = TensorRecipe(final)
                rungs.append(ModulePrecision(weight=r, activation=r, grad_output=r, grad_weight=r))
        except PlanError as e:
            raise PolicyError(f"gradient-diversity policy: {e}") from None
        self.rungs = rungs
        self.labels = [f"int{b}" for b in bits] + [final]
        self.every_epochs, self.patience = every_epochs, patience
        self.alpha, self.beta, self.lam = float(alpha), float(beta), float(lam)
        self.rung = 0
        self.history: list[float] = []
        self.violations = 0
        self.last_check_epoch = 0
        self.switch_epochs: list[int] = []

    @staticmethod
    def _diversity(snapshot: Snapshot) -> float | None:
        if snapshot.model_grad_diversity is not None:
            return snapshot.model_grad_diversity
        vals = list(snapshot.grad_diversity.values())
        return sum(vals) / len(vals) if vals else None

    def decide(self, snapshot: Snapshot, step: int) -> PrecisionPlan:
        template = self._template()
        j = snapshot.epoch
        reason = ""
        due = j > self.last_check_epoch and j % self.every_epochs == 0
        div = self._diversity(snapshot) if due else None
        if due and div is not None and self.rung < len(self.rungs) - 1:
            self.last_check_epoch = j
            violated, ratio = muppet_violation(self.history, div, j, self.alpha, self.beta, self.lam)
            self.history.append(div)
            self.violations += violated
            if self.violations >= self.patience:
                self.rung += 1
                self.switch_epochs.append(j)
                self.history, self.violations = [], 0
                reason = (f"gradient diversity {div:.4g} at epoch {j}: max/current = {ratio:.3f} > "
                          f"{muppet_threshold(j, self.alpha, self.beta, self.lam):.3f}, "
                          f"{self.patience} violations -> {self.labels[self.rung]}")
        plan = self._plan(template)
        self._explain(snapshot.plan, plan, reason or f"gradient-diversity rung {self.labels[self.rung]}")
        return plan

    def state_dict(self) -> dict[str, Any]:
        return {"rung": self.rung, "history": list(self.history), "violations": self.violations,
                "last_check_epoch": self.last_check_epoch, "switch_epochs": list(self.switch_epochs)}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        super().load_state_dict(d)
        _check_keys(d, ["rung", "history", "violations", "last_check_epoch", "switch_epochs"], self.name)
        self.rung = int(d["rung"])
        self.history = [float(v) for v in d["history"]]
        self.violations = int(d["violations"])
        self.last_check_epoch = int(d["last_check_epoch"])
        self.switch_epochs = [int(e) for e in d["switch_epochs"]]
