"""Apply one TensorRecipe to one tensor: format, rounding and scaling.

The engine owns one :class:`RecipeCaster` per (module, role) so that delayed
scaling keeps its amax history where the tensor lives. Scales are powers of
two, so scaling itself adds no rounding error.
"""

from __future__ import annotations

from typing import Any

import torch

from adaprec.formats import get, quantize
from adaprec.formats.scaling import pow2_scale
from adaprec.plan import TensorRecipe

__all__ = ["RecipeCaster", "stream_seed", "fast_quantize"]

_NATIVE_FLOAT = (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)


def fast_quantize(x: torch.Tensor, fmt, rounding: str, seed: int, saturate: bool | None = None) -> torch.Tensor:
    """``quantize`` with torch's own cast for nearest rounding where a dtype exists.

    The round trip through the native dtype is bit-identical to
    :func:`adaprec.quantize` (property-tested), and one fused kernel instead
    of a dozen elementwise passes: this is the engine's hot path.
    """
    dtype = fmt.torch_dtype
    if rounding == "nearest" and dtype in _NATIVE_FLOAT and (saturate is None or (saturate and fmt.has_inf) or (saturate and dtype == torch.float8_e4m3fn)):
        x32 = x.detach().float()
        if saturate and fmt.has_inf:
            x32 = torch.clamp(x32, -fmt.max_finite, fmt.max_finite)
        return x32.to(dtype).float()
    return quantize(x, fmt, rounding, seed=seed, saturate=saturate)

_MASK31 = 0x7FFFFFFF


def stream_seed(*parts: int) -> int:
    """Mix integers into one 31-bit seed (deterministic, platform independent)."""
    h = 0x345678
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 0x01000193 + 0x9E37) & 0xFFFFFFFF
        h ^= h >> 13
    return h & _MASK31


class RecipeCaster:
    """Casts tensors by one recipe; holds the delayed-scaling amax history."""

    def __init__(self, history: int = 16) -> None:
        self.history_len = history
        self.amax_history: list[torch.Tensor] = []
        self.last_scale: torch.Tensor | float = 1.0
        # the amax of the last scaled cast, for the engine's inf/NaN check (a saturating cast hides them)
        self.last_amax: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, recipe: TensorRecipe, seed: int) -> torch.Tensor:
        if recipe.is_fp32:
            return x
        fmt = get(recipe.format)
        rounding = recipe.rounding
        if recipe.scaling == "none":
            return fast_quantize(x, fmt, rounding, seed)
        if recipe.scaling == "block":
            from adaprec.formats.scaling import quantize_mx

            return quantize_mx(x, fmt, block_size=recipe.block_size, rounding=rounding, seed=seed)
        if recipe.scaling == "row":
            row_amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
            self.last_amax = row_amax.amax()
            scale = pow2_scale(row_amax, fmt)
            return fast_quantize(x.float() * scale, fmt, rounding, seed, saturate=True) / scale
        amax = x.detach().abs().amax().float()
        self.last_amax = amax
        if recipe.scaling == "tensor":
            scale = pow2_scale(amax, fmt)
        else:  # delayed: scale from the history before this tensor, then remember it (no host sync)
            past = torch.stack(self.amax_history).amax() if self.amax_history else amax
            scale = pow2_scale(past, fmt)
            finite = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
            self.amax_history = (self.amax_history + [finite])[-self.history_len :]
        self.last_scale = scale
        return fast_quantize(x.float() * scale, fmt, rounding, seed, saturate=True) / scale

    def state_dict(self) -> dict[str, Any]:
        return {"history_len": self.history_len, "amax_history": [float(a) for a in self.amax_history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history_len = int(state["history_len"])
        self.amax_history = [torch.tensor(float(v)) for v in state["amax_history"]]
