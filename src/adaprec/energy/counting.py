"""Count the GEMMs and memory traffic a training step actually runs, per module.

Counting is by shapes seen in forward hooks, not by guessing from the model
definition, so a layer that is skipped, frozen or fed an input without grad
is counted as it ran. Backward GEMMs are recorded when the gradient of the
module's output actually arrives (a tensor hook on the output), and only the
ones autograd computes: the input-gradient GEMM only if the input requires
grad, the weight-gradient GEMM only if the weight does.

Attention written as ``F.scaled_dot_product_attention`` inside a named
module is seen by a ``TorchFunctionMode``. A mode intercepts every torch
call in Python, so inside :meth:`MacCounter.watching_sdpa` (the controller
enters it around each forward pass) it is entered only while a module that
may call SDPA is running, by that module's own forward hooks: the rest of
the model runs at full speed. Only SDPA calls inside a named module are
counted anyway. Standalone use (``with MacCounter(...):``) keeps the mode on
between attach and detach.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from adaprec.errors import AdaprecError

__all__ = ["GemmCost", "ModuleCost", "StepCost", "MacCounter", "GEMMS", "OPERAND_ROLES", "BYTE_ROLES"]

GEMMS = ("forward", "input_grad", "weight_grad")
OPERAND_ROLES = ("weight", "activation", "grad_output")
# Roles whose element counts become bytes moved; each is priced at the
# storage format of the same-named role of the plan.
BYTE_ROLES = ("weight", "activation", "grad_output", "grad_weight", "optimizer_state")


class CountingError(AdaprecError, ValueError):
    """A module name given to :class:`MacCounter` that the model does not have."""


@dataclass(frozen=True)
class GemmCost:
    """One GEMM that ran: which of the three, how many MACs, the roles of its operands."""

    gemm: str
    macs: int
    a_role: str
    b_role: str
    op: str = ""  # what it computes inside the module (e.g. "qk", "pv", "in_proj")

    def key(self) -> tuple[str, int, str, str, str]:
        return (self.gemm, self.macs, self.a_role, self.b_role, self.op)


@dataclass
class ModuleCost:
    """All GEMMs and element traffic of one module in one step."""

    kind: str
    gemms: list[GemmCost] = field(default_factory=list)
    elements: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_ROLES, 0))

    @property
    def macs(self) -> int:
        return sum(g.macs for g in self.gemms)

    def add_elements(self, role: str, n: int) -> None:
        self.elements[role] = self.elements.get(role, 0) + int(n)

    def key(self) -> tuple:
        return (
            self.kind,
            tuple(sorted(_merge(self.gemms))),
            tuple(sorted(self.elements.items())),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "gemms": [list(g.key()) for g in self.gemms],
            "elements": dict(self.elements),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModuleCost:
        return cls(
            kind=d["kind"],
            gemms=[GemmCost(g[0], int(g[1]), g[2], g[3], g[4]) for g in d["gemms"]],
            elements={k: int(v) for k, v in d["elements"].items()},
        )


def _merge(gemms: Iterable[GemmCost]) -> list[tuple[str, int, str, str, str]]:
    """Sum MACs of GEMMs that differ only in MACs, so repeated calls collapse."""
    acc: dict[tuple[str, str, str, str], int] = {}
    for g in gemms:
        k = (g.gemm, g.a_role, g.b_role, g.op)
        acc[k] = acc.get(k, 0) + g.macs
    return [(k[0], m, k[1], k[2], k[3]) for k, m in acc.items()]


@dataclass
class StepCost:
    """Plain data: per module name, the GEMMs and element counts of one step."""

    modules: dict[str, ModuleCost] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        return sum(m.macs for m in self.modules.values())

    def macs_by_gemm(self) -> dict[str, int]:
        out = dict.fromkeys(GEMMS, 0)
        for m in self.modules.values():
            for g in m.gemms:
                out[g.gemm] += g.macs
        return out

    def elements(self) -> dict[str, int]:
        out = dict.fromkeys(BYTE_ROLES, 0)
        for m in self.modules.values():
            for r, n in m.elements.items():
                out[r] = out.get(r, 0) + n
        return out

    def signature(self) -> tuple:
        """A hashable summary: equal signatures price identically under one plan."""
        return tuple(sorted((name, m.key()) for name, m in self.modules.items()))

    def to_dict(self) -> dict[str, Any]:
        return {name: m.to_dict() for name, m in self.modules.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepCost:
        return cls({name: ModuleCost.from_dict(m) for name, m in d.items()})


def _first_tensor(args: Any) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


def _mha_inputs(args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """(query, key, value) of an ``nn.MultiheadAttention`` call, positional or keyword."""
    names = ("query", "key", "value")
    got = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]):]]
    return tuple(got) if all(isinstance(t, torch.Tensor) for t in got) else ()


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "other"


class _SdpaMode(TorchFunctionMode):
    """Sees ``F.scaled_dot_product_attention`` calls and hands them to the counter."""

    def __init__(self, counter: MacCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            self.counter._on_sdpa(args, kwargs, out)
        return out


class MacCounter:
    """Records, per named module and per step, the GEMMs and traffic that ran.

    Usage::

        counter = MacCounter(model, ["fc1", "fc2"])
        counter.attach()
        loss = model(x).sum(); loss.backward()
        cost = counter.pop_step_cost()      # StepCost, and the tally restarts
        counter.detach()

    Supported: ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding`` (a gather:
    bytes but no MACs), ``nn.MultiheadAttention`` (projections and both
    attention GEMMs) and any other module that calls
    ``F.scaled_dot_product_attention``. Other named modules count nothing.
    """

    def __init__(self, model: nn.Module, module_names: Iterable[str]) -> None:
        self.model = model
        self.module_names = list(module_names)
        mods = dict(model.named_modules())
        missing = [n for n in self.module_names if n not in mods]
        if missing:
            raise CountingError(
                f"modules {missing} are not in the model; pass names from model.named_modules()"
            )
        self._modules = {n: mods[n] for n in self.module_names}
        self._handles: list[Any] = []
        self._mode: _SdpaMode | None = None
        self._watch = any(_kind(m) == "other" for m in self._modules.values())
        # inside watching_sdpa(): the mode is entered while a module that may call SDPA runs
        self._scoped = False
        self._scope_depth = 0
        self._scope_mode: _SdpaMode | None = None
        self._stack: list[str] = []
        self._cost = StepCost()

    # --- lifecycle -------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @contextlib.contextmanager
    def watching_sdpa(self) -> Iterator[None]:
        """Count SDPA calls inside this block (a no-op when no module calls SDPA)."""
        if not self._watch or self._mode is not None:
            yield
            return
        self._scoped = True
        try:
            yield
        finally:
            self._scoped = False

    def _enter_scope(self, module: nn.Module, args: Any) -> None:
        if self._scoped:
            if self._scope_depth == 0:
                self._scope_mode = _SdpaMode(self)
                self._scope_mode.__enter__()
            self._scope_depth += 1

    def _exit_scope(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._scope_depth:  # always_call: runs even when the forward raised, so no mode is left behind
            self._scope_depth -= 1
            if self._scope_depth == 0 and self._scope_mode is not None:
                self._scope_mode.__exit__(None, None, None)
                self._scope_mode = None

    def attach(self, watch_sdpa: bool = True) -> MacCounter:
        """Register the hooks; with ``watch_sdpa``, also enter the SDPA-watching mode until detach. Idempotent."""
        if self.attached:
            return self
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(
                module.register_forward_hook(self._post(name), with_kwargs=True, always_call=True)
            )
            if _kind(module) == "other":
                self._handles.append(module.register_forward_pre_hook(self._enter_scope))
                self._handles.append(module.register_forward_hook(self._exit_scope, always_call=True))
        if watch_sdpa:
            self._mode = _SdpaMode(self)
            self._mode.__enter__()
        return self

    def detach(self) -> None:
        """Remove every hook and leave the mode."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        self._stack.clear()

    def __enter__(self) -> MacCounter:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def pop_step_cost(self) -> StepCost:
        """Everything counted since the last pop; the tally starts again empty."""
        cost, self._cost = self._cost, StepCost()
        return cost

    def state_dict(self) -> dict[str, Any]:
        return {"module_names": list(self.module_names), "pending": self._cost.to_dict()}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        if list(d.get("module_names", [])) != self.module_names:
            raise CountingError(
                "MacCounter state is for other modules "
                f"({d.get('module_names')!r} vs {self.module_names!r}); build the counter with the same names"
            )
        self._cost = StepCost.from_dict(d.get("pending", {}))

    # --- recording -------------------------------------------------------
    def _entry(self, name: str) -> ModuleCost:
        mc = self._cost.modules.get(name)
        if mc is None:
            mc = self._cost.modules[name] = ModuleCost(_kind(self._modules[name]))
        return mc

    def _pre(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            self._stack.append(name)

        return hook

    def _post(self, name: str):
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            if isinstance(output, tuple):
                out = output[0]
            else:
                out = output
            if not isinstance(out, torch.Tensor):
                return
            if isinstance(module, nn.MultiheadAttention):
                self._mha(name, module, _mha_inputs(args, kwargs), out)
            elif isinstance(module, nn.Linear):
                self._linear(name, module, args, out)
            elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                self._conv(name, module, args, out)
            elif isinstance(module, nn.Embedding):
                self._embedding(name, module, args, out)

        return hook

    def _on_backward(self, out: torch.Tensor, name: str, gemms: list[GemmCost], elements: dict[str, int]) -> None:
        """Record ``gemms`` and ``elements`` when ``out``'s gradient arrives."""
        if not (torch.is_grad_enabled() and out.requires_grad):
            return

        def hook(grad: torch.Tensor) -> None:
            mc = self._entry(name)
            mc.gemms.extend(gemms)
            for r, n in elements.items():
                mc.add_elements(r, n)

        out.register_hook(hook)

    @staticmethod
    def _trainable(params: Iterable[torch.nn.Parameter | None]) -> int:
        return sum(p.numel() for p in params if p is not None and p.requires_grad)

    def _matmul_layer(
        self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor, macs: int
    ) -> None:
        """Forward, input-grad and weight-grad GEMMs of a layer ``out = x @ W``."""
        w: torch.Tensor = module.weight  # type: ignore[assignment]
        params = [p for p in module._parameters.values() if p is not None]  # parameters(recurse=False), cheaper
        n_params = sum(p.numel() for p in params)
        mc = self._entry(name)
        mc.gemms.append(GemmCost("forward", macs, "activation", "weight"))
        mc.add_elements("weight", n_params)
        mc.add_elements("activation", x.numel() + out.numel())
        gemms: list[GemmCost] = []
        elements = {"grad_output": out.numel()}
        if x.requires_grad:
            gemms.append(GemmCost("input_grad", macs, "grad_output", "weight"))
            elements["weight"] = n_params
            elements["grad_output"] += x.numel()  # the input gradient written
        if w.requires_grad:
            gemms.append(GemmCost("weight_grad", macs, "grad_output", "activation"))
            elements["activation"] = x.numel()
        trainable = self._trainable(params)
        if trainable:
            elements["grad_weight"] = trainable
            elements["optimizer_state"] = trainable
        self._on_backward(out, name, gemms, elements)

    def _linear(self, name: str, module: nn.Linear, args: Any, out: torch.Tensor) -> None:
        x = _first_tensor(args)
        if x is None:
            return
        rows = x.numel() // module.in_features
        self._matmul_layer(name, module, x, out, rows * module.in_features * module.out_features)

    def _conv(self, name: str, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        x = _first_tensor(args)
        if x is None:
            return
        w: torch.Tensor = module.weight  # type: ignore[assignment]
        # each output element is a dot product of length C_in/groups * prod(kernel)
        self._matmul_layer(name, module, x, out, out.numel() * (w.numel() // w.shape[0]))

    def _embedding(self, name: str, module: nn.Embedding, args: Any, out: torch.Tensor) -> None:
        idx = _first_tensor(args)
        mc = self._entry(name)
        mc.add_elements("weight", out.numel())  # the rows gathered
        mc.add_elements("activation", out.numel() + (idx.numel() if idx is not None else 0))
        w = module.weight
        if w.requires_grad:
            dense = not module.sparse
            grad_elems = w.numel() if dense else out.numel()
            self._on_backward(
                out,
                name,
                [],
                {"grad_output": out.numel(), "grad_weight": grad_elems, "optimizer_state": w.numel()},
            )

    def _attention_gemms(
        self, mc: ModuleCost, batch: int, L: int, S: int, e_qk: int, e_v: int
    ) -> list[GemmCost]:
        """Forward QK^T and PV into ``mc``; return the four backward GEMMs."""
        qk = batch * L * S * e_qk
        pv = batch * L * S * e_v
        mc.gemms.append(GemmCost("forward", qk, "activation", "activation", "qk"))
        mc.gemms.append(GemmCost("forward", pv, "activation", "activation", "pv"))
        # dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q (all computed by the fused kernels)
        return [
            GemmCost("input_grad", pv, "grad_output", "activation", "dp"),
            GemmCost("input_grad", pv, "grad_output", "activation", "dv"),
            GemmCost("input_grad", qk, "grad_output", "activation", "dq"),
            GemmCost("input_grad", qk, "grad_output", "activation", "dk"),
        ]

    def _on_sdpa(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        owner = self._sdpa_owner()
        if owner is None:
            return
        q = args[0] if args else kwargs["query"]
        k = args[1] if len(args) > 1 else kwargs["key"]
        v = args[2] if len(args) > 2 else kwargs["value"]
        L, e_qk = q.shape[-2], q.shape[-1]
        S, e_v = k.shape[-2], v.shape[-1]
        batch = math.prod(q.shape[:-2])
        mc = self._entry(owner)
        back = self._attention_gemms(mc, batch, L, S, e_qk, e_v)
        mc.add_elements("activation", q.numel() + k.numel() + v.numel() + out.numel())
        n_in = q.numel() + k.numel() + v.numel()
        self._on_backward(out, owner, back, {"grad_output": out.numel() + n_in, "activation": n_in})

    def _sdpa_owner(self) -> str | None:
        """The innermost named module running, unless an MHA (counted by shape) encloses it."""
        for name in self._stack:
            if _kind(self._modules[name]) == "mha":
                return None
        return self._stack[-1] if self._stack else None

    def _mha(self, name: str, m: nn.MultiheadAttention, args: Any, out: torch.Tensor) -> None:
        if len(args) < 3:
            return
        query, key, value = args[0], args[1], args[2]
        if query.dim() == 2:  # unbatched (L, E)
            N, L, S = 1, query.shape[0], key.shape[0]
        elif m.batch_first:
            N, L, S = query.shape[0], query.shape[1], key.shape[1]
        else:
            N, L, S = query.shape[1], query.shape[0], key.shape[0]
        E, kdim, vdim = m.embed_dim, m.kdim, m.vdim
        proj = [("q", N * L * E * E, query), ("k", N * S * kdim * E, key), ("v", N * S * vdim * E, value)]
        S_eff = S + (1 if m.bias_k is not None else 0) + (1 if m.add_zero_attn else 0)
        mc = self._entry(name)
        back: list[GemmCost] = []
        in_w = m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
        w_trainable = in_w is not None and in_w.requires_grad
        grad_out_elems = out.numel()
        for tag, macs, x in proj:
            mc.gemms.append(GemmCost("forward", macs, "activation", "weight", f"in_proj_{tag}"))
            if x.requires_grad:
                back.append(GemmCost("input_grad", macs, "grad_output", "weight", f"in_proj_{tag}"))
            if w_trainable:
                back.append(GemmCost("weight_grad", macs, "grad_output", "activation", f"in_proj_{tag}"))
        back += self._attention_gemms(mc, N * m.num_heads, L, S_eff, E // m.num_heads, E // m.num_heads)
        out_macs = N * L * E * E
        mc.gemms.append(GemmCost("forward", out_macs, "activation", "weight", "out_proj"))
        back.append(GemmCost("input_grad", out_macs, "grad_output", "weight", "out_proj"))
        if m.out_proj.weight.requires_grad:
            back.append(GemmCost("weight_grad", out_macs, "grad_output", "activation", "out_proj"))
        params = list(m.parameters())
        n_params = sum(p.numel() for p in params)
        qkv_elems = N * (L + 2 * S_eff) * E
        inputs = query.numel() + key.numel() + value.numel()
        mc.add_elements("weight", n_params)
        # inputs read, q/k/v written then read, attention output written then read, output written
        mc.add_elements("activation", inputs + 2 * qkv_elems + 2 * N * L * E + out.numel())
        trainable = self._trainable(params)
        elements = {
            "grad_output": grad_out_elems + 2 * qkv_elems + N * L * E,
            "weight": n_params,
            "activation": inputs + qkv_elems + N * L * E,
        }
        if trainable:
            elements["grad_weight"] = trainable
            elements["optimizer_state"] = trainable
        self._on_backward(out, name, back, elements)
