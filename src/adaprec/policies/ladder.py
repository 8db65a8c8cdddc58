"""Shared helpers: recipes for a format, one rung wider, fixed-point module precisions.

Kept apart so every policy and the guard agree on what "one rung wider" and
"the recipe for fp8" mean.
"""

from __future__ import annotations

from adaprec.formats import Rounding, Scaling, get
from adaprec.monitor.stats import candidate_scaling
from adaprec.plan import ROLES, ModulePrecision, TensorRecipe

__all__ = ["recipe_for", "widen_recipe", "widen_module", "fixed_point_module", "GRAD_ROLES"]

GRAD_ROLES = ("grad_output", "grad_weight")


def recipe_for(fmt: str, role: str, current: TensorRecipe | None = None) -> TensorRecipe:
    """The recipe a policy assigns when it puts ``role`` in ``fmt``.

    Scaling follows :func:`adaprec.monitor.stats.candidate_scaling` (what the
    monitor measured the format under); gradients narrower than 16 bits
    round stochastically (unbiased), everything else to nearest.
    """
    name = get(fmt).name
    cur_scaling = current.scaling if current is not None else "none"
    scaling = candidate_scaling(name, cur_scaling)
    narrow = get(name).bits < 16
    rounding = Rounding.STOCHASTIC if (role in GRAD_ROLES and narrow) else Rounding.NEAREST
    block = current.block_size if current is not None else 32
    return TensorRecipe(name, rounding=rounding, scaling=scaling, block_size=block)


def widen_recipe(recipe: TensorRecipe, role: str) -> TensorRecipe | None:
    """One rung wider, or None when already fp32.

    Floats: below 16 bits -> bf16; 16-bit and tf32 -> fp32. Fixed point:
    below 8 bits -> int8, below 16 -> int16, int16 and wider -> fp32.
    """
    f = get(recipe.format)
    if f.name == "fp32":
        return None
    if f.kind == "int":
        if f.bits < 8:
            return TensorRecipe("int8", rounding=recipe.rounding, scaling=recipe.scaling, block_size=recipe.block_size)
        if f.bits < 16:
            return TensorRecipe("int16", rounding=recipe.rounding, scaling=recipe.scaling, block_size=recipe.block_size)
        return TensorRecipe("fp32")
    if f.bits < 16:
        return recipe_for("bf16", role)
    return TensorRecipe("fp32")


def widen_module(mp: ModulePrecision, allowed: frozenset[str] | None = None) -> ModulePrecision | None:
    """Every role of ``mp`` one rung wider; None when all four are fp32 already.

    With ``allowed`` (the formats this device runs natively for the module),
    a rung this device cannot run is skipped to the next one it can.
    """
    if mp.is_fp32:
        return None
    for role in ROLES:
        wider = widen_recipe(mp.recipe(role), role)
        while wider is not None and allowed is not None and wider.format not in allowed and not wider.is_fp32:
            wider = widen_recipe(wider, role)
        if wider is not None:
            mp = mp.with_role(role, wider)
    return mp


def fixed_point_module(fwd_bits: int, bwd_bits: int | None, grad_weight: str = "fp32") -> ModulePrecision:
    """Weights and activations in ``int{fwd_bits}``, errors in ``int{bwd_bits}``, all per-tensor scaled.

    ``bwd_bits=None`` keeps grad_output in fp32. Errors round stochastically
    (as CPT, FracTrain and MuPPET do for gradients).
    """
    fwd = TensorRecipe(f"int{fwd_bits}", scaling="tensor")
    if bwd_bits is None:
        go = TensorRecipe("fp32")
    else:
        go = TensorRecipe(f"int{bwd_bits}", rounding=Rounding.STOCHASTIC, scaling=Scaling.TENSOR)
    gw = recipe_for(grad_weight, "grad_weight")
    return ModulePrecision(weight=fwd, activation=fwd, grad_output=go, grad_weight=gw)
