"""The matmul-like ops the engine recognises, whoever calls them, and what each costs.

The GEMM is the unit of precision: an op is recognised by the torch function
called (``F.linear``, ``torch.addmm``, ``matmul``/``@``, ``bmm``,
``einsum``, convolutions, attention, ``nn.LSTM``'s fused kernels, ...), not
by the class of the module around it. :func:`describe` turns one call into
an :class:`OpCall`: its kind, the operand that is a weight (a parameter, or a
view of one) so the call can be attributed to the module owning it, and the
GEMMs it runs forward and backward with their MACs.

MAC formulas follow ``torch.utils.flop_counter`` (2 FLOPs = 1 MAC) where it
has one, so the ledger can be cross-checked against ``FlopCounterMode``; the
recurrent kernels, which it does not count on CPU, are counted by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["OpCall", "OpGemm", "describe", "operands", "HANDLED", "LINEAR_LIKE", "KIND_OF", "OP_CLASS", "OPERANDS"]


@dataclass(frozen=True)
class OpGemm:
    """One forward GEMM of a call and which backward GEMMs autograd will run for it.

    ``a_role`` x ``b_role`` are the plan roles of its operands (``activation``
    x ``weight``, or ``activation`` x ``activation`` for attention-like
    products). ``grad_a``/``grad_b``: the gradient of that operand is
    computed (a GEMM of the same size each). ``mkn``: for a linear-like
    call (``Y = X W^T``), its forward GEMM's (rows of X, in-features,
    out-features), from which :func:`adaprec.hardware.shapes.linear_gemms`
    derives the backward GEMMs' shapes; None for other ops.
    """

    label: str
    macs: int
    a_role: str
    b_role: str
    grad_a: bool
    grad_b: bool
    mkn: tuple[int, int, int] | None = None


@dataclass
class OpCall:
    """One recognised call: kind, the weight operand if any, GEMMs and element traffic."""

    kind: str  # linear | matmul | conv | conv_transpose | einsum | sdpa | mha | embedding | rnn
    func_name: str
    weight: torch.Tensor | None = None  # the parameter-like operand (attribution)
    gemms: list[OpGemm] = field(default_factory=list)
    # elements read or written per role, forward and backward (bytes = elements x storage bits)
    elements: dict[str, int] = field(default_factory=dict)
    trainable: int = 0  # elements of trainable parameters used (grad_weight, optimizer state)
    shapes: tuple[tuple[int, ...], ...] = ()  # the GEMM operands' shapes, in operand order

    @property
    def site_kind(self) -> str:
        """The kind as plans, sites and the probe know it (``conv_transpose`` is ``conv``, ``sdpa`` is ``attention``)."""
        return KIND_OF.get(self.kind, self.kind)

    @property
    def macs(self) -> int:
        return sum(g.macs for g in self.gemms)

    def backward_macs(self) -> int:
        return sum(g.macs * (int(g.grad_a) + int(g.grad_b)) for g in self.gemms)


def _t(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _rg(x: Any) -> bool:
    return _t(x) and x.requires_grad and torch.is_grad_enabled()


def is_param_like(x: Any) -> bool:
    """A parameter or a view of one (``w.t()``, ``w.view(...)``): the weight of a GEMM."""
    if isinstance(x, torch.nn.Parameter):
        return True
    base = getattr(x, "_base", None)
    return isinstance(base, torch.nn.Parameter)


def param_of(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.nn.Parameter):
        return x
    base = getattr(x, "_base", None)
    return base if isinstance(base, torch.nn.Parameter) else None


def _traffic(call: OpCall, a: torch.Tensor, b: torch.Tensor | None, out_numel: int, a_role: str, b_role: str) -> None:
    """Elements moved by one two-operand op forward and backward."""
    e = call.elements
    e[a_role] = e.get(a_role, 0) + a.numel()
    if b is not None:
        e[b_role] = e.get(b_role, 0) + b.numel()
    e["activation"] = e.get("activation", 0) + out_numel  # the output written
    grads = _rg(a) or (b is not None and _rg(b))
    if grads:
        e["grad_output"] = e.get("grad_output", 0) + out_numel
        if _rg(a):
            e["grad_output"] = e.get("grad_output", 0) + a.numel()  # the input gradient written
            if b is not None:
                e[b_role] = e.get(b_role, 0) + b.numel()  # read again by the input-grad GEMM
        if b is not None and _rg(b):
            e[a_role] = e.get(a_role, 0) + a.numel()  # read again by the weight-grad GEMM
    if b is not None and b_role == "weight" and _rg(b):
        call.trainable += b.numel()


def _linear(func_name: str, x: torch.Tensor, w: torch.Tensor, out_features: int, in_features: int) -> OpCall:
    rows = x.numel() // max(in_features, 1)
    macs = rows * in_features * out_features
    call = OpCall("linear", func_name, weight=param_of(w) if is_param_like(w) else w)
    call.gemms.append(OpGemm(func_name, macs, "activation", "weight", _rg(x), _rg(w),
                             (rows, in_features, out_features)))  # fmt: skip
    _traffic(call, x, w, rows * out_features, "activation", "weight")
    return call


def _d_linear(args, kwargs) -> OpCall | None:
    x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    if not (_t(x) and _t(w)) or w.dim() != 2:
        return None
    return _linear("linear", x, w, w.shape[0], w.shape[1])


def _d_addmm(args, kwargs) -> OpCall | None:
    # addmm(bias, mat1, mat2): HF Conv1D's x @ W + b, with W stored (in, out)
    m1, m2 = _arg(args, kwargs, 1, "mat1"), _arg(args, kwargs, 2, "mat2")
    if not (_t(m1) and _t(m2)) or m1.dim() != 2 or m2.dim() != 2:
        return None
    if is_param_like(m2) or not is_param_like(m1):
        call = _linear("addmm", m1, m2, m2.shape[1], m2.shape[0])
    else:
        call = _matmul_call("addmm", m1, m2)
    return call


def _matmul_call(name: str, a: torch.Tensor, b: torch.Tensor) -> OpCall:
    """a @ b with broadcasting: MACs = output elements x contraction length."""
    if a.dim() == 0 or b.dim() == 0:
        return OpCall("matmul", name)
    k = a.shape[-1]
    if a.dim() == 1 and b.dim() == 1:
        out_numel = 1
    else:
        shape_a = a.shape if a.dim() > 1 else (1, a.shape[0])
        shape_b = b.shape if b.dim() > 1 else (b.shape[0], 1)
        batch = torch.broadcast_shapes(tuple(shape_a[:-2]), tuple(shape_b[:-2]))
        out_numel = math.prod(batch) * shape_a[-2] * shape_b[-1]
    macs = out_numel * k
    pa, pb = is_param_like(a), is_param_like(b)
    if pb and not pa:
        call = OpCall("linear", name, weight=param_of(b))
        mkn = (out_numel // b.shape[-1], k, b.shape[-1]) if b.dim() == 2 and a.dim() >= 1 else None
        call.gemms.append(OpGemm(name, macs, "activation", "weight", _rg(a), _rg(b), mkn))
        _traffic(call, a, b, out_numel, "activation", "weight")
    elif pa and not pb:
        call = OpCall("linear", name, weight=param_of(a))
        call.gemms.append(OpGemm(name, macs, "weight", "activation", _rg(a), _rg(b)))
        _traffic(call, b, a, out_numel, "activation", "weight")
    else:
        call = OpCall("matmul", name)
        call.gemms.append(OpGemm(name, macs, "activation", "activation", _rg(a), _rg(b)))
        _traffic(call, a, b, out_numel, "activation", "activation")
    return call


def _d_matmul(args, kwargs) -> OpCall | None:
    a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
    if not (_t(a) and _t(b)):
        return None
    return _matmul_call("matmul", a, b)


def _d_rmatmul(args, kwargs) -> OpCall | None:
    b, a = args[0], args[1]  # Tensor.__rmatmul__(self=b, other=a) computes a @ b
    if not (_t(a) and _t(b)):
        return None
    return _matmul_call("matmul", a, b)


def _d_mm(args, kwargs) -> OpCall | None:
    a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "mat2")
    if not (_t(a) and _t(b)):
        return None
    return _matmul_call("mm", a, b)


def _d_bmm(args, kwargs) -> OpCall | None:
    a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "mat2")
    if not (_t(a) and _t(b)):
        return None
    return _matmul_call("bmm", a, b)


def _d_baddbmm(args, kwargs) -> OpCall | None:
    a, b = _arg(args, kwargs, 1, "batch1"), _arg(args, kwargs, 2, "batch2")
    if not (_t(a) and _t(b)):
        return None
    return _matmul_call("baddbmm", a, b)


def _einsum_operands(args, kwargs) -> tuple[str, list[torch.Tensor]] | None:
    eq = _arg(args, kwargs, 0, "equation")
    if not isinstance(eq, str):
        return None
    ops = list(args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not ops or not all(_t(o) for o in ops):
        return None
    return eq, ops


def _expand_ellipsis(eq: str, ops: list[torch.Tensor]) -> tuple[list[str], str]:
    """Terms and output with ``...`` replaced by letters (right-aligned, as broadcasting aligns)."""
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    n_ell = 0
    for term, o in zip(terms, ops, strict=True):
        if "..." in term:
            n_ell = max(n_ell, o.dim() - (len(term) - 3))
    ell = "".join(free[:n_ell])
    out_terms = []
    for term, o in zip(terms, ops, strict=True):
        if "..." in term:
            k = o.dim() - (len(term) - 3)
            term = term.replace("...", ell[n_ell - k:] if k else "")
        out_terms.append(term)
    if arrow:
        rhs = rhs.replace("...", ell)
    else:
        counts: dict[str, int] = {}
        for term in out_terms:
            for ch in term:
                counts[ch] = counts.get(ch, 0) + 1
        rhs = ell + "".join(sorted(ch for ch, c in counts.items() if c == 1 and ch not in ell))
    return out_terms, rhs


def _einsum_macs(eq: str, ops: list[torch.Tensor]) -> int:
    """MACs of a left-to-right pairwise contraction (torch's order without opt_einsum)."""
    terms, rhs = _expand_ellipsis(eq.replace(" ", ""), ops)
    if len(terms) != len(ops):
        return 0
    sizes: dict[str, int] = {}
    for term, o in zip(terms, ops, strict=True):
        for ch, n in zip(term, o.shape, strict=False):
            sizes[ch] = max(sizes.get(ch, 1), int(n))
    total = 0
    cur = terms[0]
    for i in range(1, len(terms)):
        nxt = terms[i]
        later = set("".join(terms[i + 1:])) | set(rhs)
        total += math.prod(sizes[c] for c in set(cur) | set(nxt))
        cur = "".join(c for c in dict.fromkeys(cur + nxt) if c in later)
    return total


def _d_einsum(args, kwargs) -> OpCall | None:
    got = _einsum_operands(args, kwargs)
    if got is None:
        return None
    eq, ops = got
    macs = _einsum_macs(eq, ops) if len(ops) >= 2 else 0
    weight = next((param_of(o) for o in ops if is_param_like(o)), None)
    call = OpCall("einsum", "einsum", weight=weight)
    if macs:
        roles = ["weight" if is_param_like(o) else "activation" for o in ops]
        a_role = roles[0] if roles[0] == "activation" else roles[1]
        b_role = "weight" if "weight" in roles else "activation"
        grad_act = any(_rg(o) for o, r in zip(ops, roles, strict=True) if r == "activation")
        grad_w = any(_rg(o) for o, r in zip(ops, roles, strict=True) if r == "weight")
        if b_role == "activation":
            ga, gb = _rg(ops[0]), any(_rg(o) for o in ops[1:])
        else:
            ga, gb = grad_act, grad_w
        call.gemms.append(OpGemm("einsum", macs, a_role, b_role, ga, gb))
    for o, r in zip(ops, ["weight" if is_param_like(o) else "activation" for o in ops], strict=True):
        call.elements[r] = call.elements.get(r, 0) + o.numel()
        if r == "weight" and _rg(o):
            call.trainable += o.numel()
    return call


def _conv_call(kind: str, name: str, x: torch.Tensor, w: torch.Tensor, groups: int, out_numel_fn) -> OpCall:
    out_numel, macs = out_numel_fn()
    call = OpCall(kind, name, weight=param_of(w) if is_param_like(w) else w)
    call.gemms.append(OpGemm(name, macs, "activation", "weight", _rg(x), _rg(w)))
    _traffic(call, x, w, out_numel, "activation", "weight")
    return call


def _conv_out_shape(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, nd: int) -> list[int]:
    def tup(v):
        return list(v) if isinstance(v, (list, tuple)) else [v] * nd

    stride, dilation = tup(stride), tup(dilation)
    spatial_in = list(x.shape[-nd:])
    k = list(w.shape[-nd:])
    if isinstance(padding, str):
        if padding == "same":
            return spatial_in
        padding = [0] * nd
    padding = tup(padding)
    return [
        (spatial_in[i] + 2 * padding[i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(nd)
    ]


def _d_conv(nd: int) -> Callable[..., OpCall | None]:
    def d(args, kwargs) -> OpCall | None:
        x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
        if not (_t(x) and _t(w)):
            return None
        stride = _arg(args, kwargs, 3, "stride", 1)
        padding = _arg(args, kwargs, 4, "padding", 0)
        dilation = _arg(args, kwargs, 5, "dilation", 1)
        groups = int(_arg(args, kwargs, 6, "groups", 1))
        batch = x.shape[0] if x.dim() == nd + 2 else 1

        def sizes():
            out_sp = _conv_out_shape(x, w, stride, padding, dilation, nd)
            out_numel = batch * w.shape[0] * math.prod(out_sp)
            # each output element: a dot product of length C_in/groups * prod(kernel)
            return out_numel, out_numel * (w.numel() // w.shape[0])

        return _conv_call("conv", f"conv{nd}d", x, w, groups, sizes)

    return d


def _d_conv_transpose(nd: int) -> Callable[..., OpCall | None]:
    def d(args, kwargs) -> OpCall | None:
        x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
        if not (_t(x) and _t(w)):
            return None
        groups = int(_arg(args, kwargs, 6, "groups", 1))
        stride = _arg(args, kwargs, 3, "stride", 1)
        padding = _arg(args, kwargs, 4, "padding", 0)
        output_padding = _arg(args, kwargs, 5, "output_padding", 0)
        dilation = _arg(args, kwargs, 7, "dilation", 1)

        def tup(v):
            return list(v) if isinstance(v, (list, tuple)) else [v] * nd

        def sizes():
            batch = x.shape[0] if x.dim() == nd + 2 else 1
            c_out = w.shape[1] * groups
            st, pd, op, dl = tup(stride), tup(padding), tup(output_padding), tup(dilation)
            k = list(w.shape[-nd:])
            sp = [(x.shape[-nd + i] - 1) * st[i] - 2 * pd[i] + dl[i] * (k[i] - 1) + op[i] + 1 for i in range(nd)]
            out_numel = batch * c_out * math.prod(sp)
            # every input element is scattered to C_out/groups * prod(kernel) outputs
            return out_numel, x.numel() * (w.numel() // w.shape[0])

        return _conv_call("conv_transpose", f"conv_transpose{nd}d", x, w, groups, sizes)

    return d


def _d_sdpa(args, kwargs) -> OpCall | None:
    q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    if not (_t(q) and _t(k) and _t(v)):
        return None
    call = OpCall("sdpa", "scaled_dot_product_attention")
    L, e_qk = q.shape[-2], q.shape[-1]
    S, e_v = k.shape[-2], v.shape[-1]
    batch = math.prod(torch.broadcast_shapes(tuple(q.shape[:-2]), tuple(k.shape[:-2])))
    _attention(call, batch, L, S, e_qk, e_v, _rg(q) or _rg(k) or _rg(v))
    n_in = q.numel() + k.numel() + v.numel()
    out = batch * L * e_v
    call.elements["activation"] = n_in + out
    if _rg(q) or _rg(k) or _rg(v):
        call.elements["grad_output"] = out + n_in
        call.elements["activation"] += n_in
    return call


def _attention(call: OpCall, batch: int, L: int, S: int, e_qk: int, e_v: int, grad: bool) -> None:
    """QK^T and PV; backward: dP = dO V^T and dV = P^T dO (pv-sized), dQ = dS K and dK = dS^T Q (qk-sized)."""
    qk = batch * L * S * e_qk
    pv = batch * L * S * e_v
    call.gemms.append(OpGemm("qk", qk, "activation", "activation", grad, grad))
    call.gemms.append(OpGemm("pv", pv, "activation", "activation", grad, grad))


def _d_mha(args, kwargs) -> OpCall | None:
    """``F.multi_head_attention_forward``: projections, attention and output projection as one call."""
    q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    if not (_t(q) and _t(k) and _t(v)):
        return None
    E = int(_arg(args, kwargs, 3, "embed_dim_to_check"))
    heads = int(_arg(args, kwargs, 4, "num_heads"))
    in_w = _arg(args, kwargs, 5, "in_proj_weight")
    bias_k = _arg(args, kwargs, 7, "bias_k")
    add_zero_attn = bool(_arg(args, kwargs, 9, "add_zero_attn", False))
    out_w = _arg(args, kwargs, 11, "out_proj_weight")
    batch_first_layout = False  # the functional always sees (L, N, E); nn.MultiheadAttention transposes first
    if q.dim() == 2:
        N, L, S = 1, q.shape[0], k.shape[0]
    else:
        N, L, S = q.shape[1], q.shape[0], k.shape[0]
    del batch_first_layout
    kdim, vdim = k.shape[-1], v.shape[-1]
    S_eff = S + (1 if bias_k is not None else 0) + (1 if add_zero_attn else 0)
    sep = kwargs.get("q_proj_weight") if kwargs.get("use_separate_proj_weight") else None
    w_any = in_w if _t(in_w) else sep
    w_grad = _rg(w_any)
    call = OpCall("mha", "multi_head_attention_forward", weight=param_of(w_any) if w_any is not None else None)
    for tag, macs, x in (("in_proj_q", N * L * E * E, q), ("in_proj_k", N * S * kdim * E, k), ("in_proj_v", N * S * vdim * E, v)):
        call.gemms.append(OpGemm(tag, macs, "activation", "weight", _rg(x), w_grad))
    grad_any = _rg(q) or _rg(k) or _rg(v) or w_grad
    _attention(call, N * heads, L, S_eff, E // heads, E // heads, grad_any)
    call.gemms.append(OpGemm("out_proj", N * L * E * E, "activation", "weight", grad_any, _rg(out_w)))
    n_w = (in_w.numel() if _t(in_w) else 3 * E * E) + (out_w.numel() if _t(out_w) else E * E)
    qkv = N * (L + 2 * S_eff) * E
    inputs = q.numel() + k.numel() + v.numel()
    e = call.elements
    e["weight"] = n_w
    e["activation"] = inputs + 2 * qkv + 2 * N * L * E + N * L * E
    if grad_any:
        e["grad_output"] = N * L * E + 2 * qkv + N * L * E
        e["weight"] += n_w
        e["activation"] += inputs + qkv + N * L * E
    if w_grad:
        call.trainable += n_w
    return call


def _d_embedding(args, kwargs) -> OpCall | None:
    idx, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    if not (_t(idx) and _t(w)):
        return None
    call = OpCall("embedding", "embedding", weight=param_of(w) if is_param_like(w) else None)
    rows = idx.numel() * w.shape[-1]
    call.elements = {"weight": rows, "activation": rows + idx.numel()}
    if _rg(w):
        call.elements["grad_output"] = rows
        call.trainable += w.numel()  # the engine adds its grad_weight and optimizer_state traffic (once)
    return call


_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _d_rnn(cell: str) -> Callable[..., OpCall | None]:
    """Fused recurrent kernels (``torch.lstm``, ``torch.gru``, ``torch.rnn_*``): counted by hand.

    Per layer and direction, every time step runs the input GEMM
    (gates x input size) and the recurrent GEMM (gates x hidden/proj size),
    plus the LSTM projection when ``proj_size`` is set. Backward: the same
    work again for the input/hidden gradients and once more for the weights.
    """

    def d(args, kwargs) -> OpCall | None:
        if len(args) < 3 or not _t(args[0]):
            return None
        x = args[0]
        packed = _t(args[1]) and args[1].dtype == torch.int64 and args[1].dim() == 1
        if packed:  # (data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional)
            tokens = int(args[1].sum())
            params, layers, bidir = args[3], args[5], args[8]
        else:  # (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
            params, layers, bidir = args[2], args[4], args[7]
            tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
        params = list(params)
        dirs = 2 if bidir else 1
        per = len(params) // max(int(layers) * dirs, 1)
        first_input = 0  # the first layer's input projection: its input gradient runs only if the input needs one
        macs = 0
        n_w = 0
        grad_w = any(_rg(p) for p in params)
        for i in range(int(layers) * dirs):
            group = params[i * per:(i + 1) * per]
            w_ih, w_hh = group[0], group[1]
            if i < dirs:
                first_input += tokens * w_ih.numel()  # (gates*H) x in
            else:
                macs += tokens * w_ih.numel()
            macs += tokens * w_hh.numel()  # (gates*H) x (H or proj)
            if per in (3, 5):  # LSTM projection weight last
                macs += tokens * group[-1].numel()
            n_w += sum(p.numel() for p in group)
        call = OpCall("rnn", cell, weight=param_of(params[0]) if params and is_param_like(params[0]) else None)
        grad_x = _rg(x) or grad_w
        call.gemms.append(OpGemm(f"{cell}.input", first_input, "activation", "weight", _rg(x), grad_w))
        call.gemms.append(OpGemm(cell, macs, "activation", "weight", grad_x, grad_w))
        hidden = params[1].shape[-1] if len(params) > 1 else 0
        out = tokens * hidden * dirs
        call.elements = {"weight": n_w, "activation": x.numel() + out}
        if grad_x:
            call.elements["grad_output"] = out + x.numel()
        if grad_w:
            call.trainable += n_w
        return call

    return d


def _funcs(*names: str) -> list[Any]:
    out = []
    for dotted in names:
        obj: Any = torch
        try:
            for part in dotted.split(".")[1:]:
                obj = getattr(obj, part)
        except AttributeError:
            continue
        out.append(obj)
    return out


_TABLE: list[tuple[list[Any], Callable[..., OpCall | None]]] = [
    ([F.linear], _d_linear),
    (_funcs("torch.addmm", "torch.Tensor.addmm"), _d_addmm),
    (_funcs("torch.matmul", "torch.Tensor.matmul", "torch.Tensor.__matmul__"), _d_matmul),
    (_funcs("torch.Tensor.__rmatmul__"), _d_rmatmul),
    (_funcs("torch.mm", "torch.Tensor.mm"), _d_mm),
    (_funcs("torch.bmm", "torch.Tensor.bmm"), _d_bmm),
    (_funcs("torch.baddbmm", "torch.Tensor.baddbmm"), _d_baddbmm),
    ([torch.einsum], _d_einsum),
    ([F.conv1d], _d_conv(1)),
    ([F.conv2d], _d_conv(2)),
    ([F.conv3d], _d_conv(3)),
    ([F.conv_transpose1d], _d_conv_transpose(1)),
    ([F.conv_transpose2d], _d_conv_transpose(2)),
    ([F.conv_transpose3d], _d_conv_transpose(3)),
    ([F.scaled_dot_product_attention], _d_sdpa),
    ([F.multi_head_attention_forward], _d_mha),
    ([F.embedding], _d_embedding),
    (_funcs("torch.lstm"), _d_rnn("lstm")),
    (_funcs("torch.gru"), _d_rnn("gru")),
    (_funcs("torch.rnn_tanh"), _d_rnn("rnn_tanh")),
    (_funcs("torch.rnn_relu"), _d_rnn("rnn_relu")),
]

_DESCRIBE: dict[Any, Callable[..., OpCall | None]] = {f: d for fs, d in _TABLE for f in fs}
HANDLED: frozenset[Any] = frozenset(_DESCRIBE)
# ops whose weight operand the planned-GEMM kernels (int8, bf16) can run natively
LINEAR_LIKE = frozenset({"linear"})


# the op kind as the plan and the probe know it (conv and conv_transpose are one kind; sdpa is attention)
KIND_OF = {
    "linear": "linear", "matmul": "matmul", "conv": "conv", "conv_transpose": "conv",
    "einsum": "einsum", "sdpa": "attention", "mha": "mha", "embedding": "embedding", "rnn": "rnn",
}
# the probe's op class of a site kind (its speed tables: gemm, conv, attention)
OP_CLASS = {"conv": "conv", "attention": "attention"}

# The one operand table: per op, the (position, keyword) of each tensor its GEMMs multiply. einsum
# (absent): every tensor after the equation.
_INPUT_WEIGHT = ((0, "input"), (1, "weight"))
_QKV = ((0, "query"), (1, "key"), (2, "value"))
_OPERAND_SPECS: list[tuple[list[Any], tuple[tuple[int, str], ...]]] = [
    ([F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
      F.embedding], _INPUT_WEIGHT),
    (_funcs("torch.addmm", "torch.Tensor.addmm"), ((1, "mat1"), (2, "mat2"))),
    (_funcs("torch.baddbmm", "torch.Tensor.baddbmm"), ((1, "batch1"), (2, "batch2"))),
    (_funcs("torch.matmul", "torch.Tensor.matmul", "torch.Tensor.__matmul__"), ((0, "input"), (1, "other"))),
    (_funcs("torch.Tensor.__rmatmul__"), ((0, "self"), (1, "other"))),
    (_funcs("torch.mm", "torch.Tensor.mm", "torch.bmm", "torch.Tensor.bmm"), ((0, "input"), (1, "mat2"))),
    ([F.scaled_dot_product_attention, F.multi_head_attention_forward], _QKV),
    (_funcs("torch.lstm", "torch.gru", "torch.rnn_tanh", "torch.rnn_relu"), ((0, "input"),)),
]
OPERANDS: dict[Any, tuple[tuple[int, str], ...]] = {f: spec for fs, spec in _OPERAND_SPECS for f in fs}


def operands(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors ``func``'s GEMMs multiply, in operand order (einsum: every tensor after the equation)."""
    spec = OPERANDS.get(func)
    if spec is None:
        found: list[Any] = []
        for a in list(args[1:]) + list(kwargs.values()):
            found += list(a) if isinstance(a, (list, tuple)) else [a]
    else:
        found = [args[i] if len(args) > i else kwargs.get(key) for i, key in spec]
    return [t for t in found if isinstance(t, torch.Tensor)]


def describe(func: Any, args: Sequence[Any], kwargs: dict[str, Any] | None) -> OpCall | None:
    """The :class:`OpCall` of ``func(*args, **kwargs)``, or None when it is not a matmul-like op."""
    d = _DESCRIBE.get(func)
    if d is None:
        return None
    kwargs = kwargs or {}
    try:
        call = d(args, kwargs)
    except (TypeError, ValueError, IndexError, RuntimeError):
        return None  # an unusual call signature: run it, count it as unknown (the engine notes it)
    if call is not None:
        call.shapes = tuple(tuple(t.shape) for t in operands(func, args, kwargs))
    return call
