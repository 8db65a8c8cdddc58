"""Saved tensors that are a cheap function of a tensor saved already: kept as a recipe, recomputed in backward.

Why: in a transformer block the same values are saved for backward several
times over. GELU saves its input and the next Linear saves GELU's output
(four times the model width each); a norm saves its input and the GEMM after
it saves its (cast, transposed, reshaped) output; attention saves its output
and the output projection saves a transposed copy. Packing each of them costs
bytes and a quantize pass. When a tensor to be saved is reached from a
tensor saved earlier in the same forward pass through nodes that are cheap to
run again (views, transposes, casts, contiguous copies, the identity nodes
adaprec's engine adds, GELU, layer norm), :func:`find` returns the steps;
the storage keeps the earlier tensor's handle and the steps, and backward
gets ``replay(earlier.tensor(), steps)``: the recompute that activation
checkpointing does, limited to elementwise and layout work, and to GEMMs
and bias adds whose other operand comes from a parameter. On bench_memory's
activation-heavy GPT with int8 saved tensors this keeps 38 -> 20 MiB per
layer with layout, GELU and norm steps, 20 -> 6 MiB with GEMMs (the FFN's
hidden state and attention's q, k, v) too. GELU, norms and GEMMs are rerun
only in place of a pack into 8-bit codes (a quantize pass); where packing is
a plain cast (bf16) rerunning them
cost more step time than the cast (default plan, side by side: encoder LM
79.5 -> 93.0 ms, BERT 242 -> 266 ms), so only layout and cast steps are.

The steps are read from the autograd graph at pack time (each node's saved
shapes, dims, GELU's ``approximate``, layer norm's mean, rstd, weight and
bias); nothing else is recorded during forward. Anything the walk does not
know ends it, and the tensor is packed as before.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from adaprec.errors import SavedTensorModifiedError

__all__ = ["Step", "find", "handles", "leaf", "replay", "recipe_key", "ReplayCache", "MAX_DEPTH", "REPLAY_CACHE_BYTES"]

MAX_DEPTH = 10
_SAME = frozenset({"AliasBackward0", "_OnBackwardBackward", "CloneBackward0"})  # same shape, dtype and values
_RESHAPE = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
_LAYOUT = _SAME | _RESHAPE | frozenset({"PermuteBackward0", "TransposeBackward0", "TBackward0", "ToCopyBackward0"})
_FUNCTIONS = frozenset({"GeluBackward0", "NativeLayerNormBackward0"})
# GEMMs with one activation operand (which input it is) and the other from a parameter: rerun from the activation
_GEMMS = {"AddmmBackward0": 1, "MmBackward0": 0}
# how a weight or bias operand is made from its parameter (casts, transposes, splits of a packed projection)
_TO_PARAMETER = frozenset({"ToCopyBackward0", "TBackward0", "_OnBackwardBackward", "AliasBackward0",
                           "SplitBackward0", "SplitWithSizesBackward0"})
REPLAY_CACHE_BYTES = 8 << 20  # recent recipe values kept in backward (ReplayCache)
_MAX_OPERAND = 1 << 16  # a bias made again from its parameter at pack time and held: small tensors only


@dataclass(frozen=True)
class Step:
    """One node to run again: its kind, the shape and dtype it produced, and what it needs."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    args: tuple[Any, ...] = ()


Edge = tuple[Any, int]
Read = Callable[[Any, str], Any]  # (node, saved attribute) -> value, without side effects on the storage


def _walk(edge: Edge, sources: dict[Edge, Any], functions: bool, empty: bool) -> tuple[Any, list[Any]] | None:
    """The handle of the saved tensor the edge's output derives from, and the nodes between them (its own
    first); ``empty``: the edge may be a source itself (no nodes)."""
    node, nr = edge
    nodes: list[Any] = []
    for _ in range(MAX_DEPTH):
        if node is None:
            return None
        src = sources.get((node, nr))
        if src is not None:
            return (src, nodes) if nodes or empty else None
        main = _main_input(type(node).__name__, node, functions)
        if main is None:
            return None
        nodes.append(node)
        node, nr = node.next_functions[main]
    return None


