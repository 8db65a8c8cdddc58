"""The bytes a training step moves, op by op: counted on some steps, replayed on the rest.

The ledger used to count only GEMM operands. A step also moves the bytes of
every other op (elementwise, norms, softmax, casts, reductions, embedding
gathers), of what autograd keeps for backward (written in forward, read back
by the backward ops), and of the optimizer's reads and writes. This module
sees them all from below: :class:`TrafficCounter` is a
``TorchDispatchMode`` that, for every aten op of the step, adds the bytes of
its tensor inputs (read) and outputs (written) in the dtype each really had,
by module, phase, op class and dtype. The definition (what counts as a byte
read or written, and what is left out) is in docs/energy.md, "Bytes moved".

A dispatch mode costs Python time on every op, so it must not run on every
step. :class:`TrafficBook` counts the first step of each key (the plan and
the input signature, plus anything else that changes which ops run), replays
that count for later steps with the same key, and counts again every
``recount_every`` replays of a key to catch drift. Every step says whether
its bytes were ``counted`` or ``replayed``.

Attribution: forward ops go to the innermost running module of the model
(global module hooks, installed only while counting). Backward ops go to the
module whose forward created the autograd node running them (its sequence
number, stamped at forward time, against the module intervals seen in
forward); gradient accumulation to the parameter's module; optimizer ops to
the module of the parameter (or gradient, or state tensor) they touch.
"""

from __future__ import annotations

import bisect
import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adaprec.energy.counting import CountingError, StepCost

__all__ = [
    "TrafficCounter", "StepTraffic", "TrafficBook", "Measurement", "classify", "dtype_label", "input_signature",
    "OUTSIDE", "BACKWARD", "OPTIMIZER",
]

# Pseudo-module names for ops no module of the model ran.
OUTSIDE = "(outside)"  # forward ops outside every module of the model (e.g. the loss), and their backward
BACKWARD = "(backward)"  # backward ops whose autograd node no counted forward created
OPTIMIZER = "(optimizer)"  # optimizer ops on tensors of no known parameter

_ACCUMULATE_GRAD_SEQ = 2**64 - 1  # the sequence number autograd gives AccumulateGrad nodes

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
class _OpRule:
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


_RULES: dict[Any, _OpRule] = {}


def _rule(func: Any) -> _OpRule:
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
        r = _RULES[func] = _OpRule(
            cls, name, frozenset(out_args), tuple(mutated), frozenset(mutated_kw), fresh,
            name in _OVERWRITE, name in _TEMPLATE, name in _GATHER, name in _SCATTER_INPLACE,
        )
    return r


def _elements(t: torch.Tensor) -> int:
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


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            if isinstance(y, torch.Tensor):
                yield y


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


# --- the count of one step -----------------------------------------------------------------------------
# (module, phase, op class, dtype label, bits per element, "read" | "write") -> elements
Key = tuple[str, str, str, str, int, str]
PHASES = ("forward", "backward", "optimizer")


