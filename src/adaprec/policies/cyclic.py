"""Cyclic precision (CPT, Fu et al., ICLR 2021): forward bit-width swings between bmin and bmax.

Low precision early in each cycle acts like a large learning rate
(exploration); the ramp back to bmax lets the model settle. Gradients
(errors) stay at a fixed width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from adaprec.errors import PolicyError
from adaprec.monitor.snapshot import Snapshot
from adaprec.plan import PrecisionPlan
from adaprec.policies.base import Policy, _check_keys
from adaprec.policies.ladder import fixed_point_module

__all__ = ["CyclicPolicy", "cyclic_bits", "PROFILES"]


def _cosine(u: float) -> float:
    return 0.5 * (1.0 - math.cos(math.pi * u))


def _linear(u: float) -> float:
    return u


def _exponential(u: float) -> float:
    return (math.exp(3.0 * u) - 1.0) / (math.exp(3.0) - 1.0)


PROFILES = {"cosine": _cosine, "linear": _linear, "exponential": _exponential}


def cyclic_bits(
    t: int,
    period: float,
    bmin: int = 3,
    bmax: int = 8,
    profile: str = "cosine",
    direction: str = "grow",
) -> int:
    """Forward bit-width at step ``t``.

    With ``u = (t mod period) / period``, cosine growth is CPT's
    ``bmin + (bmax - bmin)/2 * (1 - cos(pi * u))``; ``linear`` uses ``u``,
    ``exponential`` ``(e^{3u} - 1)/(e^3 - 1)``; ``direction="decay"`` runs
    each cycle from bmax down (``u -> 1 - u``). Rounded half up.
    """
    u = (t % period) / period
    if direction == "decay":
        u = 1.0 - u
    v = bmin + (bmax - bmin) * PROFILES[profile](u)
    return int(math.floor(v + 0.5))


class CyclicPolicy(Policy):
    """CPT: ``int{b_t}`` weights and activations (per-tensor scaled), errors fixed at ``grad_bits``.

    Args:
        num_cycles: cycles over the run; the period is ``total_steps / num_cycles``.
        bmin, bmax: forward bit-width range (2..16).
        grad_bits: fixed width of grad_output (stochastic rounding, per-tensor scale).
        grad_weight: format of the weight gradient. ``fp32`` by default: the
            weight-gradient GEMM consumes 8-bit errors and 8-bit-or-less
            activations, and its output is accumulated at full precision, as
            in CPT where only GEMM inputs are quantized.
        profile: ``cosine`` (CPT), ``linear`` or ``exponential``.
        direction: ``grow`` (bmin -> bmax in each cycle, CPT) or ``decay``.
        period: steps per cycle; overrides ``num_cycles`` (needed when the
            controller does not know ``total_steps``).
    """

    name = "cyclic"

    def __init__(
        self,
        num_cycles: int = 32,
        bmin: int = 3,
        bmax: int = 8,
        grad_bits: int = 8,
        grad_weight: str = "fp32",
        profile: str = "cosine",
        direction: str = "grow",
        period: float | None = None,
    ) -> None:
        super().__init__()
        for key, v in (("num_cycles", num_cycles), ("bmin", bmin), ("bmax", bmax), ("grad_bits", grad_bits)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PolicyError(f"cyclic policy: {key} must be a positive int, got {v!r}")
        if not 2 <= bmin <= bmax <= 16:
            raise PolicyError(f"cyclic policy: need 2 <= bmin <= bmax <= 16, got bmin={bmin}, bmax={bmax}")
        if not 2 <= grad_bits <= 16:
            raise PolicyError(f"cyclic policy: grad_bits must be in 2..16, got {grad_bits}")
        if profile not in PROFILES:
            raise PolicyError(f"cyclic policy: unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
        if direction not in ("grow", "decay"):
            raise PolicyError(f"cyclic policy: direction must be 'grow' or 'decay', got {direction!r}")
        if period is not None and (not isinstance(period, (int, float)) or period <= 0):
            raise PolicyError(f"cyclic policy: period must be a positive number of steps, got {period!r}")
        self.num_cycles = num_cycles
        self.bmin, self.bmax, self.grad_bits = bmin, bmax, grad_bits
        self.grad_weight = grad_weight
        self.profile, self.direction = profile, direction
        self.period: float | None = float(period) if period is not None else None
        try:
            fixed_point_module(bmin, grad_bits, grad_weight)
        except Exception as e:  # PlanError for a bad grad_weight format
            raise PolicyError(f"cyclic policy: {e}") from None

    def initial_plan(self, template: PrecisionPlan) -> PrecisionPlan:
        if self.period is None:
            if not self.total_steps:
                raise PolicyError(
                    "cyclic policy needs the run length: pass total_steps to AdaptivePrecision "
                    "(or give the policy period=STEPS_PER_CYCLE)"
                )
            self.period = self.total_steps / self.num_cycles
        return self._plan_for(template, self.bits_at(0))

    def bits_at(self, step: int) -> int:
        if self.period is None:
            raise PolicyError("cyclic policy: call setup() first (it fixes the cycle period)")
        return cyclic_bits(step, self.period, self.bmin, self.bmax, self.profile, self.direction)

    def _plan_for(self, template: PrecisionPlan, bits: int) -> PrecisionPlan:
        mp = fixed_point_module(bits, self.grad_bits, self.grad_weight)
        return template.map(lambda _n, _old: mp)

    def decide(self, snapshot: Snapshot, step: int) -> PrecisionPlan:
        template = self._template()
        b = self.bits_at(step)
        plan = self._plan_for(template, b)
        self._explain(
            snapshot.plan, plan,
            f"cyclic {self.profile}: step {step} of period {self.period:g} -> {b} bits (range {self.bmin}..{self.bmax})",
        )
        return plan

    def state_dict(self) -> dict[str, Any]:
        return {"period": self.period}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        super().load_state_dict(d)
        _check_keys(d, ["period"], self.name)
        self.period = None if d["period"] is None else float(d["period"])
