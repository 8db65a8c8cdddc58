"""How each aten op moves bytes: its class, which operands it reads and writes, and dtype names.

Read once per op overload from its schema and a few name tables, then
cached; :class:`adaprec.energy.traffic.TrafficCounter` applies it to every op
of a counted step. The definition it implements is in docs/energy.md,
"Bytes moved".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["classify", "dtype_label", "OpRule", "rule_of", "distinct_elements"]

# --- op classes -----------------------------------------------------------------------------------
# Ops that move no data: views, metadata, allocation without a write.
_NO_DATA = frozenset({
    "_unsafe_view", "lift_fresh", "lift", "_reshape_alias", "alias", "detach", "detach_", "as_strided", "view",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted", "set_", "resize_",
    "resize_as_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
    "record_stream", "_nested_tensor_from_mask_left_aligned", "_version", "requires_grad_", "retain_grad",
    "_record_function_enter", "_record_function_enter_new", "_record_function_exit",  # profiler markers
})
_GEMM = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "_int_mm", "_scaled_mm", "_addmm_activation",
    "mkldnn_linear", "mkldnn_linear_backward", "mkldnn_linear_backward_input", "mkldnn_linear_backward_weights",
    "_weight_int8pack_mm", "_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu", "linear", "matmul",
    "linear_backward", "_scaled_grouped_mm", "_grouped_mm", "ger", "outer",
})
_NORMALIZATION = ("layer_norm", "batch_norm", "group_norm", "rms_norm", "instance_norm", "_norm_legit")
_SOFTMAX = frozenset({
    "_softmax", "_log_softmax", "_softmax_backward_data", "_log_softmax_backward_data", "softmax", "log_softmax",
    "_safe_softmax",
})
_GATHER = frozenset({"embedding", "index_select", "gather", "index", "take", "_unsafe_index", "masked_select"})
_SCATTER_INPLACE = frozenset({
    "index_put_", "_index_put_impl_", "index_add_", "scatter_", "scatter_add_", "scatter_reduce_", "index_copy_",
    "masked_scatter_", "index_fill_", "_unsafe_index_put",
})
_SCATTER = frozenset({
    "embedding_dense_backward", "embedding_backward", "_embedding_bag_backward", "_embedding_bag_dense_backward",
    "index_put", "index_add", "scatter", "scatter_add", "scatter_reduce", "index_copy", "masked_scatter", "index_fill",
    "slice_scatter", "select_scatter", "diagonal_scatter", "as_strided_scatter", "select_backward", "slice_backward",
    "index_select_backward", "gather_backward", "_index_put_impl",
})
_COPY = frozenset({
    "clone", "copy_", "_copy_from", "_copy_from_and_resize", "cat", "stack", "constant_pad_nd", "repeat", "flip",
    "roll", "tril", "triu", "_local_scalar_dense", "contiguous", "_to_copy", "to", "permute_copy", "t_copy",
    "view_copy", "expand_copy", "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d",
    "_to_dense", "to_dense", "unfold_backward", "im2col", "col2im",
})
_FILL = frozenset({
    "fill_", "zero_", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros", "new_ones",
    "new_full", "scalar_tensor", "arange", "linspace", "logspace", "eye", "rand", "rand_like", "randn", "randn_like",
    "randint", "randint_like", "randperm", "normal_", "uniform_", "bernoulli_", "random_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "bernoulli", "normal", "tensor", "_efficientzerotensor",
})
# Ops whose first operand is only a template for the output's shape and dtype: not read.
_TEMPLATE = frozenset({
    "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randint_like", "new_zeros", "new_ones",
    "new_full", "empty_like", "new_empty", "new_empty_strided",
})
# Ops whose mutated operand is overwritten, not read.
_OVERWRITE = frozenset({
    "copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_", "geometric_",
    "cauchy_", "log_normal_", "_copy_from", "_copy_from_and_resize",
})
_REDUCTION = frozenset({
    "norm", "linalg_vector_norm", "_foreach_norm", "max", "min", "topk", "sort", "cumsum", "cumprod", "logsumexp",
    "std", "var", "var_mean", "std_mean", "_local_scalar_dense", "argmax", "argmin", "aminmax", "median",
    "kthvalue", "mode", "cummax", "cummin", "_aminmax", "nansum", "_cdist_forward", "count_nonzero",
})


def _base(name: str) -> str:
    return name.split("::", 1)[-1]


def classify(func: Any) -> str:
    """The op class of an aten op: one of ``OP_CLASSES`` (``"view"`` for ops that move no data).

    By name first (GEMMs, attention, norms, softmax, losses, gathers and
    scatters, copies, casts, fills), then by the op's own tags (pointwise,
    reduction); anything else is ``"other"`` (its bytes still counted).
    """
    name = _base(func._schema.name)
    if name in _NO_DATA:
        return "view"
    if name in _GEMM or "conv" in name or name.endswith("_mm"):
        return "gemm"
    if "attention" in name or "scaled_dot_product" in name:
        return "attention"
    if any(k in name for k in _NORMALIZATION):
        return "normalization"
    if name in _SOFTMAX:
        return "softmax"
    if "loss" in name or "binary_cross_entropy" in name or name.startswith("kl_div"):
        return "loss"
    if name in _GATHER or name.startswith("embedding_bag") or name.startswith("_embedding_bag"):
        return "gather"
    if name in _SCATTER or name in _SCATTER_INPLACE:
        return "scatter"
    if name in _FILL:
        return "fill"
    if name in _COPY:
        return "copy"  # a copy that changes dtype is told apart per call ("cast")
    if name in _REDUCTION or name.endswith("_norm"):
        return "reduction"
    tags = func.tags
    if (torch.Tag.pointwise in tags or name.startswith(("_foreach_", "_fused_", "_amp_foreach_"))
            or "dropout" in name):
        return "elementwise"
    if torch.Tag.reduction in tags:
        return "reduction"
    if name.endswith("_backward"):
        fwd = name.removesuffix("_backward")
        if "pool" in fwd or fwd in {"gelu", "silu", "mish", "hardswish", "hardsigmoid", "elu", "threshold", "tanh",
                                    "sigmoid", "softplus", "leaky_relu", "hardtanh", "glu", "log_sigmoid"}:
            return "elementwise" if "pool" not in fwd else "reduction"
    if "pool" in name or name == "_amp_update_scale_":
        return "reduction"
    return "other"


_DTYPE_LABELS = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
    torch.int8: "int8", torch.int16: "int16", torch.int32: "int32", torch.int64: "int64", torch.uint8: "uint8",
    torch.bool: "bool",
}
for _attr, _label in (("float8_e4m3fn", "fp8_e4m3"), ("float8_e5m2", "fp8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPE_LABELS[getattr(torch, _attr)] = _label


def dtype_label(dtype: torch.dtype) -> str:
    """The name a dtype goes by in the ledger: adaprec's format name where one exists (``fp32``, ``bf16``,
    ``int8``, ``fp8_e4m3``), else torch's (``int64``, ``float8_e4m3fnuz``)."""
    return _DTYPE_LABELS.get(dtype) or str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class OpRule:
    """How one aten overload moves bytes, read once from its schema and cached."""

    cls: str
    name: str
    out_args: frozenset[str]  # out= arguments: written, not read
    mutated: tuple[int, ...]  # positions of arguments the op writes in place
    mutated_kw: frozenset[str]
    fresh: tuple[bool, ...]  # per return: a new tensor (True) or an alias of an input (False)
    overwrite: bool  # the mutated operand is overwritten, not read
    template: bool  # the first operand only gives the output's shape and dtype
    gather: bool  # reads of its first argument are the rows it gathers (the output's elements)
    scatter: bool  # an in-place scatter: its first argument is touched where the update lands


