"""One autograd function that runs the three GEMMs of a linear-like op, each in its planned format.

``Y = X W^T + b`` (``F.linear``; ``torch.addmm`` of HF ``Conv1D`` and
``x @ W`` with a parameter ``W`` are brought to this form by a transposed
view) runs three GEMMs:

============  =================  ==========================
GEMM          operands (roles)   contraction
============  =================  ==========================
forward       X x W^T            in-features  (K)
input grad    G x W              out-features (N)
weight grad   G^T x X            tokens       (M)
============  =================  ==========================

Each operand is cast by its role's :class:`RoleCast`: ``fp32``; ``bf16`` /
``fp16`` (a native copy); ``int8`` (codes with a power-of-two scale: one per
tensor, cast once and shared by both GEMMs that read it, or ``row``: one per
outer index of each GEMM, so each operand is cast along that GEMM's
contraction, as SwitchBack and torchao's int8 training do); or ``emulate``
(any other format: rounded in fp32 by the research-mode caster). A GEMM whose
two operands are int8 runs ``torch._int_mm`` (int32 accumulation) when
``int8_native``, otherwise the same codes are multiplied in fp32 (the
emulation the native kernel is tested against); a GEMM with a 16-bit operand
runs in that dtype (int8 codes dequantize into bf16 exactly); anything else
runs in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from adaprec.engine.quant import Int8Operand, NoiseTable, Scratch, quantize_int8
from adaprec.formats import FLOAT16_DTYPES, Rounding, wider
from adaprec.plan import TensorRecipe

__all__ = ["RoleCast", "LinearExec", "GemmContext", "planned_linear", "planned_gemm", "gemm_format"]



@dataclass(frozen=True)
class RoleCast:
    """How one operand role is cast for a native GEMM."""

    kind: str  # fp32 | bf16 | fp16 | int8 | emulate
    recipe: TensorRecipe
    per_gemm: bool = False  # int8 with a scale per outer index of each GEMM ("row")

    @property
    def stochastic(self) -> bool:
        return self.recipe.rounding == Rounding.STOCHASTIC


def gemm_format(a: RoleCast, b: RoleCast, int8_native: bool) -> tuple[str, bool]:
    """The format one GEMM executes in, and whether natively (the wider operand's format)."""
    fa, fb = a.recipe.format, b.recipe.format
    fmt = wider(fa, fb)
    if fmt == "fp32":
        return "fp32", True
    if a.kind == b.kind == "int8":
        return "int8", int8_native
    kinds = {a.kind, b.kind}
    if fmt in FLOAT16_DTYPES and kinds <= {"int8", "bf16", "fp16"}:
        return fmt, True
    return fmt, False


@dataclass(frozen=True)
class LinearExec:
    """The casts of a linear-like op's roles and which GEMM kernels may run natively."""

    activation: RoleCast
    weight: RoleCast
    grad_output: RoleCast
    grad_weight: TensorRecipe
    int8_native: bool
    out_dtype: torch.dtype | None = None  # the output's dtype (the plan's 16-bit ``output``); None: the input's

    def formats(self) -> dict[str, tuple[str, bool]]:
        """Per GEMM (forward, input_grad, weight_grad): (executed format, native)."""
        return {
            "forward": gemm_format(self.activation, self.weight, self.int8_native),
            "input_grad": gemm_format(self.grad_output, self.weight, self.int8_native),
            "weight_grad": gemm_format(self.grad_output, self.activation, self.int8_native),
        }


@dataclass
class GemmContext:
    """What the kernel needs from the engine for one call (no reference back to the engine)."""

    module: str
    scratch: Scratch
    noise: NoiseTable
    offsets: dict[str, Any]  # per role: the stochastic-rounding noise offset of this call (int, or a tensor in a graph)
    emulate: Callable[[str, torch.Tensor], torch.Tensor]  # role, tensor -> tensor rounded by the recipe
    observe: Callable[[str, torch.Tensor], None] | None  # role, fp32 tensor (sampled steps)
    fault: Callable[[str, Any], None]  # role, amax: a non-finite value met a cast
    weight_cache: dict[Any, Any]


# --- operand preparation ---------------------------------------------------------------
class _Operand:
    """One cast operand as a GEMM reads it: int8 codes or a float tensor, possibly transposed."""

    __slots__ = ("int8", "t")

    def __init__(self, int8: Int8Operand | None, t: torch.Tensor | None) -> None:
        self.int8, self.t = int8, t


def _int8(x: torch.Tensor, rc: RoleCast, dim: int | None, ctx: GemmContext, role: str) -> Int8Operand:
    q = quantize_int8(x, dim if rc.per_gemm else None, rc.stochastic, ctx.scratch, ctx.noise, ctx.offsets.get(role, 0))
    a = q.amax
    if torch.compiler.is_compiling():  # no side effects in a graph: the step's gradient check catches it
        return q
    if isinstance(a, float):
        if not (a < float("inf")):  # inf or NaN
            ctx.fault(role, a)
    else:
        ctx.fault(role, a)  # a tensor: the engine folds it into a device flag without a sync
    return q


def _cast(x: torch.Tensor, rc: RoleCast, dim: int | None, ctx: GemmContext, role: str) -> _Operand:
    if rc.kind == "int8":
        return _Operand(_int8(x, rc, dim, ctx, role), None)
    if rc.kind in FLOAT16_DTYPES:
        return _Operand(None, x.to(FLOAT16_DTYPES[rc.kind]))
    if rc.kind == "emulate":
        return _Operand(None, ctx.emulate(role, x))
    return _Operand(None, x)


def _weight(w: torch.Tensor, rc: RoleCast, dim: int | None, ctx: GemmContext) -> _Operand:
    """The weight's cast, cached for the step until the optimizer changes it (in-place updates bump ``_version``).

    The key is the weight's memory (address, layout, version), not the
    Python object: ``w`` is a fresh detached view at every call, and
    ``id()`` of a temporary is reused as soon as it is freed. The entry
    keeps ``w`` alive, so no other tensor can take its address while the
    entry lives. A tensor with no memory (the meta device: every
    ``data_ptr()`` is 0; an empty tensor) is cast every time: that costs
    nothing, and one cache slot for all of them would hand one layer's cast
    weight to another.
    """
    if rc.kind == "fp32":
        return _Operand(None, w)
    if torch.compiler.is_compiling() or w.is_meta or w.data_ptr() == 0:
        return _cast(w, rc, dim, ctx, "weight")  # a graph recomputes it (fused); no memory: nothing to cache
    key = (w.data_ptr(), w.device, w.dtype, tuple(w.shape), w.stride(), w._version, rc,
           dim if rc.per_gemm else None)
    hit = ctx.weight_cache.get(key)
    if hit is None:
        ctx.weight_cache[key] = (w, _cast(w, rc, dim, ctx, "weight"))
        return ctx.weight_cache[key][1]
    return hit[1]


def _as_float(op: _Operand, dtype: torch.dtype, transpose: bool) -> torch.Tensor:
    if op.int8 is not None:
        q = op.int8
        t = q.codes.to(dtype)
        inv = q.inv_scale
        t = t.mul_(inv if isinstance(inv, float) else inv.to(dtype))
    else:
        t = op.t if op.t.dtype == dtype else op.t.to(dtype)
    return t.t() if transpose else t


def _inv(q: Int8Operand, transpose: bool) -> Any:
    inv = q.inv_scale
    if isinstance(inv, float):
        return inv
    return inv.t() if transpose else inv


def _mm(a: _Operand, at: bool, b: _Operand, bt: bool, fmt: str, native: bool, scratch: Scratch,
        out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """C = op(A) @ op(B) in ``fmt`` (``at``/``bt``: use the transpose), returned in ``out_dtype``: a 16-bit
    GEMM's own result is handed on as it is, with no widening pass."""
    if fmt == "int8" and a.int8 is not None and b.int8 is not None:
        ia, ib = _inv(a.int8, at), _inv(b.int8, bt)
        ca = a.int8.codes.t() if at else a.int8.codes
        cb = b.int8.codes.t() if bt else b.int8.codes
        if native:  # the int32 result lands in a reused buffer: only the fp32 output is a new allocation
            # torch's CPU _int_mm reads a (1, n) operand with strides (1, 1) (a transposed column, e.g.
            # the output gradient of a 1-feature layer in the weight-grad GEMM) as garbage: give it (n, 1)
            ca = ca.reshape(1, -1) if ca.shape[0] == 1 else ca
            cb = cb.reshape(1, -1) if cb.shape[0] == 1 else cb
            if ca.is_cuda:
                c = _int_mm_cuda(ca, cb)
            elif torch.compiler.is_compiling():
                c = torch._int_mm(ca, cb)
            else:
                c = torch._int_mm(ca, cb, out=scratch.get((ca.shape[0], cb.shape[1]), ca.device, torch.int32))
        else:  # emulation: the same codes, multiplied in fp32
            c = torch.mm(ca.float(), cb.float())
        if isinstance(ia, float) and isinstance(ib, float):
            out = torch.mul(c, ia * ib)
        else:
            out = torch.mul(c, ia).mul_(ib)
        return out if out_dtype == torch.float32 else out.to(out_dtype)
    dtype = FLOAT16_DTYPES.get(fmt, torch.float32) if native else torch.float32
    c = torch.mm(_as_float(a, dtype, at), _as_float(b, dtype, bt))
    return c if c.dtype == out_dtype else c.to(out_dtype)


def _int_mm_cuda(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` on CUDA needs M > 16 and K, N multiples of 8: zero-pad to that (exact), then crop."""
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = max(0, 17 - m), (-k) % 8, (-n) % 8
    if pm or pk:
        a = torch.nn.functional.pad(a, (0, pk, 0, pm))
    if pk or pn:
        b = torch.nn.functional.pad(b, (0, pn, 0, pk))
    c = torch._int_mm(a.contiguous(), b.t().contiguous().t())
    return c[:m, :n] if (pm or pn) else c


def planned_gemm(
    a: torch.Tensor, at: bool, a_cast: RoleCast, a_role: str,
    b: torch.Tensor, bt: bool, b_cast: RoleCast, b_role: str,
    gc: GemmContext, int8_native: bool = True,
) -> torch.Tensor:
    """One GEMM ``op(a) @ op(b)`` (``at``/``bt``: read the transpose) as :func:`planned_linear` runs it, casts included.

    Each operand is cast by its role's :class:`RoleCast` along the GEMM's
    contraction (the same ``_cast`` the linear's GEMMs call), then the kernel
    and its dequantize epilogue run (``_mm``); the result is fp32. Nothing is
    cached or shared between calls, so one call costs what one GEMM costs when
    it casts both its operands: the seam :mod:`adaprec.hardware.shapes` times.
    """
    oa = _cast(a, a_cast, 0 if at else 1, gc, a_role)
    ob = _cast(b, b_cast, 1 if bt else 0, gc, b_role)
    fmt, native = gemm_format(a_cast, b_cast, int8_native)
    return _mm(oa, at, ob, bt, fmt, native, gc.scratch)


class _PlannedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, ex: LinearExec, gc: GemmContext, out_dtype: torch.dtype):  # type: ignore[override]
        shape = x.shape
        x2 = x.detach().reshape(-1, shape[-1])
        wd = w.detach()
        if gc.observe is not None:
            gc.observe("activation", x2)
            gc.observe("weight", wd)
        fmts = ex.formats()
        xa = _cast(x2, ex.activation, 1, gc, "activation")
        wa = _weight(wd, ex.weight, 1, gc)
        fmt, native = fmts["forward"]
        out = _mm(xa, False, wa, True, fmt, native, gc.scratch, out_dtype)
        if bias is not None:
            out.add_(bias.detach())
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # the activation as the weight-grad GEMM reads it (its own cast when scaled per column)
        x_for_wgrad = None
        if need_w:
            if ex.activation.kind == "int8" and ex.activation.per_gemm:
                x_for_wgrad = _cast(x2, ex.activation, 0, gc, "activation")
            else:
                x_for_wgrad = xa
        ctx.ex, ctx.gc, ctx.fmts = ex, gc, fmts
        ctx.shape, ctx.x_dtype = shape, x.dtype
        ctx.has_bias = bias is not None
        ctx.w_op = wa if not (ex.weight.kind == "int8" and ex.weight.per_gemm) else None
        # an uncast fp32 activation is saved as the input itself, so saved-tensor hooks (narrow storage of what
        # autograd keeps) pack it as they pack any op's input; a cast copy (int8 codes, bf16) is kept as made
        ctx.x_saved = x_for_wgrad is not None and ex.activation.kind == "fp32"
        ctx.x_op = None if ctx.x_saved else x_for_wgrad
        ctx.save_for_backward(w, x if ctx.x_saved else None)
        del need_x
        return out.reshape(*shape[:-1], wd.shape[0])  # out is fresh: a reshape, and FSDP2 sees no view

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        ex: LinearExec = ctx.ex
        gc: GemmContext = ctx.gc
        w, x = ctx.saved_tensors
        if ctx.x_saved:
            ctx.x_op = _Operand(None, x.detach().reshape(-1, x.shape[-1]))
        g2 = grad.reshape(-1, grad.shape[-1])
        go = ex.grad_output.kind
        if g2.dtype != torch.float32 and (gc.observe is not None or FLOAT16_DTYPES.get(go) != g2.dtype):
            g2 = g2.float()  # a 16-bit gradient the GEMMs read in its own dtype is not widened and cast back
        if gc.observe is not None:
            gc.observe("grad_output", g2)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            ga = _cast(g2, ex.grad_output, 1, gc, "grad_output")
            wop = ctx.w_op if ctx.w_op is not None else _weight(w.detach(), ex.weight, 0, gc)
            fmt, native = ctx.fmts["input_grad"]
            grad_x = _mm(ga, False, wop, False, fmt, native, gc.scratch, ctx.x_dtype).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            per = ex.grad_output.kind == "int8" and ex.grad_output.per_gemm
            if ctx.needs_input_grad[0] and not per:
                gw_op = ga
            else:
                gw_op = _cast(g2, ex.grad_output, 0, gc, "grad_output")
            fmt, native = ctx.fmts["weight_grad"]
            grad_w = _mm(gw_op, True, ctx.x_op, False, fmt, native, gc.scratch)
            if gc.observe is not None:
                gc.observe("grad_weight", grad_w)
            if not ex.grad_weight.is_fp32:
                grad_w = gc.emulate("grad_weight", grad_w)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0, dtype=torch.float32)
        ctx.x_op = ctx.w_op = None
        return grad_x, grad_w, grad_b, None, None, None


def planned_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, ex: LinearExec, gc: GemmContext
) -> torch.Tensor:
    """``x @ w.T + bias`` with each of its three GEMMs in the format ``ex`` plans.

    The result is in the plan's 16-bit output dtype when it has one (the ops
    after it then run narrow, as under autocast), else in ``x``'s dtype. A
    16-bit ``x`` that the forward GEMM reads in its own dtype is not widened.
    """
    out_dtype = ex.out_dtype or x.dtype
    if x.dtype != torch.float32 and FLOAT16_DTYPES.get(ex.activation.kind) != x.dtype:
        x = x.float()
    y = _PlannedLinear.apply(x, w, bias, ex, gc, out_dtype)
    return y if y.dtype == out_dtype else y.to(out_dtype)
