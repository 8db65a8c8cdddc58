"""What autograd keeps for backward, stored in the plan's storage format.

Why: on an activation-heavy model most of the peak memory of a training step
is the tensors autograd saves for backward (norm and GELU inputs, softmax
outputs, the GEMMs' inputs), all fp32 even when the GEMMs run narrow.
:class:`SavedTensorStorage` installs ``torch.autograd.graph.saved_tensors_hooks``:
each tensor an op saves is packed in the storage format ``format_for(module,
role, tensor)`` names (``adaprec.formats.storage``) and unpacked when backward
reads it. Forward values are untouched; only what backward reads is rounded.

>>> storage = SavedTensorStorage("bf16", model=model)
>>> with storage:
...     loss = loss_fn(model(x), y)
>>> loss.backward()
>>> print(storage.stats())          # bytes kept for backward, by module, role and format

Which saved tensors are packed (a copy lowers the peak only if the original
is then freed; a copy of a tensor that stays alive anyway ADDS memory):

* kept as they are, decided when the op saves them (reason in the tally):
  ``not floating`` (indices, masks), ``small`` (under ``min_numel``
  elements: norm statistics, log-sum-exp), ``not a plain tensor`` (tensor
  subclasses, functorch wrappers, sparse, meta), ``parameter`` (a
  parameter or a view of one, ``w.t()``: alive anyway), ``no autograd
  history`` (buffers, the batch, constants, an op's non-differentiable
  outputs: mostly alive anyway, and nothing tells them apart),
  ``weight cast`` (a cast or view of a parameter, e.g. autocast's or the
  engine's cached bf16 weight: alive anyway in their cache, and
  batch-independent), ``already narrow`` (the tensor takes no more bits
  than the format), ``planned fp32`` (``format_for`` said None or fp32).
* everything else (activations only autograd holds) is packed, once per
  piece of memory: a tensor saved by several ops (softmax's output, read
  again by the next matmul) shares one packed copy (``shared``).
* ``alive anyway``: when backward first reads a saved tensor, every packed
  tensor whose original is still alive (the user holds it through backward,
  e.g. hidden states kept for a probe, or the model's output) trades its
  packed copy for the original: exact, and the copy's bytes are freed.
  (Not when the context exits: a tensor the caller drops between the
  forward and ``backward()`` would be kept wide for nothing.) Where only
  another tensor on the same memory is alive (a view the user holds), the
  version of the original cannot be checked: the copy stays, and the tally
  says so (``packed, memory alive``: those bytes count twice, as they cost).
  Measured in ``bench/bench_saved.py``; ``docs/memory.md`` has the figures.

A tensor modified in place after it was saved raises, as PyTorch does
without hooks (:class:`SavedTensorModifiedError`). ``torch.func`` transforms
refuse to run while any saved-tensor hooks are installed (PyTorch's rule):
run them under :meth:`SavedTensorStorage.paused`. ``torch.utils.checkpoint``
regions inside the context keep their own hooks (only the innermost pair
applies): they save nothing, and their recompute is unchanged; entered
inside such a region the context would take over its saves, so it refuses.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from adaprec.engine import saved_derive
from adaprec.engine.saved_bytes import DERIVED, PACKED, SavedBytes, SavedRow
from adaprec.errors import CheckpointError, SavedTensorModifiedError, UsageError
from adaprec.formats.storage import PackedTensor, StorageFormat, _codec_takes, pack, storage_format, unpack

__all__ = ["SavedTensorStorage", "FormatFor", "DEFAULT_MIN_NUMEL"]

FormatFor = Callable[[str | None, str | None, torch.Tensor], Any]
"""``(module name or None, role or None, tensor) -> storage format name (or spec), or None to keep it``."""

DEFAULT_MIN_NUMEL = 1 << 16  # 256 KiB in fp32: norm statistics and attention log-sum-exp stay exact

# autograd nodes that only cast or re-view their single input: a chain of them from a parameter is a weight cast
_CAST_OR_VIEW = frozenset({
    "ToCopyBackward0", "TBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
    "PermuteBackward0", "TransposeBackward0", "ExpandBackward0", "CloneBackward0", "AliasBackward0",
    "_CastOperandBackward", "SplitBackward0", "SplitWithSizesBackward0", "_OnBackwardBackward",
})
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype) or str(dtype).removeprefix("torch.")


def _weight_cast(node: Any) -> bool:
    """True if ``node`` is a short chain of casts/views whose one source is a parameter (AccumulateGrad)."""
    return saved_derive.leaf(node, _CAST_OR_VIEW, depth=8) is not None


class _Kept:
    """A saved tensor kept as it is; the version it had, to catch later in-place changes."""

    __slots__ = ("t", "version", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.version = t.detach(), t._version

    # as a packed handle has them: recipes over either read the same names (saved_derive)
    combined = False
    shape = property(lambda self: self.t.shape)
    dtype = property(lambda self: self.t.dtype)
    device = property(lambda self: self.t.device)

    def tensor(self) -> torch.Tensor:
        return self.t


_PIECE = 1 << 20  # elements packed at a time by scaled formats (4 MiB of fp32)


def _pack_pieces(t: torch.Tensor, spec: StorageFormat) -> list[PackedTensor]:
    """``pack(t, spec)`` a piece at a time, so its fp32 temporaries stay piece-sized.

    Why: a scaled format's pack makes several full-size fp32 temporaries
    (absolute value, quotient, rounding); on a 32 MiB activation that raised
    the forward peak and fragmented the heap more than the int8 codes saved
    (``bench/bench_saved.py``). Pieces end on whole rows (``/row``) or whole
    blocks (``/block<N>``), so the codes and scales are the ones packing the
    whole tensor gives; one scale per tensor (``/tensor``) and plain casts are
    packed whole. Not a codec: :mod:`adaprec.formats.storage` does the packing.
    """
    n = t.numel()
    if spec.granularity not in ("row", "block") or n <= _PIECE or t.dim() == 0 or _codec_takes(t, spec):
        return [pack(t, spec)]  # the C int8 codec packs in one pass without temporaries: whole
    if spec.granularity == "row":
        cols = t.shape[-1]
        rows = t.reshape(-1, cols)
        step = max(1, _PIECE // max(cols, 1))
        return [pack(rows[i:i + step], spec) for i in range(0, rows.shape[0], step)]
    flat, block = t.reshape(-1), int(spec.block_size or 1)
    step = max(1, _PIECE // block) * block
    return [pack(flat[i:i + step], spec) for i in range(0, n, step)]


def _unpack_pieces(pieces: list[PackedTensor], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    if len(pieces) == 1:
        t = unpack(pieces[0])
        t = t if t.dtype == dtype else t.to(dtype)
        return t if t.shape == shape else t.reshape(shape)
    out = torch.empty(shape, dtype=dtype, device=pieces[0].codes.device)
    flat, i = out.view(-1), 0
    for p in pieces:
        k = p.numel()
        flat[i:i + k].view(p.shape).copy_(unpack(p))
        i += k
    return out


class _Packed:
    """A saved tensor packed in a storage format (or, once found alive anyway, its original)."""

    __slots__ = ("packed", "original", "shape", "dtype", "device", "spec", "version", "ref", "sref", "key", "before",
                 "after", "__weakref__")
    combined = False  # a recipe with a residual add somewhere below it (_Derived): no second one over it

    def __init__(self, t: torch.Tensor, spec: Any, key: tuple) -> None:
        self.packed: list[PackedTensor] | None = _pack_pieces(t, spec)
        self._note(t, spec, key)
        self.after = sum(int(p.nbytes) for p in self.packed)

    def _note(self, t: torch.Tensor, spec: Any, key: tuple) -> None:
        self.original: torch.Tensor | None = None
        self.shape, self.dtype, self.device, self.spec, self.version = t.shape, t.dtype, t.device, spec, t._version
        self.ref = weakref.ref(t)  # to see, at the end of forward, whether the original outlived it
        self.sref = StorageWeakRef(t.untyped_storage())  # to share the copy only while the same memory lives
        self.key = key
        self.before = t.numel() * t.element_size()

    def keep_original(self, t: torch.Tensor) -> None:
        """The original outlived forward: hold it (exact) and let the copy go."""
        self.original, self.packed = t.detach(), None

    def tensor(self) -> torch.Tensor:
        if self.original is not None:
            return self.original
        assert self.packed is not None  # one of the two is always set
        return _unpack_pieces(self.packed, self.shape, self.dtype)


class _Derived(_Packed):
    """A saved tensor kept as a recipe: another saved tensor (``source``) and the cheap steps that made it from it
    (:mod:`adaprec.engine.saved_derive`); no bytes of its own."""

    __slots__ = ("source", "steps", "replays", "recipe", "combined")

    def __init__(self, t: torch.Tensor, spec: Any, key: tuple, source: Any, steps: tuple,
                 replays: saved_derive.ReplayCache, residual: bool) -> None:
        self.packed = None
        self._note(t, spec, key)
        self.after = 0
        self.source, self.steps, self.replays = source, steps, replays
        self.recipe = saved_derive.recipe_key(source, steps)
        self.combined = residual or source.combined  # ``residual``: its steps hold a residual add

    def keep_original(self, t: torch.Tensor) -> None:
        self.original, self.source, self.steps = t.detach(), None, ()

    def tensor(self) -> torch.Tensor:
        if self.original is not None:
            return self.original
        src = self.source
        value = self.replays.get(self.recipe, src)  # the same recipe read by another node in this backward
        if value is None:
            fresh = isinstance(src, _Packed) and src.original is None and not isinstance(src, _Derived)
            value = saved_derive.replay(src.tensor(), self.steps, owned=fresh)  # an unpacked copy is ours to change
            self.replays.put(self.recipe, src, value)
        return value


def _exact_enough(source: _Kept | _Packed, spec: Any) -> bool:
    """Whether values recomputed from ``source`` are kept at least as well as ``spec`` would keep them."""
    if isinstance(source, _Kept):
        return True
    return str(source.spec) == str(spec) or source.spec.bits_per_element > spec.bits_per_element


class _Modules:
    """The stack of modules running now (global forward hooks), named as in ``model.named_modules()``."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.stack: list[str | None] = []

    def pre(self, module: nn.Module, args: Any) -> None:
        name = self.names.get(id(module))
        self.stack.append(name if name is not None else (self.stack[-1] if self.stack else None))

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack:
            self.stack.pop()

    def current(self) -> str | None:
        return self.stack[-1] if self.stack else None


