"""Autograd functions that place quantization on both sides of an op.

Wrapping an op's operands and output this way makes autograd run all three
GEMMs of a matmul layer in the planned formats with no custom backward per
op:

* ``cast_operand(w)``: forward uses the quantized weight; its gradient
  (the weight-gradient GEMM's result) is quantized by the ``grad_weight``
  recipe on the way back.
* ``cast_operand(x)``: forward uses the quantized activation; the gradient
  passes straight through (the previous layer quantizes it as its own
  output gradient).
* ``cast_grad(y)``: identity forward; the output gradient is quantized
  before the input-gradient and weight-gradient GEMMs read it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._functorch import utils as _functorch_utils

Cast = Callable[[torch.Tensor], torch.Tensor]
Observer = Callable[[torch.Tensor], None] | None

__all__ = ["cast_operand", "cast_grad", "on_backward"]


class _Fast(torch.autograd.Function):
    """A functorch-style function whose ``apply`` skips torch's per-call ``inspect.signature`` binding outside
    torch.func transforms: ours take every argument positionally and have no defaults to bind, and that
    binding cost about 45 us per call (a tenth of adaprec's per-layer cost on a small model, cProfile)."""

    @classmethod
    def apply(cls, *args, **kwargs):  # type: ignore[override]
        if kwargs or torch._C._are_functorch_transforms_active():
            return super().apply(*args, **kwargs)
        return super(torch.autograd.Function, cls).apply(*_functorch_utils.unwrap_dead_wrappers(args))


# functorch style (forward without ctx, setup_context): torch.func transforms (vmap, jacrev) can run them
class _CastOperand(_Fast):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, fwd: Cast, bwd: Cast | None, observe_bwd: Observer):  # type: ignore[override]
        y = fwd(x).to(x.dtype)
        return x.view_as(x) if y is x else y

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.bwd, ctx.observe_bwd = inputs[2], inputs[3]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if ctx.observe_bwd is not None:
            ctx.observe_bwd(grad)
        if ctx.bwd is not None:
            grad = ctx.bwd(grad).to(grad.dtype)
        return grad, None, None, None


class _OnBackward(_Fast):
    """Identity forward; in backward the gradient passes through ``hook`` (which may cast, observe or record)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(y: torch.Tensor, hook: Cast):  # type: ignore[override]
        return y.view_as(y)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.hook = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.hook(grad), None


def on_backward(y: torch.Tensor, hook: Cast) -> torch.Tensor:
    """``y`` unchanged; ``hook(grad)`` is what flows back into it (run exactly when that gradient is computed)."""
    return _OnBackward.apply(y, hook)


def cast_operand(x: torch.Tensor, fwd: Cast, bwd: Cast | None = None, observe_bwd: Observer = None) -> torch.Tensor:
    """Quantize ``x`` for the forward op; optionally quantize its gradient."""
    if not x.requires_grad:
        return fwd(x).to(x.dtype)
    return _CastOperand.apply(x, fwd, bwd, observe_bwd)


def cast_grad(y: torch.Tensor, bwd: Cast, observe_bwd: Observer = None) -> torch.Tensor:
    """Identity forward; quantize the gradient that flows back into ``y``."""
    if not y.requires_grad:
        return y

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if observe_bwd is not None:
            observe_bwd(grad)
        return bwd(grad).to(grad.dtype)

    return _OnBackward.apply(y, hook)
