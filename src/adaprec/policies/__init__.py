"""Precision policies: pure decisions from monitor snapshots to precision plans."""

from adaprec.policies.base import Policy
from adaprec.policies.cyclic import CyclicPolicy, cyclic_bits
from adaprec.policies.error_budget import DEFAULT_LADDERS, DEFAULT_TARGETS, ErrorBudgetPolicy
from adaprec.policies.gradient_diversity import (
    GradientDiversityPolicy,
    muppet_switch_epochs,
    muppet_threshold,
    muppet_violation,
)
from adaprec.policies.guard import Guard
from adaprec.policies.progressive import ProgressivePolicy, pfq_plateau, pfq_switch_epochs
from adaprec.policies.registry import POLICIES, build, names, with_guard
from adaprec.policies.replay import ReplayPolicy
from adaprec.policies.schedule import SchedulePolicy
from adaprec.policies.static import StaticPolicy

__all__ = [
    "Policy",
    "StaticPolicy",
    "SchedulePolicy",
    "CyclicPolicy",
    "ProgressivePolicy",
    "GradientDiversityPolicy",
    "ErrorBudgetPolicy",
    "Guard",
    "ReplayPolicy",
    "POLICIES",
    "DEFAULT_LADDERS",
    "DEFAULT_TARGETS",
    "build",
    "names",
    "with_guard",
    "cyclic_bits",
    "pfq_plateau",
    "pfq_switch_epochs",
    "muppet_threshold",
    "muppet_violation",
    "muppet_switch_epochs",
]