def _main_input(name: str, node: Any, functions: bool) -> int | None:
    """Which input of ``node`` the walk follows (the activation), or None where the node is not ours to rerun."""
    inputs = node.next_functions
    if name in _LAYOUT or (functions and name in _FUNCTIONS):
        main = 0
        if name != "NativeLayerNormBackward0" and any(f is not None for f, _ in inputs[1:]):
            return None  # a view or cast has one tensor input; anything else is not ours to rerun
    elif functions and name in _GEMMS:
        main = _GEMMS[name]
        if not all(f is None or leaf(f) is not None for i, (f, _) in enumerate(inputs) if i != main):
            return None  # the other operands must come from parameters
    elif functions and name == "AddBackward0" and len(inputs) == 2 and float(node._saved_alpha) == 1:
        from_parameter = [f is not None and leaf(f) is not None for f, _ in inputs]
        if from_parameter.count(True) > 1 or any(f is None for f, _ in inputs):
            return None
        main = from_parameter.index(False)  # a bias add, or a residual add (the other branch walked on its own)
    else:
        return None
    return main if len(inputs) > main and inputs[main][0] is not None else None


def leaf(node: Any, through: frozenset[str] = _TO_PARAMETER, depth: int = MAX_DEPTH) -> Any:
    """The AccumulateGrad node (a parameter) ``node``'s output comes from through a chain of one-input nodes
    named in ``through`` (by default casts, transposes and splits: how a weight or bias operand is made),
    at most ``depth`` long; None otherwise."""
    for _ in range(depth):
        if node is None or type(node).__name__ == "AccumulateGrad":
            return node
        if type(node).__name__ not in through:
            return None
        inputs = [f for f, _ in node.next_functions if f is not None]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def _operand(edge: Edge, dtype: torch.dtype) -> torch.Tensor | None:
    """The operand (a bias) as forward used it, made again from its parameter along the edge's casts,
    transposes and splits, and copied: backward gets forward's value whatever happens to the parameter
    in between, as it would from a packed tensor. None where it is large, the path has more than one cast,
    or the parameter is a tensor subclass (a sharded DTensor: its local piece is not the operand)."""
    path: list[Edge] = []
    node, nr = edge
    while type(node).__name__ != "AccumulateGrad":
        path.append((node, nr))
        node, nr = next(e for e in node.next_functions if e[0] is not None)
    x = node.variable.detach()
    if (type(x) is not torch.Tensor or x.numel() > _MAX_OPERAND
            or sum(type(n).__name__ == "ToCopyBackward0" for n, _ in path) > 1):
        return None
    for node, nr in reversed(path):
        name = type(node).__name__
        if name == "ToCopyBackward0":
            x = x.to(dtype)
        elif name == "TBackward0":
            x = x.t()
        elif name == "SplitBackward0":
            x = torch.split(x, int(node._saved_split_size), _dim(node._saved_dim, x.dim()))[nr]
        elif name == "SplitWithSizesBackward0":
            x = torch.split(x, [int(k) for k in node._saved_split_sizes], _dim(node._saved_dim, x.dim()))[nr]
    return x.clone() if x.dtype == dtype else None


def _dim(d: int, ndim: int) -> int:
    """A dim a node saved, made non-negative (torch 2.13 hands a saved -1 back as 2**64 - 1)."""
    d = int(d)
    if d >= 1 << 63:
        d -= 1 << 64
    return d % ndim


def _in_shape(name: str, node: Any, out: tuple[int, ...]) -> tuple[int, ...]:
    if name in _RESHAPE:
        return tuple(int(s) for s in node._saved_self_sym_sizes)
    if name == "PermuteBackward0":
        dims = [_dim(d, len(out)) for d in node._saved_dims]
        shape = [0] * len(out)
        for i, d in enumerate(dims):
            shape[d] = out[i]
        return tuple(shape)
    if name == "TransposeBackward0":
        shape = list(out)
        d0, d1 = _dim(node._saved_dim0, len(out)), _dim(node._saved_dim1, len(out))
        shape[d0], shape[d1] = shape[d1], shape[d0]
        return tuple(shape)
    if name == "TBackward0":
        return tuple(reversed(out))
    if name == "AddmmBackward0":
        return tuple(int(s) for s in node._saved_mat1_sym_sizes)
    if name == "MmBackward0":
        return tuple(int(s) for s in node._saved_self_sym_sizes)
    return out


def _args(name: str, node: Any, shape: tuple[int, ...], dtype: torch.dtype, read: Read) -> tuple[Any, ...] | None:
    if name == "PermuteBackward0":
        return (tuple(_dim(d, len(shape)) for d in node._saved_dims),)
    if name == "TransposeBackward0":
        return (_dim(node._saved_dim0, len(shape)), _dim(node._saved_dim1, len(shape)))
    if name == "GeluBackward0":
        return (node._saved_approximate,)
    if name == "NativeLayerNormBackward0":
        mean, rstd = read(node, "_saved_result1"), read(node, "_saved_result2")
        weight, bias = read(node, "_saved_weight"), read(node, "_saved_bias")
        if mean is None or rstd is None:
            return None
        return (mean, rstd, weight, bias)
    if name in _GEMMS:
        return _gemm_args(name, node, dtype, read)
    if name == "AddBackward0":
        main = _main_input(name, node, True)
        operand = _operand(node.next_functions[1 - main], dtype) if main is not None else None
        return None if operand is None else (operand,)
    return ()