_RULES: dict[Any, OpRule] = {}


def rule_of(func: Any) -> OpRule:
    """The cached :class:`OpRule` of an aten op overload."""
    r = _RULES.get(func)
    if r is None:
        schema = func._schema
        name = _base(schema.name)
        cls = classify(func)
        mutated, mutated_kw, out_args = [], set(), set()
        for i, a in enumerate(schema.arguments):
            if a.is_out:
                out_args.add(a.name)
            elif a.alias_info is not None and a.alias_info.is_write:
                (mutated_kw.add(a.name) if a.kwarg_only else mutated.append(i))
        fresh = tuple(ret.alias_info is None for ret in schema.returns)
        if cls != "view" and schema.returns and not any(fresh) and not mutated and not mutated_kw and not out_args:
            cls = "view"  # every return aliases an input and nothing is written: a view
        r = _RULES[func] = OpRule(
            cls, name, frozenset(out_args), tuple(mutated), frozenset(mutated_kw), fresh,
            name in _OVERWRITE, name in _TEMPLATE, name in _GATHER, name in _SCATTER_INPLACE,
        )
    return r


def distinct_elements(t: torch.Tensor) -> int:
    """Distinct elements a tensor holds: a broadcast (stride-0) dimension is stored, and read, once."""
    try:
        n = 1
        for size, stride in zip(t.shape, t.stride(), strict=True):
            if size == 0:
                return 0
            if stride != 0:
                n *= size
        return n
    except (RuntimeError, NotImplementedError):  # sparse, mkldnn, nested: no strides
        return t.numel()
