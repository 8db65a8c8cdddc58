"""fp8 Linear on tensor cores: ``torch._scaled_mm`` with power-of-two scales, all three GEMMs.

E4M3 forward, the plan's gradient format backward; per-tensor or row-wise
forward scales. Used where the device probe finds fp8 GEMMs fast (CUDA
sm_89+); int8 and bf16 run through :mod:`adaprec.engine.gemm`.
"""

from __future__ import annotations

import torch

from adaprec.formats import get
from adaprec.formats.scaling import pow2_scale
from adaprec.plan import ModulePrecision

__all__ = ["fp8_linear"]

_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _to_fp8(x: torch.Tensor, dtype: torch.dtype, rowwise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 copy of ``x`` and its power-of-two scale (one per tensor, or one per row)."""
    fmt = get("fp8_e4m3" if dtype == torch.float8_e4m3fn else "fp8_e5m2")
    amax = x.detach().abs().amax(dim=-1, keepdim=True) if rowwise else x.detach().abs().amax()
    scale = pow2_scale(amax.float(), fmt)
    xs = torch.clamp(x.float() * scale, -fmt.max_finite, fmt.max_finite)
    return xs.to(dtype), scale


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


class _Fp8Linear(torch.autograd.Function):
    """Three fp8 GEMMs. With row-wise forward scales, the scales of the operand
    that the backward GEMMs contract over are folded into the gradient before
    it is cast, so every ``_scaled_mm`` keeps scales on its outer dimensions."""

    @staticmethod
    def forward(ctx, x, weight, bias, grad_dtype, rowwise):  # type: ignore[override]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x8, sx = _to_fp8(x2, torch.float8_e4m3fn, rowwise)
        w8, sw = _to_fp8(weight, torch.float8_e4m3fn, rowwise)
        out = torch._scaled_mm(
            x8, _col_major(w8.t()), scale_a=(1.0 / sx), scale_b=(1.0 / sw).reshape(1, -1) if rowwise else 1.0 / sw,
            out_dtype=torch.float32,
        )
        if bias is not None:
            out = out + bias.float()
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.shape = shape
        ctx.grad_dtype = grad_dtype
        ctx.has_bias = bias is not None
        ctx.rowwise = rowwise
        return out.reshape(*shape[:-1], weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x8, sx, w8, sw = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).float()
        one = torch.ones((), dtype=torch.float32, device=g2.device)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # dgrad = g @ W, W = w8 / sw: contraction over output features
            gx = g2 / sw.reshape(1, -1) if ctx.rowwise else g2
            g8, sg = _to_fp8(gx, ctx.grad_dtype)
            grad_x = torch._scaled_mm(
                g8, _col_major(w8), scale_a=(1.0 / sg), scale_b=one if ctx.rowwise else 1.0 / sw,
                out_dtype=torch.float32,
            ).reshape(ctx.shape)
        if ctx.needs_input_grad[1]:
            # wgrad = g^T @ X, X = x8 / sx: contraction over tokens
            gw = g2 / sx if ctx.rowwise else g2
            g8, sg = _to_fp8(gw, ctx.grad_dtype)
            grad_w = torch._scaled_mm(
                g8.t().contiguous(), _col_major(x8), scale_a=(1.0 / sg), scale_b=one if ctx.rowwise else 1.0 / sx,
                out_dtype=torch.float32,
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.float().sum(0)
        return grad_x, grad_w, grad_b, None, None


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mp: ModulePrecision
) -> torch.Tensor:
    """Linear layer on fp8 tensor cores (``torch._scaled_mm``), per-tensor scaled."""
    return _Fp8Linear.apply(x, weight, bias, _FP8[mp.grad_output.format], mp.weight.scaling == "row")
