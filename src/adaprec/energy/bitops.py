"""BitOPs: the hardware-neutral cost measure of the low-precision training papers.

For every GEMM that ran, MACs x bits(operand a) x bits(operand b), summed
over the forward, input-gradient and weight-gradient GEMMs, as CPT and
FracTrain count it. Operand bits are the widths of the plan's formats for the
operand roles (tf32 counts 19 bits, the width its multipliers see).
"""

from __future__ import annotations

from adaprec.energy.counting import StepCost
from adaprec.formats import get
from adaprec.plan import ModulePrecision, PrecisionPlan

__all__ = ["bitops", "operand_format"]


def operand_format(mp: ModulePrecision, role: str) -> str:
    """The format name an operand role is cast to under ``mp``."""
    return mp.recipe(role).format


def bitops(cost: StepCost, plan: PrecisionPlan) -> int:
    """Sum of MACs x bits(a) x bits(b) over every GEMM in ``cost`` under ``plan``."""
    total = 0
    for name, mc in cost.modules.items():
        mp = plan.get(name)
        for g in mc.gemms:
            total += g.macs * get(operand_format(mp, g.a_role)).bits * get(operand_format(mp, g.b_role)).bits
    return total
