"""The bytes a training step moves, op by op, by module, phase, op class and dtype.

The ledger used to count only GEMM operands. A step also moves the bytes of
every other op (elementwise, norms, softmax, casts, reductions, embedding
gathers), of what autograd keeps for backward (written in forward, read back
by the backward ops), and of the optimizer's reads and writes. This module
sees them all from below: :class:`TrafficCounter` is a
``TorchDispatchMode`` that, for every aten op of the step, adds the bytes of
its tensor inputs (read) and outputs (written) in the dtype each really had
(the rules per op: :mod:`adaprec.energy.op_rules`; the definition:
docs/energy.md, "Bytes moved"). It costs Python time on every op:
:class:`adaprec.energy.traffic_book.TrafficBook` runs it on some steps only
and replays its count on the rest.

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
import contextvars
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adaprec.energy.counting import CountingError, StepCost
from adaprec.energy.op_rules import OpRule, distinct_elements, dtype_label, rule_of

__all__ = ["TrafficCounter", "StepTraffic", "PHASES", "OUTSIDE", "BACKWARD", "OPTIMIZER", "uncounted"]

_UNCOUNTED: contextvars.ContextVar[bool] = contextvars.ContextVar("adaprec_uncounted", default=False)


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    """Ops inside are left out of every count: adaprec's one-off tables (stochastic-rounding noise), built by
    whichever step first needs them, are no step's traffic (and a resumed run would count them elsewhere)."""
    token = _UNCOUNTED.set(True)
    try:
        yield
    finally:
        _UNCOUNTED.reset(token)

# Pseudo-module names for ops no module of the model ran.
OUTSIDE = "(outside)"  # forward ops outside every module of the model (e.g. the loss), and their backward
BACKWARD = "(backward)"  # backward ops whose autograd node no counted forward created
OPTIMIZER = "(optimizer)"  # optimizer ops on tensors of no known parameter

_ACCUMULATE_GRAD_SEQ = 2**64 - 1  # the sequence number autograd gives AccumulateGrad nodes


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

    def plus(self, other: StepTraffic | None) -> StepTraffic:
        """This count and ``other``'s together (e.g. a step's forward and backward, and an optimizer update)."""
        if other is None:
            return self
        counts = dict(self.counts)
        for k, n in other.counts.items():
            counts[k] = counts.get(k, 0) + n
        calls = dict(self.calls)
        for k, n in other.calls.items():
            calls[k] = calls.get(k, 0) + n
        unclassified = dict(self.unclassified)
        for k, n in other.unclassified.items():
            unclassified[k] = unclassified.get(k, 0) + n
        return StepTraffic(counts, {**other.kinds, **self.kinds}, calls, unclassified)

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

    @property
    def active(self) -> bool:
        """Whether the counter is counting now (inside ``with counter:``)."""
        return self._active

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

    def running(self, module: nn.Module) -> None:
        """Say that ``module`` is already running (counting began inside its forward, e.g. from its own
        forward pre-hook): its ops are attributed to it until its forward returns."""
        if not self._active:
            raise CountingError("running(module) is for a counter that is counting: enter it first")
        self._enter_module(module, ())

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
        if _UNCOUNTED.get():
            return out
        rule = rule_of(func)
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

    def _count(self, rule: OpRule, func: Any, args: tuple, kwargs: dict, out: Any, phase: str,
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
                n = distinct_elements(t) if n is None else n
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
                n = distinct_elements(t) if n is None else n
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