@dataclass
class StepTraffic:
    """Plain data: the elements one step's ops read and wrote, by module, phase, op class and dtype.

    ``counts`` maps ``(module, phase, op_class, dtype, bits, direction)`` to
    elements (``bits`` per element: bytes are ``elements * bits / 8``).
    ``kinds`` names each module's class; ``calls`` counts op calls per class
    (``view`` included); ``unclassified`` names the ops counted under ``other``.
    """

    counts: dict[Key, int] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    unclassified: dict[str, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(n * k[4] // 8 for k, n in self.counts.items())

    def bytes_by(self, what: str) -> dict[str, int]:
        """Bytes per ``module``, ``phase``, ``op_class``, ``dtype`` or ``direction``."""
        fields = ("module", "phase", "op_class", "dtype", "bits", "direction")
        if what not in fields or what == "bits":
            raise CountingError(f"bytes_by({what!r}): use one of module, phase, op_class, dtype, direction")
        i = fields.index(what)
        out: dict[str, int] = {}
        for k, n in self.counts.items():
            name = str(k[i])
            out[name] = out.get(name, 0) + n * k[4] // 8
        return out

    def without(self, *phases: str) -> StepTraffic:
        """The same count without ``phases`` (e.g. ``"optimizer"`` for a step whose update was skipped)."""
        unknown = set(phases) - set(PHASES)
        if unknown:
            raise CountingError(f"unknown phases {sorted(unknown)}; phases are {PHASES}")
        return StepTraffic({k: n for k, n in self.counts.items() if k[1] not in phases}, dict(self.kinds),
                           dict(self.calls), dict(self.unclassified))

    def apply_to(self, cost: StepCost, source: str = "counted") -> StepCost:
        """Add this traffic to ``cost`` (the engine's GEMMs of the same step), labelled ``source``.

        From then on the ledger prices ``cost``'s bytes from these op-level
        counts (GEMM operands included) instead of its GEMM-operand model.
        Returns ``cost``.
        """
        if source not in ("counted", "replayed"):
            raise CountingError(f"bytes source {source!r}: use 'counted' or 'replayed'")
        if cost.op_counted:
            raise CountingError("this StepCost already carries an op-level count; apply a step's traffic once")
        for (mod, phase, cls, dtype, bits, direction), n in self.counts.items():
            cost.add_op_traffic(mod, phase, cls, dtype, bits, direction, n, kind=self.kinds.get(mod, ""))
        cost.bytes_source = source
        for name, n in self.unclassified.items():
            cost.unclassified_ops[name] = cost.unclassified_ops.get(name, 0) + n
        return cost

    def to_dict(self) -> dict[str, Any]:
        return {"counts": [[*k, n] for k, n in self.counts.items()], "kinds": dict(self.kinds),
                "calls": dict(self.calls), "unclassified": dict(self.unclassified)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepTraffic:
        try:
            counts = {(str(c[0]), str(c[1]), str(c[2]), str(c[3]), int(c[4]), str(c[5])): int(c[6]) for c in d["counts"]}
            return cls(counts, dict(d["kinds"]), dict(d["calls"]), dict(d.get("unclassified", {})))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise CountingError(f"step traffic state is malformed ({e!r}); was it written by StepTraffic.to_dict()?") from None


class TrafficCounter(TorchDispatchMode):
    """Counts the bytes every aten op reads and writes while it is active (forward, backward, optimizer step).

    Usage::

        counter = TrafficCounter(model)
        with counter:
            loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
        traffic = counter.pop()      # StepTraffic; the tally restarts

    It costs Python time on every op (a counted step runs a few times slower
    than a plain one on a small model): use a :class:`TrafficBook` to count
    only some steps. The model's numbers are untouched: every op runs as it
    would without the counter.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise CountingError(f"TrafficCounter needs the model (an nn.Module), got {type(model).__name__}")
        self.model = model
        self._names = {id(m): n for n, m in model.named_modules()}
        self._kinds = {n: type(m).__name__ for n, m in model.named_modules()}
        self._param_owner: dict[int, str] = {}
        for mname, m in model.named_modules():
            for p in m.parameters(recurse=False):
                self._param_owner.setdefault(id(p), mname)
        self._handles: list[Any] = []
        self._active = False
        self._reset()

    def _reset(self) -> None:
        self._acc: dict[Key, int] = {}
        self._calls: dict[str, int] = {}
        self._other: dict[str, int] = {}
        self._stack: list[tuple[int, str]] = []
        self._seqs: list[int] = []  # module change points: from sequence number seqs[i] on, owner owners[i]
        self._owners: list[str] = []
        self._in_optimizer = 0
        self._tensor_owner: dict[int, str] = {}
        self._last_owner = OPTIMIZER
        self._region: str | None = None

    # --- hooks, installed only while counting ---------------------------------------------------------
    def __enter__(self) -> TrafficCounter:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        if self._active:
            raise CountingError("this TrafficCounter is already counting: do not nest `with counter:` blocks")
        self._active = True
        self._mark()
        self._handles = [
            register_module_forward_pre_hook(self._enter_module),
            register_module_forward_hook(self._leave_module, always_call=True),
            register_optimizer_step_pre_hook(self._enter_optimizer),
            register_optimizer_step_post_hook(self._leave_optimizer),
        ]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._active = False
        return super().__exit__(*exc)

    def _mark(self) -> None:
        seq = torch.autograd._get_sequence_nr()
        owner = self._stack[-1][1] if self._stack else OUTSIDE
        if self._seqs and self._seqs[-1] == seq:
            self._owners[-1] = owner
        else:
            self._seqs.append(seq)
            self._owners.append(owner)

    def _enter_module(self, module: nn.Module, args: Any) -> None:
        name = self._names.get(id(module))
        if name is not None:
            self._stack.append((id(module), name))
            self._mark()

    def _leave_module(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack and self._stack[-1][0] == id(module):
            self._stack.pop()
            self._mark()

    def _enter_optimizer(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._in_optimizer += 1
        owners = self._tensor_owner
        for group in optimizer.param_groups:
            for p in group["params"]:
                mod = self._param_owner.get(id(p), OPTIMIZER)
                tensors = [p, p.grad, *(v for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor))]
                for t in tensors:
                    if isinstance(t, torch.Tensor):
                        owners[_storage(t)] = mod

    def _leave_optimizer(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._in_optimizer = max(0, self._in_optimizer - 1)
        self._tensor_owner.clear()
        self._last_owner = OPTIMIZER

    @contextlib.contextmanager
    def region(self, label: str) -> Iterator[None]:
        """Attribute the ops inside to ``label`` (e.g. ``"(adaprec: unscale)"``) instead of a module."""
        was, self._region = self._region, label
        try:
            yield
        finally:
            self._region = was

    # --- attribution ---------------------------------------------------------------------------------
    def _node_owner(self, node: Any) -> str:
        seq = node._sequence_nr()
        if seq == _ACCUMULATE_GRAD_SEQ:
            var = getattr(node, "variable", None)
            return self._param_owner.get(id(var), BACKWARD) if var is not None else BACKWARD
        i = bisect.bisect_right(self._seqs, seq) - 1
        return self._owners[i] if i >= 0 else BACKWARD

    # --- the count -------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rule = _rule(func)
        calls = self._calls
        calls[rule.cls] = calls.get(rule.cls, 0) + 1
        if rule.cls == "view":
            return out
        if rule.cls == "other":
            self._other[rule.name] = self._other.get(rule.name, 0) + 1
        if self._in_optimizer:
            phase, module = "optimizer", None
        else:
            node = torch._C._current_autograd_node()
            if self._stack:
                module = self._stack[-1][1]
            elif node is not None:
                module = self._node_owner(node)
            else:
                module = OUTSIDE
            phase = "backward" if node is not None else "forward"
        if self._region is not None:
            module = self._region
        self._count(rule, func, args, kwargs, out, phase, module)
        return out

    def _count(self, rule: _OpRule, func: Any, args: tuple, kwargs: dict, out: Any, phase: str,
               module: str | None) -> None:
        reads: list[tuple[torch.Tensor, int | None]] = []  # (tensor, elements or None for all distinct)
        writes: list[tuple[torch.Tensor, int | None]] = []
        outs = out if isinstance(out, (tuple, list)) else (out,)
        n_out = sum(t.numel() for t in _tensors(outs[0])) if rule.gather and outs else 0
        for i, a in enumerate(args):
            if rule.template and i == 0:
                continue
            mutated = i in rule.mutated
            if rule.scatter and i == 0:
                touched = max((t.numel() for x in args[1:] for t in _tensors(x)), default=0)
                touched = min(touched, a.numel()) if isinstance(a, torch.Tensor) else 0
                reads.append((a, touched))
                writes.append((a, touched))
                continue
            for t in _tensors(a):
                if not (mutated and rule.overwrite):
                    reads.append((t, n_out if rule.gather and i == 0 else None))
                if mutated:
                    writes.append((t, None))
        for k, v in kwargs.items():
            if k in rule.out_args:
                writes.extend((t, None) for t in _tensors(v))
                continue
            mutated = k in rule.mutated_kw
            for t in _tensors(v):
                if not (mutated and rule.overwrite):
                    reads.append((t, None))
                if mutated:
                    writes.append((t, None))
        if rule.fresh:
            for fresh, o in zip(rule.fresh, outs, strict=False):
                if fresh:
                    writes.extend((t, None) for t in _tensors(o))
        cls = rule.cls
        if cls == "copy" and rule.name in ("_to_copy", "copy_", "to", "_copy_from"):
            dtypes = {t.dtype for t, _ in reads} | {t.dtype for t, _ in writes}
            if len(dtypes) > 1:
                cls = "cast"
        if phase == "optimizer":
            cls = "optimizer"
        if module is None:  # the optimizer: the module of the parameter (gradient, state) the op touches
            if rule.name.startswith("_foreach_"):
                self._count_foreach(args, out, reads, writes, cls, phase)
                return
            owners = (self._tensor_owner.get(_storage(t)) for t, _ in (*reads, *writes))
            module = next((m for m in owners if m is not None), self._last_owner)
            self._last_owner = module
            for t, _ in writes:  # a temporary belongs to the parameter it was computed for
                self._tensor_owner[_storage(t)] = module
        acc = self._acc
        for direction, items in (("read", reads), ("write", writes)):
            for t, n in items:
                n = _elements(t) if n is None else n
                if n:
                    key = (module, phase, cls, dtype_label(t.dtype), t.element_size() * 8, direction)
                    acc[key] = acc.get(key, 0) + n

    def _count_foreach(self, args: tuple, out: Any, reads: list, writes: list, cls: str, phase: str) -> None:
        """A foreach op of the optimizer: element j of every list (and of its result) belongs to the j-th
        parameter's module."""
        owner_of, acc = self._tensor_owner, self._acc
        lists = [a for a in (*args, out) if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        index: dict[int, str] = {}  # id(tensor) -> module
        if lists:
            for j in range(len(lists[0])):
                mod = None
                for lst in lists:
                    if j < len(lst):
                        mod = owner_of.get(_storage(lst[j]))
                        if mod is not None:
                            break
                mod = mod or OPTIMIZER
                for lst in lists:
                    if j < len(lst):
                        index[id(lst[j])] = mod
                        owner_of[_storage(lst[j])] = mod  # temporaries keep their parameter's module
        for direction, items in (("read", reads), ("write", writes)):
            for t, n in items:
                n = _elements(t) if n is None else n
                if n:
                    mod = index.get(id(t)) or owner_of.get(_storage(t)) or OPTIMIZER
                    key = (mod, phase, cls, dtype_label(t.dtype), t.element_size() * 8, direction)
                    acc[key] = acc.get(key, 0) + n

    def pop(self) -> StepTraffic:
        """Everything counted since the last pop, as plain data; the tally starts again."""
        modules = {k[0] for k in self._acc}
        kinds = {m: self._kinds.get(m, "") for m in modules}
        traffic = StepTraffic(dict(self._acc), kinds, dict(self._calls), dict(self._other))
        stack = self._stack
        self._reset()
        self._stack = stack  # a pop inside a running module keeps its frame
        self._mark()
        return traffic


# --- counting some steps, replaying the rest ------------------------------------------------------------------
def input_signature(*inputs: Any) -> str:
    """A short string of the shapes and dtypes of ``inputs`` (tensors, nested lists/tuples/dicts, plain values)."""

    def sig(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"{dtype_label(x.dtype)}{list(x.shape)}@{x.device.type}"
        if isinstance(x, Mapping):
            return "{" + ",".join(f"{k}:{sig(v)}" for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))) + "}"
        if isinstance(x, (list, tuple)):
            return "(" + ",".join(sig(v) for v in x) + ")"
        return type(x).__name__

    return ";".join(sig(x) for x in inputs)


@dataclass
class Measurement:
    """What :meth:`TrafficBook.measure` gives back: the step's traffic once the block has run, and how it was had."""

    key: str
    step: int
    source: str  # "counted" | "replayed"
    traffic: StepTraffic | None = None


class TrafficBook:
    """Counts a step's bytes on the first step of each key, replays the count for later steps of that key.

    A key is a string naming whatever decides which ops a step runs: the
    plan's signature and the input signature (:func:`input_signature`) at
    least, plus e.g. whether monitors sample on this step. A key's steps are
    counted until two counts in a row agree (within ``tolerance``, relative
    bytes; the very first step of a run also creates the optimizer's state,
    which later steps do not), then replayed. Every ``recount_every``
    replays, a step is counted again; a recount that differs from the
    confirmed count replaces it and is logged as drift.

    Usage::

        book = TrafficBook(model)
        for step, (x, y) in enumerate(loader):
            key = f"{plan_signature}|{input_signature(x, y)}"
            with book.measure(key, step) as m:
                loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
            m.traffic.apply_to(step_cost, m.source)   # then ledger.record(step, plan, step_cost)

    Args:
        model: the model whose modules the bytes are attributed to.
        recount_every: replays of a key between two counts of it (0: never recount).
        max_keys: counts kept (least recently used dropped first).
        tolerance: relative difference in bytes a recount may show without being logged as drift.
    """

    def __init__(self, model: nn.Module, recount_every: int = 500, max_keys: int = 64, tolerance: float = 1e-6) -> None:
        if recount_every < 0 or max_keys < 1:
            raise CountingError(f"TrafficBook(recount_every={recount_every}, max_keys={max_keys}): "
                                "recount_every must be >= 0 and max_keys >= 1")
        self.counter = TrafficCounter(model)
        self.recount_every = int(recount_every)
        self.max_keys = int(max_keys)
        self.tolerance = float(tolerance)
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.counted = 0
        self.replayed = 0
        self.drifts: list[dict[str, Any]] = []
        self.counted_steps: list[int] = []  # the last steps that were counted (bounded)
        self._open: Measurement | None = None

    def must_count(self, key: str) -> bool:
        """Whether the next step of ``key`` is counted (new key, or time to recount) rather than replayed."""
        e = self._entries.get(key)
        return e is None or not e["confirmed"] or (self.recount_every > 0 and e["replays"] >= self.recount_every)

    @contextlib.contextmanager
    def measure(self, key: str, step: int) -> Iterator[Measurement]:
        """Run a training step inside; afterwards ``measurement.traffic`` is its count, counted or replayed.

        Replayed steps run with nothing added; their traffic is the stored count itself (shared: read it,
        do not change it). A block that raises leaves the book as it was.
        """
        m = self.start(key, step)
        try:
            yield m
        except BaseException:
            self.abort(m)
            raise
        self.stop(m)

    def start(self, key: str, step: int) -> Measurement:
        """Begin a step (for loops whose step is not one block: call :meth:`stop` after the optimizer step)."""
        if not isinstance(key, str):
            raise CountingError(f"a traffic key must be a string, got {type(key).__name__}; build one with "
                                "input_signature() and the plan's signature")
        if self._open is not None:
            raise CountingError(f"step {self._open.step} is still being measured: stop() it before starting another")
        m = Measurement(key, int(step), "counted" if self.must_count(key) else "replayed")
        if m.source == "counted":
            self.counter.pop()
            self.counter.__enter__()
        self._open = m
        return m

    def stop(self, m: Measurement) -> StepTraffic:
        """End the step begun by :meth:`start`: its traffic (also in ``m.traffic``), counted or replayed."""
        if self._open is not m:
            raise CountingError("stop() of a measurement that is not the open one; call start() first")
        self._open = None
        if m.source == "replayed":
            e = self._entries[m.key]
            e["replays"] += 1
            self._entries.move_to_end(m.key)
            self.replayed += 1
            m.traffic = e["traffic"]
            return m.traffic
        self.counter.__exit__(None, None, None)
        m.traffic = self.counter.pop()
        self._store(m.key, m.step, m.traffic)
        return m.traffic

    def abort(self, m: Measurement) -> None:
        """Drop the step begun by :meth:`start` (it raised, or was abandoned): nothing is stored or counted."""
        if self._open is m:
            self._open = None
            if m.source == "counted":
                self.counter.__exit__(None, None, None)
                self.counter.pop()

    def _store(self, key: str, step: int, traffic: StepTraffic) -> None:
        old = self._entries.get(key)
        agree = False
        if old is not None:
            before = old["traffic"].bytes
            after = traffic.bytes
            agree = abs(after - before) <= self.tolerance * max(before, 1)
            if not agree and old["confirmed"]:
                self.drifts.append({"key": key, "step": step, "bytes_before": before, "bytes_after": after})
                del self.drifts[:-100]
        self._entries[key] = {"traffic": traffic, "counted_at": step, "replays": 0,
                              "confirmed": agree}
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)
        self.counted += 1
        self.counted_steps.append(step)
        del self.counted_steps[:-1000]

    def replay(self, key: str) -> StepTraffic | None:
        """The stored count of ``key`` (shared: read it, do not change it), or None."""
        e = self._entries.get(key)
        return None if e is None else e["traffic"]

    def keys(self) -> list[str]:
        return list(self._entries)

    def summary(self) -> dict[str, Any]:
        """How many steps were counted and replayed, which were counted, and any drift a recount found."""
        return {"counted": self.counted, "replayed": self.replayed, "keys": len(self._entries),
                "counted_steps": list(self.counted_steps), "drifts": [dict(d) for d in self.drifts],
                "recount_every": self.recount_every}

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "version": 1, "recount_every": self.recount_every, "max_keys": self.max_keys, "tolerance": self.tolerance,
            "entries": [[k, {"traffic": e["traffic"].to_dict(), "counted_at": e["counted_at"], "replays": e["replays"],
                             "confirmed": e["confirmed"]}] for k, e in self._entries.items()],
            "counted": self.counted, "replayed": self.replayed, "drifts": [dict(d) for d in self.drifts],
            "counted_steps": list(self.counted_steps),
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        from adaprec.errors import CheckpointError

        missing = [k for k in ("version", "entries", "counted", "replayed") if k not in d]
        if missing:
            raise CheckpointError(f"traffic book state is missing keys {missing}; was it written by TrafficBook.state_dict()?")
        entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        for k, e in d["entries"]:
            entries[str(k)] = {"traffic": StepTraffic.from_dict(e["traffic"]), "counted_at": int(e["counted_at"]), "replays": int(e["replays"]),
                               "confirmed": bool(e.get("confirmed", False))}
        self._entries = entries
        self.recount_every = int(d.get("recount_every", self.recount_every))
        self.max_keys = int(d.get("max_keys", self.max_keys))
        self.tolerance = float(d.get("tolerance", self.tolerance))
        self.counted, self.replayed = int(d["counted"]), int(d["replayed"])
        self.drifts = [dict(x) for x in d.get("drifts", [])]
        self.counted_steps = [int(s) for s in d.get("counted_steps", [])]