class _Roles(TorchFunctionMode):
    """Names the torch function the model called (``linear``, ``layer_norm``, ``gelu``...): the role.

    The outermost one: a torch function mode sees no call made inside the
    function it intercepts, so every save inside ``F.multi_head_attention_forward``
    has that role (its module names the rest).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        name = getattr(func, "__name__", None)
        if name is None or name.startswith("__"):  # attribute reads (``.shape``), operators: nothing to name
            return func(*args, **(kwargs or {}))
        was, self.current = self.current, name
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.current = was


class SavedTensorStorage:
    """Context manager: tensors autograd saves inside it are stored in ``format_for``'s storage format.

    ``format_for``: a storage format name for every saved tensor (``"bf16"``,
    ``"int8/row"``, ``"fp8_e4m3"``...), None to keep all as they are, or a
    callable ``(module, role, tensor) -> format or None``. ``module`` is the
    fully qualified name of the innermost module of ``model`` running the op
    (or what ``module_name()`` returns), ``role`` the torch function the
    model called (``"linear"``, ``"layer_norm"``, ``"gelu"``,
    ``"scaled_dot_product_attention"``...; None when ``roles=False``).
    ``min_numel``: smaller tensors are kept. ``sweep``: when backward starts,
    packed tensors whose original is still alive go back to the original
    (module docstring). ``derive``: tensors reached by cheap steps from a
    tensor saved earlier are kept as recipes (:mod:`adaprec.engine.saved_derive`);
    ``replay_cache_bytes`` bounds the recomputed values backward keeps for
    their next reader (0: none). ``enabled=False`` makes the context a no-op.

    Enter it around the whole forward pass, once per pass (not nested, not
    inside a checkpointed function); the tally of the latest pass is
    :meth:`stats`.
    """

    def __init__(
        self,
        format_for: FormatFor | str | None,
        *,
        model: nn.Module | None = None,
        module_name: Callable[[], str | None] | None = None,
        min_numel: int = DEFAULT_MIN_NUMEL,
        roles: bool = True,
        sweep: bool = True,
        derive: bool = True,
        replay_cache_bytes: int = saved_derive.REPLAY_CACHE_BYTES,
        enabled: bool = True,
    ) -> None:
        if model is not None and module_name is not None:
            raise UsageError("SavedTensorStorage: pass model= or module_name=, not both")
        if isinstance(format_for, str):
            storage_format(format_for)  # an unknown name fails here, not in the middle of a forward pass
        self.format_for = format_for
        self.model, self.module_name = model, module_name
        self.min_numel, self.roles, self.sweep, self.enabled = int(min_numel), roles, sweep, enabled
        self.derive = derive
        self._sources: dict[tuple, _Kept | _Packed] = {}  # (grad_fn, output_nr) -> handle, this pass only
        self._replays = saved_derive.ReplayCache(replay_cache_bytes)
        self._peeking = False
        self._peeked_packed = False
        self._specs: dict[Any, Any] = {}
        self._tally: dict[tuple, list[int]] = {}
        self._cache: weakref.WeakValueDictionary[tuple, _Packed] = weakref.WeakValueDictionary()
        self._live: list[weakref.ref[_Packed]] = []
        self._sweep_due = False
        self._exits: contextlib.ExitStack | None = None
        self._hooks: saved_tensors_hooks | None = None
        self._modules: _Modules | None = None
        self._role_mode: _Roles | None = None
        self.forwards = 0
        self.bytes_before_total = 0
        self.bytes_after_total = 0

    # --- context -------------------------------------------------------------------------
    def __enter__(self) -> SavedTensorStorage:
        if not self.enabled:
            return self
        if self._exits is not None:
            raise UsageError("SavedTensorStorage is already active: enter it once per forward pass, not nested")
        if torch._C._autograd._top_saved_tensors_default_hooks(True) is not None:
            raise UsageError("SavedTensorStorage entered inside other saved-tensor hooks (a torch.utils.checkpoint "
                             "region, save_on_cpu): it would take over their saves; enter it around the whole "
                             "forward pass instead")
        self._tally.clear()
        self._cache.clear()
        self._live = [r for r in self._live if r() is not None]  # an earlier pass's backward may still come
        exits = contextlib.ExitStack()
        try:
            if self.model is not None:
                self._modules = _Modules({id(m): n for n, m in self.model.named_modules()})
                exits.callback(register_module_forward_pre_hook(self._modules.pre).remove)
                exits.callback(register_module_forward_hook(self._modules.post, always_call=True).remove)
            if self.roles:
                self._role_mode = exits.enter_context(_Roles())
            self._hooks = saved_tensors_hooks(self._pack, self._unpack)
            exits.enter_context(self._hooks)
        except BaseException:
            exits.close()
            raise
        self._exits = exits
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._exits is None:
            return
        exits, self._exits = self._exits, None
        self._sources.clear()  # it holds graph nodes: none may outlive the pass
        exits.close()
        self._modules = self._role_mode = self._hooks = None
        self.forwards += 1
        s = self.stats()
        self.bytes_before_total += s.bytes_before
        self.bytes_after_total += s.bytes_after

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Saved tensors are kept as they are inside: e.g. for ``torch.func`` transforms, which refuse any hooks."""
        if self._exits is None or self._hooks is None:
            yield
            return
        top = torch._C._autograd._top_saved_tensors_default_hooks(True)
        if not top or top[0] != self._pack:
            raise UsageError("SavedTensorStorage.paused(): other saved-tensor hooks (e.g. a checkpoint region) are "
                             "installed above this context; pause outside that region")
        hooks = self._hooks
        hooks.__exit__(None, None, None)
        try:
            yield
        finally:
            hooks.__enter__()

    # --- the hooks -----------------------------------------------------------------------
    def _where(self) -> tuple[str | None, str | None]:
        if self.module_name is not None:
            module = self.module_name()
        else:
            module = self._modules.current() if self._modules is not None else None
        role = self._role_mode.current if self._role_mode is not None else None
        return module, role

    def _keep_reason(self, t: torch.Tensor) -> str | None:
        if (type(t) is not torch.Tensor and type(t) is not nn.Parameter) or t.layout != torch.strided or \
                t.is_meta or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return "not a plain tensor"
        if not t.is_floating_point():
            return "not floating"
        if t.numel() < self.min_numel:
            return "small"
        base = t._base if t._base is not None else t
        if base.requires_grad and base.grad_fn is None:  # a parameter (a leaf that trains), or a view of one
            return "parameter"
        node = t.grad_fn  # not the base's: a custom Function may return a view of a tensor it made without grad
        if node is None:  # made outside the graph: a buffer, the batch, a constant, a non-differentiable output
            return "no autograd history"
        if _weight_cast(node):
            return "weight cast"
        return None

    def _spec(self, module: str | None, role: str | None, t: torch.Tensor) -> Any:
        f = self.format_for
        name = f(module, role, t) if callable(f) else f
        if name is None:
            return None
        spec = self._specs.get(name)
        if spec is None:
            spec = self._specs[name] = storage_format(name)
        return None if spec.identity else spec

    def _count(self, key: tuple, before: int, after: int, tensors: int = 1) -> None:
        row = self._tally.get(key)
        if row is None:
            self._tally[key] = [tensors, before, after]
        else:
            row[0] += tensors
            row[1] += before
            row[2] += after

    def _pack(self, t: torch.Tensor) -> _Kept | _Packed:
        module, role = self._where()
        reason = self._keep_reason(t)
        spec = None
        if reason is None:
            spec = self._spec(module, role, t)
            if spec is None:
                reason = "planned fp32"
            elif t.element_size() * 8 <= spec.bits:
                reason = "already narrow"
                derived = self._derived(t, spec, module, role) if self.derive else None
                if derived is not None:  # kept as it is it would cost its bytes; recomputed it costs none
                    return self._register(t, derived, None)
        if reason is not None:
            n = t.numel() * t.element_size()
            self._count((module, role, _dtype_name(t.dtype), reason), n, n)
            kept = _Kept(t)
            if reason in ("planned fp32", "already narrow"):  # an activation held exactly: others may derive from it
                self._source(t, kept)
            return kept
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
               t._version, str(spec))
        hit = self._cache.get(key)
        if hit is not None and not hit.sref.expired():  # the same memory, saved again by another op
            self._count((module, role, hit.key[2], "shared"), 0, 0)
            self._source(t, hit)  # another view of it: what derives from this one finds it too
            return hit
        h = self._derived(t, spec, module, role) if self.derive else None
        if h is None:
            h = _Packed(t, spec, (module, role, str(spec), PACKED))
        return self._register(t, h, key)

    def _register(self, t: torch.Tensor, h: _Packed, key: tuple | None) -> _Packed:
        if key is not None:
            self._cache[key] = h
        self._count(h.key, h.before, h.after)
        self._source(t, h)
        if self.sweep:
            self._live.append(weakref.ref(h))
            self._sweep_due = True
        return h

    def _source(self, t: torch.Tensor, h: _Kept | _Packed) -> None:
        if self.derive and t.grad_fn is not None:
            self._sources[(t.grad_fn, t.output_nr)] = h

    def _derived(self, t: torch.Tensor, spec: Any, module: str | None, role: str | None) -> _Derived | None:
        """``t`` as a recipe over a tensor saved earlier in this pass, where one reaches it by cheap steps."""
        if not self._sources:
            return None
        self._peeking, self._peeked_packed = True, False
        try:
            found = saved_derive.find(t, self._sources, getattr,
                                      functions=spec.bits <= 8)  # rerun GELU / norms where they replace a quantize
        finally:
            self._peeking = False
        if found is None or self._peeked_packed:  # a norm's statistics packed: not exact enough to rerun from
            return None
        source, steps = found
        others = saved_derive.handles(steps)
        if any(h.device != t.device or not _exact_enough(h, spec) for h in [source, *others]):
            return None
        if others and any(h.combined for h in [source, *others]):
            return None  # residual adds over residual adds: each replay would rerun every layer below
        return _Derived(t, spec, (module, role, str(spec), DERIVED), source, steps, self._replays, bool(others))

    def _unpack(self, h: _Kept | _Packed) -> torch.Tensor:
        if self._peeking:  # a node's saved statistics read while packing (saved_derive): no sweep, nothing checked
            self._peeked_packed = self._peeked_packed or not isinstance(h, _Kept)
            return h.tensor()
        if self._sweep_due:
            self._do_sweep()
        if isinstance(h, _Kept):
            if h.t._version != h.version:
                raise SavedTensorModifiedError(
                    f"a tensor saved for backward ({_dtype_name(h.t.dtype)} {tuple(h.t.shape)}) was modified in "
                    f"place after it was saved (version {h.t._version}, saved at {h.version}); clone it before "
                    "modifying it, or modify a copy")
            return h.t
        if h.original is None:
            t = h.ref()
            if t is not None and t._version != h.version:
                raise SavedTensorModifiedError(
                    f"a tensor saved for backward ({_dtype_name(h.dtype)} {tuple(h.shape)}) was modified in place "
                    f"after it was saved (version {t._version}, saved at {h.version}); clone it before modifying "
                    "it, or modify a copy")
        elif h.original._version != h.version:
            raise SavedTensorModifiedError(
                f"a tensor saved for backward ({_dtype_name(h.dtype)} {tuple(h.shape)}) was modified in place after "
                f"it was saved (version {h.original._version}, saved at {h.version}); clone it before modifying it")
        return h.tensor()

    def _do_sweep(self) -> None:
        """Packed tensors whose original outlived forward: keep the original (exact), free the copy."""
        self._sweep_due = False
        live, self._live = self._live, []
        for r in live:
            h = r()
            if h is None or h.original is not None:
                continue
            module, role, fmt, _ = h.key
            t = h.ref()
            if t is not None and t._version == h.version:
                h.keep_original(t)
                self._count(h.key, -h.before, -h.after, tensors=-1)
                self._count((module, role, _dtype_name(h.dtype), "alive anyway"), h.before, h.before)
            elif not h.sref.expired():  # another tensor holds the memory: its version cannot be checked, keep the copy
                self._count(h.key, -h.before, -h.after, tensors=-1)
                self._count((module, role, fmt, "packed, memory alive"), h.before, h.before + h.after)

    # --- report and state --------------------------------------------------------------
    def stats(self) -> SavedBytes:
        """The bytes autograd kept for backward in the latest forward, before and after packing."""
        rows = [SavedRow(m, r, f, why, n, b, a) for (m, r, f, why), (n, b, a) in self._tally.items() if n]
        return SavedBytes(tuple(rows))

    def state_dict(self) -> dict[str, Any]:
        return {"forwards": self.forwards, "bytes_before_total": self.bytes_before_total,
                "bytes_after_total": self.bytes_after_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"forwards", "bytes_before_total", "bytes_after_total"} - set(state)
        if missing:
            raise CheckpointError(f"SavedTensorStorage state is missing {sorted(missing)}; pass the dict that "
                                  "state_dict() returned")
        self.forwards = int(state["forwards"])
        self.bytes_before_total = int(state["bytes_before_total"])
        self.bytes_after_total = int(state["bytes_after_total"])