def _gemm_args(name: str, node: Any, dtype: torch.dtype, read: Read) -> tuple[Any, ...] | None:
    """(weight operand, its version, bias operand or None): the weight as the GEMM saved it (a kept cast of a
    parameter, checked for in-place changes at replay as autograd checks it), the bias made again from its
    parameter now (addmm does not save it)."""
    if name == "AddmmBackward0" and (float(node._saved_alpha) != 1 or float(node._saved_beta) != 1):
        return None
    mat2 = read(node, "_saved_mat2")
    if mat2 is None:
        return None
    bias = None
    if name == "AddmmBackward0":  # a bias without autograd history (frozen) cannot be made again: not rerun
        bias = _operand(node.next_functions[0], dtype) if node.next_functions[0][0] is not None else None
        if bias is None:
            return None
    return (mat2, mat2._version, bias)


def find(t: torch.Tensor, sources: dict[Edge, Any], read: Read,
         functions: bool = True) -> tuple[Any, tuple[Step, ...]] | None:
    """``(handle, steps)`` if ``t`` can be recomputed from a tensor saved earlier in this pass, else None.

    ``sources``: (grad_fn, output_nr) of each tensor saved so far -> its handle (anything with the saved
    tensor's ``shape`` and ``dtype``, and ``tensor()`` for its value). ``read``: a node's saved
    attribute (layer norm's statistics and affine parameters). ``functions=False``: layout and cast steps
    only (no GELU, no layer norm, no GEMM), for where packing is a plain cast and rerunning them would cost
    more. A residual add of two saved tensors' recipes is one step (``ResidualAdd``: the other branch's
    handle and steps), at most one per recipe.
    """
    return _find((t.grad_fn, t.output_nr), tuple(t.shape), t.dtype, sources, read, functions, empty=False)


def _find(edge: Edge, shape: tuple[int, ...], dtype: torch.dtype | None, sources: dict[Edge, Any], read: Read,
          functions: bool, empty: bool, residual: bool = True) -> tuple[Any, tuple[Step, ...]] | None:
    """``find`` from a graph edge whose output has ``shape`` and ``dtype`` (None: not in the graph, as for one
    operand of an add that promotes; then the source's, and no cast may lie between)."""
    found = _walk(edge, sources, functions, empty)
    if found is None:
        return None
    src, nodes = found
    if dtype is None:
        if any(type(n).__name__ == "ToCopyBackward0" for n in nodes):
            return None
        dtype = src.dtype
    steps: list[Step] = []
    casts = 0
    for node in nodes:  # from the edge's output down to the source: each node's output shape and dtype
        name = type(node).__name__
        if name == "ToCopyBackward0":
            casts += 1
            if casts > 1:  # the dtype between two casts is not in the graph
                return None
        if name == "AddBackward0" and not any(leaf(f) is not None for f, _ in node.next_functions):
            other = _find(node.next_functions[1], shape, None, sources, read, functions, empty=True,
                          residual=False) if residual else None
            if other is None:
                return None  # a second residual add in one recipe: its replay would grow with depth
            steps.append(Step("ResidualAdd", shape, dtype, other))
            residual = False
            continue
        try:
            args = _args(name, node, shape, dtype, read)
            in_shape = _in_shape(name, node, shape)
        except (ValueError, OverflowError):  # a saved attribute torch cannot hand back
            return None
        if args is None:
            return None
        steps.append(Step(name, shape, dtype, args))
        shape = in_shape
        if name == "ToCopyBackward0":
            dtype = src.dtype
    if shape != tuple(src.shape) or dtype != src.dtype:
        return None
    return src, tuple(reversed(steps))


def handles(steps: tuple[Step, ...]) -> list[Any]:
    """The other saved tensors a recipe's residual adds read (besides its source)."""
    return [s.args[0] for s in steps if s.kind == "ResidualAdd"]


def _layer_norm(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, owned: bool) -> torch.Tensor:
    """The norm's output from its input and the statistics forward computed; in place where ``x`` is ours
    (a freshly unpacked fp32 tensor: one full-size allocation fewer per step)."""
    y = x.sub_(mean) if owned and x.dtype == mean.dtype else x.to(mean.dtype) - mean
    y.mul_(rstd)
    if weight is not None:
        y.mul_(weight.to(y.dtype))
    if bias is not None:
        y.add_(bias.to(y.dtype))
    return y.to(x.dtype)


