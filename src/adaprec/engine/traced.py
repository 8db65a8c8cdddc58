"""The ledger under ``torch.compile``: every GEMM a compiled graph runs is counted, with no graph break.

Eagerly, the engine appends each op's cost to the step's ledger as the op
runs. A compiled graph has no Python side effects, so a traced op instead
puts one call to the custom op ``adaprec::tally`` into the graph. It is
opaque to the compiler and runs each time the graph does, with the op's
real operands and a constant description of its call (which engine, which
module, which op, where its tensors go among the arguments). From those it
rebuilds the call and records it exactly as the eager path would: same
MACs (from the tensors' run-time shapes, so dynamic shapes are counted
right), same executed formats.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from adaprec.engine.ops import HANDLED, OpCall, describe

__all__ = ["register_recorder", "tally_in_graph"]

# recorder id -> (module name, call) -> None; a bound method, held weakly (an engine that is gone records nothing)
_RECORDERS: dict[int, weakref.WeakMethod] = {}
_NEXT_ID = [0]
# the handled ops by index, so a traced call names its op by a constant
_FUNCS: list[Any] = sorted(HANDLED, key=lambda f: (getattr(f, "__module__", "") or "", getattr(f, "__qualname__", repr(f))))
_FUNC_INDEX: dict[Any, int] = {f: i for i, f in enumerate(_FUNCS)}
_PARSED: dict[str, tuple[int, str, int, bool, list]] = {}


def register_recorder(record: Callable[[str, OpCall], None]) -> tuple[int, torch.Tensor]:
    """An id for ``record`` (a bound method: the engine's) that a graph can carry as a constant, and the
    tensor its tallies tick."""
    _NEXT_ID[0] += 1
    key = _NEXT_ID[0]
    _RECORDERS[key] = weakref.WeakMethod(record, lambda _ref: _RECORDERS.pop(key, None))  # type: ignore[arg-type]
    return key, torch.zeros((), dtype=torch.int64)


def _skeleton(args: tuple, kwargs: dict) -> tuple[list, list[torch.Tensor]]:
    """The call's arguments with each tensor replaced by (index, is a parameter, requires grad)."""
    tensors: list[torch.Tensor] = []

    def enc(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            tensors.append(v)
            return ["t", len(tensors) - 1, isinstance(v, nn.Parameter), v.requires_grad]
        if isinstance(v, (list, tuple)):
            return ["s", [enc(x) for x in v]]
        return ["v", v]

    return [[enc(a) for a in args], [[k, enc(v)] for k, v in kwargs.items()]], tensors


@torch._dynamo.assume_constant_result
def _meta(engine_id: int, name: str, func_index: int, grad: bool, skeleton: Any) -> str:
    return json.dumps([engine_id, name, func_index, grad, skeleton])


def _rebuild(skeleton: list, tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
    def dec(e: list) -> Any:
        if e[0] == "t":
            t = tensors[e[1]]
            if e[2]:
                return nn.Parameter(t, requires_grad=e[3])
            return t.requires_grad_(e[3]) if t.is_floating_point() or t.is_complex() else t
        if e[0] == "s":
            return [dec(x) for x in e[1]]
        return e[1]

    args, kwargs = skeleton
    return tuple(dec(a) for a in args), {k: dec(v) for k, v in kwargs}


@torch.library.custom_op("adaprec::tally", mutates_args=("tick",))
def _tally(tick: torch.Tensor, operands: list[torch.Tensor], meta: str) -> None:
    """Record one traced op's cost in its recorder's tally (runs each time the graph runs)."""
    tick.add_(1)
    parsed = _PARSED.get(meta)
    if parsed is None:
        parsed = _PARSED[meta] = tuple(json.loads(meta))  # type: ignore[assignment]
    recorder_id, name, func_index, grad, skeleton = parsed
    ref = _RECORDERS.get(recorder_id)
    record = ref() if ref is not None else None
    if record is None:
        return
    with torch.set_grad_enabled(grad):  # as the traced op saw it: it decides which gradient GEMMs run
        args, kwargs = _rebuild(skeleton, [t.detach() for t in operands])
        call = describe(_FUNCS[func_index], args, kwargs)
    if call is not None:
        record(name, call)


@_tally.register_fake
def _(tick: torch.Tensor, operands: list[torch.Tensor], meta: str) -> None:
    return None


def tally_in_graph(recorder_id: int, tick: torch.Tensor, name: str, func: Any, args: tuple, kwargs: dict) -> None:
    """Called while ``torch.compile`` traces an op: put the op's ledger entry into the graph."""
    skeleton, tensors = _skeleton(tuple(args), dict(kwargs))
    meta = _meta(recorder_id, name, _FUNC_INDEX[func], torch.is_grad_enabled(), skeleton)
    torch.ops.adaprec.tally(tick, [t.detach() for t in tensors], meta)