def _gemm(x: torch.Tensor, mat2: torch.Tensor, mat2_version: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The GEMM forward ran, again, from its activation operand."""
    if mat2._version != mat2_version:
        raise SavedTensorModifiedError(
            f"a weight a GEMM saved for backward ({tuple(mat2.shape)}) was modified in place before backward "
            f"recomputed the GEMM's output (version {mat2._version}, saved at {mat2_version}); step the optimizer "
            "after backward, or modify a copy")
    return torch.mm(x, mat2) if bias is None else torch.addmm(bias, x, mat2)


def _value(handle: Any) -> torch.Tensor:
    """A handle's value (``tensor()``); a plain tensor stands for itself."""
    return handle if isinstance(handle, torch.Tensor) else handle.tensor()


def replay(x: torch.Tensor, steps: tuple[Step, ...], owned: bool = False) -> torch.Tensor:
    """The saved tensor again, from its source's value: the steps :func:`find` read, in forward order.

    ``owned``: ``x`` is a fresh tensor no one else holds (a source just unpacked), so steps may run in place.
    """
    with torch.no_grad():
        for s in steps:
            if s.kind in _RESHAPE:
                x = x.reshape(s.shape)
            elif s.kind == "PermuteBackward0":
                x = x.permute(s.args[0])
            elif s.kind == "TransposeBackward0":
                x = x.transpose(*s.args)
            elif s.kind == "TBackward0":
                x = x.t()
            elif s.kind == "ToCopyBackward0":
                owned = owned or x.dtype != s.dtype
                x = x.to(s.dtype)
            elif s.kind == "GeluBackward0":
                x, owned = F.gelu(x, approximate=s.args[0]), True
            elif s.kind == "NativeLayerNormBackward0":
                x, owned = _layer_norm(x, *s.args, owned=owned), True
            elif s.kind in _GEMMS:
                x, owned = _gemm(x, *s.args), True
            elif s.kind == "AddBackward0":
                x = x.add_(s.args[0]) if owned else x + s.args[0]
            elif s.kind == "ResidualAdd":
                other = replay(_value(s.args[0]), s.args[1])
                x, owned = x + other, True
        return x.contiguous()


def recipe_key(source: Any, steps: tuple[Step, ...]) -> tuple:
    """What makes two recipes the same value: one source handle, the same steps with the same arguments."""
    return (id(source),) + tuple((s.kind, s.shape, s.dtype, _arg_key(s.args)) for s in steps)


def _arg_key(a: Any) -> Any:
    """A hashable stand-in for a step's argument: a tensor by its memory and version (the graph hands back a
    new wrapper of the same parameter on each read), tuples and steps element by element, a handle by
    identity."""
    if isinstance(a, torch.Tensor):
        return (a.data_ptr(), a.storage_offset(), tuple(a.shape), a.stride(), a.dtype, a._version)
    if isinstance(a, Step):
        return (a.kind, a.shape, a.dtype, _arg_key(a.args))
    if isinstance(a, tuple):
        return tuple(_arg_key(x) for x in a)
    if a is None or isinstance(a, (bool, int, float, str, torch.dtype)):
        return a
    return ("handle", id(a))


class ReplayCache:
    """Recent recipe values, bounded in bytes, each dropped when the handle it was recomputed from is freed.

    Why: one recomputed tensor is read several times in backward. Attention's
    q, k and v projections each save their own copy of the norm's output (three
    recipes over the norm's input, one value) and q, k and v are recipes over
    those: without the cache the norm reruns six times per layer in backward.
    Values are only ever read (autograd does not write what it saved, and a
    replay never works in place on a recipe's value), so one copy serves every
    reader. The bound caps what backward holds beyond what it would hold
    anyway (``REPLAY_CACHE_BYTES``; 0 turns it off), and no value over half
    of it is kept, so one large value does not push out the small ones read
    most (measured on the activation-heavy GPT: an 8 MiB fp32 residual
    pushing out the 4 MiB norm outputs cost 8 % of the step).
    """

    def __init__(self, max_bytes: int = REPLAY_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, tuple[weakref.ref[Any], torch.Tensor, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()  # a weak reference callback may come back in while a put holds it

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: tuple, source: Any) -> torch.Tensor | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0]() is not source:
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: tuple, source: Any, value: torch.Tensor) -> None:
        n = value.numel() * value.element_size()
        if 2 * n > self.max_bytes:  # one value may not push out all the others
            return
        with self._lock:
            self._drop(key)
            while self._entries and self._bytes + n > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[key] = (weakref.ref(source, lambda _, key=key: self.discard(key)), value, n)
            self._bytes += n

    def discard(self, key: tuple) -> None:
        with self._lock:
            self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[2]
