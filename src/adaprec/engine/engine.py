"""The engine: makes a live model compute under a PrecisionPlan, op by op, and counts what ran.

A ``TorchFunctionMode``, active only inside :meth:`PrecisionEngine.activate`,
sees every matmul-like op the model calls (:mod:`adaprec.engine.ops`),
whoever calls it: ``nn.Linear``, Hugging Face ``Conv1D``'s ``addmm``, an
attention function called from a helper, an ``einsum`` in user code. Each
op is attributed to a module (:mod:`adaprec.engine.sites`), run as the
plan says for that module (:mod:`adaprec.engine.execution`: natively where
the device has the format, emulated otherwise) and recorded, GEMM by GEMM,
with the format it executed in. Ops of modules the plan does not cover run
in fp32 and are recorded too, with the reason: every MAC is in the ledger.

The first forward pass discovers the modules that run GEMMs (the plan's
modules); the controller hears of each through ``on_new_site`` and can set
the policy up before that module's first op runs.

Swapping the plan is an attribute assignment: nothing is re-wrapped, and the
optimizer never sees a new parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from adaprec.energy.counting import GemmCost, StepCost
from adaprec.energy.traffic_book import input_signature
from adaprec.engine.autograd import cast_grad, cast_operand, on_backward
from adaprec.engine.cast import RecipeCaster, stream_seed
from adaprec.engine.execution import FP32_EXEC, Backend, Capabilities, Exec, ExecMode, decide
from adaprec.engine.gemm import GemmContext, LinearExec, RoleCast, planned_linear
from adaprec.engine.hooks import WeakHook
from adaprec.engine.native import fp8_linear
from adaprec.engine.ops import HANDLED, OPERANDS, OpCall, describe, is_param_like
from adaprec.engine.quant import NoiseTable, Scratch
from adaprec.engine.replay import StepReplay
from adaprec.engine.sites import Site, SiteMap
from adaprec.engine.tally import StepTally
from adaprec.engine.traced import register_recorder, tally_in_graph
from adaprec.errors import ModuleNotSupportedError, PlanError
from adaprec.formats import Rounding, compiled, format_of_dtype
from adaprec.plan import FP32, ROLES, ModulePrecision, PrecisionPlan

__all__ = ["PrecisionEngine", "BACKENDS", "ModuleFilter"]

BACKENDS = tuple(b.value for b in Backend)
ModuleFilter = Callable[[nn.Module, str], bool]
_ROLE_INDEX = {r: i for i, r in enumerate(ROLES)}
_STEP_STRIDE = 0x9E3779  # odd: consecutive steps read the noise table at well-spread offsets
_LINEAR_FUNCS = {F.linear}
_ADDMM = set(f for f in (torch.addmm, getattr(torch.Tensor, "addmm", None)) if f is not None)
_MHA = {F.multi_head_attention_forward}
_MHA_WEIGHT_ARGS = (5, 11)
_MHA_WEIGHT_KWARGS = ("q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj_weight", "in_proj_weight")
# keyword names the GEMM operands of any handled op may be passed under
_OPERAND_KEYWORDS = tuple(dict.fromkeys(k for spec in OPERANDS.values() for _, k in spec if k != "self"))


def _positions(func: Any, default: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The argument positions of ``func``'s GEMM operands (:data:`adaprec.engine.ops.OPERANDS`)."""
    spec = OPERANDS.get(func)
    return default if spec is None else tuple(i for i, _ in spec)
_FP32_LINEAR = LinearExec(RoleCast("fp32", FP32), RoleCast("fp32", FP32), RoleCast("fp32", FP32), FP32, False)
_OBSERVE_LINEAR = Exec(ExecMode.PLANNED, FP32_EXEC.formats, FP32_EXEC.storage, linear=_FP32_LINEAR)
_OBSERVE_OTHER = Exec(ExecMode.EMULATE, FP32_EXEC.formats, FP32_EXEC.storage)


def _from_compiled_graph() -> bool:
    """Whether the op was called by the code torch.compile generated (inductor calls ``torch.addmm(..., out=buf)``).

    That graph's GEMMs were planned and counted when it was traced; seen again as it runs they would
    be counted twice, as nobody's.
    """
    frame = sys._getframe(2)
    return frame is not None and frame.f_code.co_filename.startswith(_inductor_dirs())


@functools.cache
def _inductor_dirs() -> tuple[str, ...]:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        d = cache_dir()
        return (d, os.path.realpath(d))
    except Exception:  # pragma: no cover - torch without inductor
        return ("\x00",)


# ops that read a module's bf16 output in fp32 while outputs flow narrow, as autocast's fp32 op list does
# for losses (and its CUDA list for softmax): their reductions and exponentials need fp32's range and bits
_FP32_FUNCS = frozenset({
    F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.kl_div,
    F.binary_cross_entropy, F.binary_cross_entropy_with_logits, F.softmax, F.log_softmax,
    torch.softmax, torch.log_softmax, torch.Tensor.softmax, torch.Tensor.log_softmax,
})


class _Mode(TorchFunctionMode):
    def __init__(self, engine: PrecisionEngine) -> None:
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in _FP32_FUNCS and self.engine._flowing:  # a loss or softmax of a bf16 output: in fp32
            args, kwargs = _widen16(args, kwargs or {})
            return func(*args, **kwargs)
        if func not in HANDLED or (kwargs and "out" in kwargs and _from_compiled_graph()):
            return func(*args, **(kwargs or {}))
        return self.engine._dispatch(func, args, kwargs or {})


_CKPT_CODES: dict[Any, bool] | None = None


def _reentrant_codes() -> dict[Any, bool]:
    """The code objects of reentrant checkpointing's forward (False) and backward (True: the recompute)."""
    global _CKPT_CODES
    if _CKPT_CODES is None:
        try:
            from torch.utils.checkpoint import CheckpointFunction

            _CKPT_CODES = {CheckpointFunction.forward.__code__: False, CheckpointFunction.backward.__code__: True}
        except (ImportError, AttributeError):  # pragma: no cover - another torch
            _CKPT_CODES = {}
    return _CKPT_CODES


def checkpoint_region() -> tuple[Any, str, bool] | None:
    """The ``torch.utils.checkpoint`` region running the current op: (region, kind, recompute?), or None.

    Why: a checkpointed block runs twice, in its forward and again in backward
    (the recompute); the engine must run the recompute in the formats and with
    the stochastic-rounding noise of the first run, or the saved values differ.
    Non-reentrant checkpointing is seen by its saved-tensor hooks (the frame
    they close over is the region), reentrant checkpointing by its autograd
    function's frame (its ``ctx`` is the region).
    """
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    if hooks:
        pack = hooks[0]
        pack = getattr(pack, "__wrapped__", pack)
        code = getattr(pack, "__code__", None)
        if code is not None and pack.__closure__:
            for name, cell in zip(code.co_freevars, pack.__closure__, strict=False):
                if name == "frame":
                    return cell.cell_contents, "non-reentrant", False
                if name == "target_frame_ref":
                    return cell.cell_contents(), "non-reentrant", True
    if torch.is_grad_enabled() and torch._C._current_autograd_node() is None:
        return None  # reentrant checkpointing runs its forward without grad and its recompute in backward
    codes = _reentrant_codes()
    f = sys._getframe(1)
    while f is not None:
        rec = codes.get(f.f_code)
        if rec is not None:
            return f.f_locals.get("ctx"), "reentrant", rec
        f = f.f_back
    return None


def _under_transform(args: Any) -> bool:
    """Whether an operand is a tensor of a running torch.func transform."""
    if torch.compiler.is_compiling():
        return False
    try:
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    except AttributeError:  # pragma: no cover - another torch
        return False
    return any(isinstance(a, torch.Tensor) and wrapped(a) for a in args)


def _float_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _widen16(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call's ``args`` and ``kwargs`` with 16-bit float tensors widened to fp32: an op planned fp32 (or emulated
    in fp32) that meets the 16-bit output of a narrow module runs in fp32, as autocast widens the inputs of its
    fp32 ops (on one Xeon, CPU flash attention's backward ran 8x slower in bf16 than in fp32 at nanoGPT's
    shapes). A model the user keeps in 16 bits (a 16-bit weight and no fp32 tensor among them) is left alone."""
    every = (*args, *kwargs.values())
    flat = [t for a in every for t in (a if isinstance(a, (list, tuple)) else (a,)) if _float_tensor(t)]
    narrow = [t for t in flat if t.dtype in (torch.bfloat16, torch.float16)]
    if not narrow or (len(narrow) == len(flat) and any(is_param_like(t) for t in narrow)):
        return args, kwargs

    def widen(a: Any) -> Any:
        if _float_tensor(a) and a.dtype in (torch.bfloat16, torch.float16):
            return a.float()
        if isinstance(a, (list, tuple)) and any(_float_tensor(t) for t in a):
            return type(a)(widen(t) for t in a)
        return a

    return tuple(widen(a) for a in args), {k: widen(v) for k, v in kwargs.items()}


class PrecisionEngine:
    """Applies plans to ``model`` and records every GEMM it runs.

    Args:
        model: the model; its parameters stay fp32 (they are the master weights).
        backend: ``"auto"`` runs a format natively where the device probe
            found it native and faster than fp32, emulates it otherwise;
            ``"native"`` runs natively wherever a kernel exists (even slower);
            ``"emulate"`` quantizes in fp32 arithmetic everywhere (research mode).
        module_filter: ``(module, fqn) -> bool``; False keeps a module out of
            every plan (its GEMMs run in fp32 and are counted as not covered).
        seed: seed of the stochastic-rounding streams (mixed with step, module, role, call).
        compile: run the emulation casts as fused ``torch.compile`` kernels (identical bits).
        capabilities: what the device runs natively and fast (from
            :func:`adaprec.hardware.probe`); None: nothing narrow is native
            (everything emulated), as on a device never probed.
        quantize_embeddings: embeddings (gathers, no GEMM) enter plans unpinned;
            by default the controller pins them to fp32.

    Attribute ``observer``, when set, is called as ``observer(module, role,
    tensor, recipe)`` on sampled steps before each cast (the health monitor).
    ``on_new_site(name)`` is called when an op of a not yet seen module runs.
    """

    def __init__(
        self,
        model: nn.Module,
        backend: str = "auto",
        module_filter: ModuleFilter | None = None,
        seed: int = 0,
        compile: bool = False,
        capabilities: Capabilities | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise PlanError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.model = model
        self.backend = backend
        self.seed = int(seed)
        self.compile = bool(compile)
        self.caps = capabilities or Capabilities()
        self.module_filter = module_filter
        self.map = SiteMap(model)
        self.sites: dict[str, Site] = {}
        self._index: dict[str, int] = {}
        self.plan = PrecisionPlan()
        self.observer: Callable[[str, str, torch.Tensor, Any], None] | None = None
        self.on_new_site: Callable[[str], None] | None = None
        self.sampling = False
        self.step = 0
        self.discovering = True
        self._active = False
        # observe fp32 modules on sampled steps (a policy that may narrow them needs their statistics)
        self.observe_fp32 = True
        self._calls: dict[str, int] = {}
        # checkpoint region -> (module -> call indices of its first run, module -> recompute position, region)
        self._region_calls: dict[int, tuple[dict[str, list[int]], dict[str, int], Any]] = {}
        self._in_backward = False
        self.grad_ops = 0  # ops of the model run with gradients on (or checkpointed) in this activation
        self.nograd_ops = 0  # and without (evaluation)
        # record backward GEMMs when they run (the controller, which runs backward, turns it on); off: at
        # forward time, as a counting pass that runs no backward needs (explain)
        self.probe_backward = False
        self._swapped: dict[int, tuple[str, torch.Tensor]] = {}  # tensors functional_call swapped into modules
        self._unowned: set[int] = set()
        self._casters: dict[tuple[str, str], RecipeCaster] = {}
        self._exec_cache: dict[tuple, Exec] = {}
        self._notes: set[str] = set()
        # what ran this step, GEMM by GEMM (the public seam: explain and compiled graphs record through it)
        self.tally = StepTally(lambda name: self.sites.get(name))
        self._faults: list[tuple[str, str, Any]] = []
        self._weight_cache: dict[Any, Any] = {}
        self._cast_cache: dict[Any, torch.Tensor] = {}
        self.scratch = Scratch()
        self.noise = NoiseTable(self.seed)
        self.emulated_seen: dict[str, set[str]] = {}  # format -> modules that emulated it
        self.tally_id, self.tally_tick = register_recorder(self.record_traced)
        # steps that run nothing narrow: counted once, replayed after, the mode off (engine/replay.py)
        self.replay = StepReplay()
        self.fast_path = True
        self._plan_fp32 = False
        self._flowing = False  # some module of the plan hands on a 16-bit output (set_plan)
        self._fast: str | None = None  # None | "armed" | "replaying" | "counting"
        self._step_key: Any = None
        self._late: _Mode | None = None
        self._root_sigs: list[str] = []  # the model's calls in this step, by input signature
        self._root_hook = self.map.model.register_forward_pre_hook(WeakHook(self._root_call), with_kwargs=True)
        self.step_tensor = torch.zeros((), dtype=torch.int64)  # the step as compiled graphs read it
        self.map.hook(None)  # every module until the first forward pass has shown which ones run GEMMs

    # --- sites ------------------------------------------------------------------------
    @property
    def kinds(self) -> dict[str, str]:
        """Covered modules in the order their first GEMM ran -> op kind (``linear``, ``attention``, ...)."""
        return {n: s.kind for n, s in self.sites.items() if s.covered}

    @property
    def uncovered(self) -> dict[str, str]:
        """Modules whose GEMMs run fp32 outside every plan -> why."""
        return {n: s.reason for n, s in self.sites.items() if not s.covered}

    @property
    def module_index(self) -> dict[str, int]:
        """Module -> its position in discovery order (mixed into stochastic-rounding seeds)."""
        return self._index

    def _new_site(self, name: str, call: OpCall) -> Site:
        kind = call.site_kind
        site = Site(name, {kind}, has_weight_op=call.weight is not None)
        module = self.map.modules.get(name)
        if kind == "rnn":
            site.covered, site.reason = False, (
                f"fused recurrent kernel ({call.func_name}): counted by hand, runs fp32; "
                "to narrow it, write the cell with nn.Linear"
            )
        elif self.module_filter is not None and module is not None and not self.module_filter(module, name):
            site.covered, site.reason = False, "excluded by module_filter"
        elif not self.discovering:
            site.covered, site.reason = False, (
                f"first ran at step {self.step}, after the plan was set up: runs fp32 for the rest of this run. "
                "To cover it, call ap.prepare(example_batch) with a batch that runs it, before the first ap.step()"
            )
        self.sites[name] = site
        self._index[name] = len(self._index)
        if not site.covered:
            self.note(
                f"{name or '<root>'} ({type(module).__name__ if module is not None else '?'}) runs "
                f"{call.func_name} in fp32: {site.reason}"
            )
        elif self.on_new_site is not None:
            self.on_new_site(name)
        return site

    def end_forward(self) -> None:
        """After the first forward pass: keep the module stack only where attribution needs it."""
        if not self.discovering:
            return
        self.discovering = False
        need = {n for n, s in self.sites.items() if not s.has_weight_op}
        need |= self.map.shared_owners() & set(self.sites)
        self.map.hook(need)

    def note(self, message: str) -> None:
        """Tell the user once per distinct message."""
        if message not in self._notes:
            self._notes.add(message)
            warnings.warn(f"adaprec: {message}", stacklevel=3)

    def remove(self) -> None:
        """Detach every hook (the model is left exactly as it was)."""
        self.map.unhook()
        self._root_hook.remove()

    # --- plan ---------------------------------------------------------------------------
    def set_plan(self, plan: PrecisionPlan) -> None:
        """Make ``plan`` the one in force from the next op on (cheap)."""
        stray = [n for n in plan.modules if n not in self.map.modules]
        if stray:
            raise ModuleNotSupportedError(
                f"plan names modules the model does not have: {stray}. Modules that run GEMMs: "
                f"{list(self.kinds)}; build plans with PrecisionPlan.uniform(ap.engine.kinds, ...)"
            )
        off = [n for n in plan.modules if n in self.sites and not self.sites[n].covered]
        if off:
            raise ModuleNotSupportedError(
                "plan names modules adaprec does not run under a plan: "
                + "; ".join(f"{n}: {self.sites[n].reason}" for n in off)
            )
        self.plan = plan
        # decide every site's execution now, not inside a compiled graph (a cache filled while tracing
        # would fail the graph's guards once more after each plan change)
        fp32 = True
        for name, site in self.sites.items():
            mp = plan.modules.get(name) if site.covered else None
            for kind in site.kinds:
                for weight_op in (True, False):
                    fp32 = self._exec_for(name, kind, mp, weight_op).mode == ExecMode.FP32 and fp32
        self._plan_fp32 = fp32
        # some module hands on a 16-bit output: an op planned wider may then meet a 16-bit input
        self._flowing = any(mp.output != "fp32" for mp in plan.modules.values())

    def begin_step(self, step: int, sampling: bool) -> None:
        self.step = step
        self.step_tensor.fill_(step)
        self.sampling = sampling
        self._calls.clear()
        self._region_calls.clear()
        self._weight_cache.clear()
        self._cast_cache.clear()
        self.tally.pending.clear()

    @property
    def active(self) -> bool:
        """Whether a forward pass is running under the plan (inside :meth:`activate`)."""
        return self._active

    @property
    def counting(self) -> bool:
        """Whether the ops that run are counted in the step's tally."""
        return self.tally.counting

    @counting.setter
    def counting(self, on: bool) -> None:
        self.tally.counting = on

    @contextlib.contextmanager
    def activate(self, enabled: bool = True) -> Iterator[None]:
        """Ops inside run under the plan in force (and are counted)."""
        if not enabled:
            yield
            return
        self._active = True
        self.grad_ops = self.nograd_ops = 0
        self._swapped, self._unowned = {}, set()
        fast = (self.fast_path and self._plan_fp32 and not self.discovering and not self.sampling
                and self.counting and not torch.compiler.is_compiling())
        try:
            if fast:  # the mode goes on at the model's first call, unless the step replays a counted one
                self._fast, self._step_key = "armed", None
                yield
            else:
                self._fast = None
                with _Mode(self):
                    yield
        finally:
            if self._late is not None:
                self._late.__exit__(None, None, None)
                self._late = None
            if self._fast == "armed":
                self._fast = None  # the model never ran: nothing to count or replay
            self._active = False
            self._swapped, self._unowned = {}, set()
            self.end_forward()

    def _root_call(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """The model's forward starts: replay the counted step with these inputs, or count this one."""
        if self._fast is None:
            return
        grad = torch.is_grad_enabled()
        sig = input_signature(args, kwargs)
        if self._fast == "counting":
            self._root_sigs.append(sig)
            return
        if self._fast == "replaying":
            if self._root_sigs and self._root_sigs[0] == sig:  # a call the counted step made too
                self._root_sigs.pop(0)
                return
            self._fast = None  # a call it did not make: counted on top, and the key counted afresh next time
            self.replay.forget(self._step_key)
        else:  # armed: the step's first call
            key = (self.plan, grad, sig)
            hit = self.replay.lookup(key) if grad and not self.tally.cost.modules else None
            if hit is not None:
                cost, sigs = hit
                self._fast, self._step_key, self._root_sigs = "replaying", key, list(sigs[1:])
                self.tally.cost = cost
                self.grad_ops += 1  # a training forward (evaluation passes are always counted)
                return
            self._fast, self._step_key, self._root_sigs = "counting", key if grad else None, [sig]
        self._late = _Mode(self)
        self._late.__enter__()

    @contextlib.contextmanager
    def backward_scope(self) -> Iterator[None]:
        """The backward pass of a step: a checkpointed block recomputed inside runs under the plan, as its
        forward did, and is counted; every other op in backward runs as it is.

        Why module hooks: torch does not carry a torch-function mode into the
        backward pass, and a recompute (``torch.utils.checkpoint``, either mode)
        runs the block's modules again there; a global forward hook puts the
        engine's mode around each module run during backward.
        """
        if self._active or self._fast == "replaying":  # the mode is on already / the step replays its count
            yield
            return
        depth = [0]
        modes: list[_Mode] = []

        def enter(module: nn.Module, args: Any) -> None:
            if depth[0] == 0:
                mode = _Mode(self)
                mode.__enter__()
                modes.append(mode)
            depth[0] += 1

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            depth[0] -= 1
            if depth[0] == 0 and modes:
                modes.pop().__exit__(None, None, None)

        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        handles = (register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True))
        self._in_backward = True
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            while modes:
                modes.pop().__exit__(None, None, None)
            self._in_backward = False
            self.map.stack.clear()

    @contextlib.contextmanager
    def not_counted(self) -> Iterator[None]:
        """Ops inside run under the plan but are left out of the step's cost."""
        was, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = was

    # --- accounting ---------------------------------------------------------------------
    def commit_backward(self) -> None:
        """The backward pass ran: its GEMMs that waited for it join the step's cost, and the weight casts go.

        The casts were kept from the forward for backward's GEMMs; held on until the next step began, they sat
        beside the optimizer step's own temporaries (a narrow copy of every weight: 96 MiB in int8 for a 101 M
        parameter model). A second micro-batch before the step casts its weights again (as autocast does).
        """
        self.tally.commit_backward()
        self._region_calls.clear()
        self._weight_cache.clear()
        self._cast_cache.clear()

    def pop_step_cost(self) -> StepCost:
        """Everything counted (or replayed) since the last pop; the tally starts again empty."""
        cost = self.tally.pop()
        if self._fast == "counting" and self._step_key is not None:
            self.replay.store(self._step_key, cost, self._root_sigs)
        self._fast, self._step_key = None, None
        return cost

    def pop_faults(self) -> list[tuple[str, str]]:
        """(module, role) whose tensors held inf/NaN when cast this step (one sync, here only)."""
        faults, self._faults = self._faults, []
        out: list[tuple[str, str]] = []
        tensors = [(m, r, a) for m, r, a in faults if isinstance(a, torch.Tensor)]
        out += [(m, r) for m, r, a in faults if not isinstance(a, torch.Tensor)]
        if tensors:
            bad = ~torch.stack([a.detach().float().amax().reshape(()).to("cpu") for _, _, a in tensors]).isfinite()
            out += [(m, r) for (m, r, _), b in zip(tensors, bad.tolist(), strict=True) if b]
        return sorted(set(out))

    @contextlib.contextmanager
    def apart(self) -> Iterator[StepCost]:
        """Run passes inside under the plan, counted on their own (evaluation): the step in progress,
        its call indices, caches, faults and sampling are left exactly as they were.

        Yields the cost the passes inside add up to (complete when the block exits).
        """
        saved = (self.sampling, self._calls, self._region_calls, self._faults, self._weight_cache, self._cast_cache,
                 self._fast, self._step_key)
        self.sampling = False
        self._calls, self._region_calls, self._faults, self._weight_cache, self._cast_cache = {}, {}, [], {}, {}
        try:
            with self.tally.apart() as cost:
                yield cost
        finally:
            (self.sampling, self._calls, self._region_calls, self._faults, self._weight_cache,
             self._cast_cache, self._fast, self._step_key) = saved

    def record_traced(self, name: str, call: OpCall) -> None:
        """Record a call a compiled graph ran (:mod:`adaprec.engine.traced`), as the eager path would."""
        if self.counting:
            mp, ex = self.resolve(name, call.site_kind, call.weight is not None)
            self.tally.record(name, call, ex, mp)

    # --- dispatch -----------------------------------------------------------------------
    def _dispatch(self, func, args, kwargs):
        if torch.compiler.is_compiling():  # a graph is traced from a training forward: no checkpoint regions
            call = describe(func, args, kwargs)
            name = None if call is None else self.map.owner(call.weight)
            if name is None:
                return func(*args, **kwargs)
            self.grad_ops += 1
            return self._dispatch_call(func, args, kwargs, call, name, None)
        region = checkpoint_region() if self._regions_possible() else None
        recompute = region is not None and region[2]
        if not recompute and torch._C._current_autograd_node() is not None:
            return func(*args, **kwargs)  # inside a backward pass (adaprec's own GEMMs, hooks): not the model's
        call = describe(func, args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        name = self._owner(call.weight)
        if name is None:
            return func(*args, **kwargs)  # not inside this model (e.g. the loss function)
        if region is None and not torch.is_grad_enabled():
            recompute = True  # evaluation inside the forward context: not measured by the monitors
            self.nograd_ops += 1
        else:
            self.grad_ops += 1
        if not recompute:
            return self._dispatch_call(func, args, kwargs, call, name, region)
        was = self.sampling
        self.sampling = False  # the recompute is not measured twice
        try:
            return self._dispatch_call(func, args, kwargs, call, name, region)
        finally:
            self.sampling = was

    def _owner(self, weight: torch.Tensor | None) -> str | None:
        """The module running the op; a weight swapped in by ``torch.func.functional_call`` is its module's."""
        if weight is not None and id(weight) not in self.map.owners:
            key = id(weight)
            hit = self._swapped.get(key)
            if (hit is None or hit[1] is not weight) and key not in self._unowned:
                # rebuilt on a miss only, once per unknown tensor and forward pass
                self._swapped = {id(p): (n, p) for n, m in self.map.modules.items()
                                 for p in m._parameters.values() if p is not None}
                hit = self._swapped.get(key)
                if hit is None:
                    self._unowned.add(key)
            if hit is not None and hit[1] is weight:
                return hit[0]
        return self.map.owner(weight)

    def _regions_possible(self) -> bool:
        return (torch._C._autograd._top_saved_tensors_default_hooks(True) is not None
                or not torch.is_grad_enabled() or torch._C._current_autograd_node() is not None)

    def _call_index(self, name: str, region: tuple[Any, str, bool] | None) -> int:
        """The call's index in its module this step (mixed into the noise); a recompute replays the first run's."""
        if region is not None:
            key, _, recompute = region
            fwd, pos, _ = self._region_calls.setdefault(id(key), ({}, {}, key))
            if recompute:
                i = pos.get(name, 0)
                pos[name] = i + 1
                seen = fwd.get(name, ())
                if i < len(seen):
                    return seen[i]
        n_call = self._calls.get(name, 0)
        self._calls[name] = n_call + 1
        if region is not None and not region[2]:
            self._region_calls[id(region[0])][0].setdefault(name, []).append(n_call)
        return n_call

    def _probes(self, func, args, kwargs, call: OpCall) -> dict[int, GemmCost] | None:
        """Operand position -> backward GEMM, for ops whose backward GEMMs can be seen as they run."""
        if kwargs or len(call.gemms) != 1 or func is torch.einsum or torch.compiler.is_compiling() \
                or not torch.is_grad_enabled():
            return None
        positions = _positions(func)
        if len(positions) != 2 or len(args) <= max(positions):
            return None
        return {}

    def _probed(self, name: str, func, positions: tuple[int, ...], probes: dict[int, GemmCost]):
        """``func`` with a probe on each operand whose gradient GEMM the ledger records when it runs."""
        def run(*args, **kwargs):
            args = list(args)
            originals = list(args)
            for j, cost in probes.items():
                i = positions[j]
                a = args[i]
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    args[i] = self._probe(name, a, cost, originals[positions[1 - j]])
            return func(*args, **kwargs)

        return run

    def _dispatch_call(self, func, args, kwargs, call: OpCall, name: str, region):
        site = self.sites.get(name)
        kind = call.site_kind
        if site is None:
            site = self._new_site(name, call)
        elif kind not in site.kinds:
            site.kinds.add(kind)
        mp, ex = self.resolve(name, kind, call.weight is not None)
        if mp is not None and not mp.is_fp32 and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args[:3]):
            self.note(f"{name or '<root>'} computes in float64 and the plan narrows it to "
                      f"{ex.formats['forward'][0]}; to keep it in float64, leave it out of the plan: "
                      f"module_filter=lambda module, name: name != {name!r}")
        probes = None
        runner = func
        # a non-reentrant recompute may stop before an op runs (early stop): count its GEMMs once they ran
        deferred = region is not None and region[1] == "non-reentrant" and region[2]
        if self.counting:
            if torch.compiler.is_compiling():  # the graph records it each time it runs (no side effect here)
                tally_in_graph(self.tally_id, self.tally_tick, name, func, args, kwargs)
            elif deferred:  # its graph is never backpropagated: only its forward GEMMs run
                real = self._real_dtype_exec(args) if ex.mode == ExecMode.FP32 else ex
                try:
                    out = self._execute(name, func, args, kwargs, kind, mp, ex, region, func)
                except Exception as e:
                    # torch stops the recompute at the block's last saved tensor: torch's kernels save their
                    # inputs before they run, adaprec's own kernels save the weight after their GEMM ran
                    if ex.mode in (ExecMode.PLANNED, ExecMode.FP8) and type(e).__name__ == "_StopRecomputationError":
                        self.tally.record(name, call, real, mp, backward=False)
                    raise
                self.tally.record(name, call, real, mp, backward=False)
                return out
            else:
                probes = self._probes(func, args, kwargs, call) if self.probe_backward else None
                real = self._real_dtype_exec(args) if ex.mode == ExecMode.FP32 else ex
                self.tally.record(name, call, real, mp, backward=True if probes is None else probes)
        if probes:
            positions = _positions(func)
            if ex.mode in ("planned", "fp8"):
                # adaprec's own kernels run every backward GEMM autograd asked for at forward time whenever
                # their backward runs: a hook on the output's node records them then (no view, no extra node)
                runner = functools.partial(self._hooked, name, list(probes.values()))
            else:  # probe the operands as the op reads them (after any cast)
                runner = self._probed(name, func, positions, probes)
        return self._execute(name, func, args, kwargs, kind, mp, ex, region, runner)

    def _execute(self, name, func, args, kwargs, kind, mp, ex: Exec, region, runner):
        if isinstance(runner, functools.partial):  # record the backward GEMMs by a hook on the output's node
            out = self._execute(name, func, args, kwargs, kind, mp, ex, region, func)
            return runner(out)
        if ex.mode in ("planned", "fp8") and _under_transform(args):
            raise ModuleNotSupportedError(
                f"{name or '<root>'} runs under a torch.func transform (vmap, grad, jacrev, ...) with a plan that "
                f"puts it in adaprec's own {ex.formats['forward'][0]} GEMM kernels, which torch.func cannot "
                "transform (their autograd function has no vmap rule). Run the transform outside ap.autocast(), "
                "or under a plan of bf16/fp16/fp32 modules, which run torch's own kernels"
            )
        if self._flowing and ex.mode in (ExecMode.FP32, ExecMode.EMULATE):
            args, kwargs = _widen16(args, kwargs)
        if ex.mode == ExecMode.FP32:
            return runner(*args, **kwargs)
        if ex.emulated:
            for f in ex.emulated:
                seen = self.emulated_seen.setdefault(f, set())
                if name not in seen:
                    seen.add(name)
                    self.note(self._emulation_note(f, kind))
        n_call = self._call_index(name, region)
        if ex.mode == ExecMode.PLANNED:
            canon = self._canonical_linear(func, args, kwargs)
            if canon is not None:
                return planned_linear(*canon, ex.linear, self._gemm_context(name, mp, n_call))
            ex = _OBSERVE_OTHER if mp is None else Exec(ExecMode.EMULATE, ex.formats, ex.storage)
        if ex.mode == ExecMode.CAST16:
            return self._run_cast16(name, func, args, kwargs, mp, ex.dtype, runner, ex.out_dtype)
        if ex.mode == ExecMode.FP8:
            canon = self._canonical_linear(func, args, kwargs)
            if canon is not None:
                return fp8_linear(canon[0], canon[1], canon[2], mp)
        return self._run_emulated(name, func, args, kwargs, mp or ModulePrecision(), n_call, runner)

    def _hooked(self, name: str, costs: list[GemmCost], out: torch.Tensor) -> torch.Tensor:
        """Record ``costs`` when the backward node that produced ``out`` runs."""
        node = out.grad_fn if isinstance(out, torch.Tensor) else None
        if node is not None:
            def pre(grad_outputs: Any) -> None:
                self.tally.add(name, costs)
            node.register_prehook(pre)
        return out

    def _probe(self, name: str, a: torch.Tensor, cost: GemmCost, other: Any) -> torch.Tensor:
        """``a`` wrapped so its gradient GEMM (``cost``) is recorded when it runs, and so is its double backward.

        Why: a backward GEMM runs only when its operand's gradient is needed (``autograd.grad(loss, x)``
        runs no weight-gradient GEMM), so the ledger records it when it runs. Under ``create_graph=True``
        (gradient penalties) the gradient passed on is itself differentiated later: the double backward of
        ``dA = dY @ B`` differentiates it by ``dY`` (a GEMM of the same size) and, when ``B`` requires
        grad, by ``B`` (another); a second probe records those when they run.
        """
        twice = [dataclasses.replace(cost, gemm="input_grad", b_role=cost.b_role)]
        if isinstance(other, torch.Tensor) and other.requires_grad:
            twice.append(dataclasses.replace(cost, gemm="weight_grad" if is_param_like(other) else "input_grad"))

        def second(grad: torch.Tensor) -> torch.Tensor:
            self.tally.add(name, twice)
            return grad

        def first(grad: torch.Tensor) -> torch.Tensor:
            self.tally.add(name, [cost])
            return on_backward(grad, second) if grad.requires_grad and torch.is_grad_enabled() else grad

        return on_backward(a, first)

    @staticmethod
    def _real_dtype_exec(args) -> Exec:
        """An op outside the plan runs in its operands' own dtype: a bf16 model's GEMMs are bf16, not fp32."""
        dt = next((a.dtype for a in args[:3] if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        f = format_of_dtype(dt) if dt is not None else None
        if f is None or f == "fp32":
            return FP32_EXEC
        return Exec(ExecMode.FP32, {g: (f, True) for g in FP32_EXEC.formats}, FP32_EXEC.storage)

    def resolve(self, name: str, kind: str, weight_op: bool) -> tuple[ModulePrecision | None, Exec]:
        """The plan's precision for an op of ``name`` (None outside the plan) and how it executes."""
        mp = self.plan.modules.get(name) if self.sites[name].covered else None
        ex = self._exec_for(name, kind, mp, weight_op)
        if ex.mode == ExecMode.FP32 and self.sampling and self.observe_fp32 and mp is not None \
                and self.observer is not None and name not in self.plan.pinned:
            ex = _OBSERVE_LINEAR if kind == "linear" else _OBSERVE_OTHER
        return mp, ex

    def _exec_for(self, name: str, kind: str, mp: ModulePrecision | None, weight_op: bool) -> Exec:
        key = (kind, mp, weight_op)
        ex = self._exec_cache.get(key)
        if ex is None:
            ex = self._exec_cache[key] = decide(kind, mp, self.caps, self.backend, weight_op)
        return ex

    def _emulation_note(self, fmt: str, kind: str = "linear") -> str:
        if self.backend == "emulate":
            return (f"backend='emulate': {fmt} runs as fp32 arithmetic on rounded values (research mode); "
                    "the ledger records it as emulated")
        if fmt in self.caps.native.get("gemm", frozenset()):  # native, but not for this kind of op
            return (f"the plan asks for {fmt} in a {kind} op; this device runs {fmt} natively only in "
                    f"linear-like GEMMs, so these ops emulate it: fp32 arithmetic on rounded values, slower "
                    "than fp32, recorded as emulated. Hardware-aware policies (the default) do not ask for it")
        why = self.caps.reasons.get(fmt)
        return (
            f"the plan asks for {fmt}, which this device can only emulate"
            + (f" ({why})" if why else "")
            + ": it runs as fp32 arithmetic on rounded values, slower than fp32, and the ledger records it "
            "as emulated. Use hardware-aware policies (the default) or a target= to study another device"
        )

    @staticmethod
    def _canonical_linear(func, args, kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(x, W in (out, in) layout, bias) of a linear-like call, or None if it is not one."""
        if func in _LINEAR_FUNCS:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            return (x, w, b) if w is not None and w.dim() == 2 else None
        if func in _ADDMM:
            if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3:
                return None
            b, m1, m2 = args[0], args[1], args[2]
            if not is_param_like(m2) or b.dim() != 1:
                return None
            return (m1, m2.t(), b)
        if len(args) >= 2 and isinstance(args[1], torch.Tensor) and is_param_like(args[1]) and args[1].dim() == 2 \
                and isinstance(args[0], torch.Tensor) and not is_param_like(args[0]) and args[0].dim() >= 1 \
                and not kwargs:
            return (args[0], args[1].t(), None)
        return None

    def buffer_nbytes(self) -> dict[str, int]:
        """The engine's own memory held between steps, by what it is for: reused scratch and the
        stochastic-rounding noise table (weight casts are dropped when backward ends: :meth:`commit_backward`)."""
        return {"scratch": self.scratch.nbytes(), "noise table": self.noise.nbytes()}

    def _gemm_context(self, name: str, mp: ModulePrecision | None, n_call: int) -> GemmContext:
        idx = self.module_index.get(name, 0)
        mp = mp or ModulePrecision()
        observer = self.observer if self.sampling else None
        # a noise offset per stochastically rounded role: a step-free seed of the call plus the step times
        # a stride; in a compiled graph the step is read from a tensor, so one graph serves every step
        step: Any = self.step_tensor if torch.compiler.is_compiling() else self.step
        offsets = {r: (stream_seed(self.seed, idx, _ROLE_INDEX[r], n_call) + step * _STEP_STRIDE) % NoiseTable.MAX_OFFSET
                   for r in ("grad_output", "activation", "weight") if mp.recipe(r).rounding == Rounding.STOCHASTIC}

        def emulate(role: str, t: torch.Tensor) -> torch.Tensor:
            return self._caster(name, role, mp.recipe(role), n_call, observe=False)(t)

        observe = None
        if observer is not None:
            def observe(role: str, t: torch.Tensor) -> None:
                observer(name, role, t, mp.recipe(role))

        def fault(role: str, amax: Any) -> None:
            self._faults.append((name, role, amax))

        return GemmContext(name, self.scratch, self.noise, offsets, emulate, observe, fault, self._weight_cache)

    # --- execution paths ----------------------------------------------------------------
    def _cast16_tensor(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if t.dtype == dtype:
            return t
        if is_param_like(t) and not torch.compiler.is_compiling():  # compiled: the graph fuses the cast
            key = (id(t), t._version, dtype, torch.is_grad_enabled())
            hit = self._cast_cache.get(key)
            if hit is None:
                hit = self._cast_cache[key] = t.to(dtype)
            return hit
        return t.to(dtype)

    def _run_cast16(self, name, func, args, kwargs, mp: ModulePrecision, dtype: torch.dtype, runner=None,
                    flow: torch.dtype | None = None):
        # the output goes on in the plan's 16-bit output dtype (``flow``), else in its input's dtype
        out_dtype = flow or next((a.dtype for a in args if _float_tensor(a)), torch.float32)
        observe = self.observer if self.sampling else None
        positions = _positions(func)

        def cast(i: int, a: Any) -> Any:
            if not _float_tensor(a):
                if isinstance(a, (list, tuple)) and a and all(_float_tensor(t) for t in a):
                    return type(a)(cast(-1, t) for t in a)
                return a
            if observe is not None and (i in positions or i == -1):
                role = "weight" if is_param_like(a) else "activation"
                observe(name, role, a.detach(), mp.recipe(role))
            return self._cast16_tensor(a, dtype)

        cargs = [cast(i, a) for i, a in enumerate(args)]
        ckw = {k: (self._cast16_tensor(v, dtype) if _float_tensor(v) else v) for k, v in kwargs.items()}
        out = (runner or func)(*cargs, **ckw)

        def back(o: Any) -> Any:
            if isinstance(o, torch.Tensor) and o.dtype == dtype:
                o = o if o.dtype == out_dtype else o.to(out_dtype)
                if observe is not None and o.requires_grad:
                    recipe = mp.recipe("grad_output")
                    o = cast_grad(o, lambda g: g, lambda g: observe(name, "grad_output", g.detach().float(), recipe))
                return o
            if isinstance(o, tuple):
                return type(o)(back(x) for x in o)
            return o

        return back(out)

    def _caster(self, name: str, role: str, recipe, call: int, observe: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        key = (name, role)
        caster = self._casters.get(key)
        if caster is None:
            caster = self._casters[key] = RecipeCaster()
        # nearest rounding needs no seed (and a compiled graph must not depend on the step through one)
        seed = (stream_seed(self.seed, self.step, self.module_index.get(name, 0), _ROLE_INDEX[role], call)
                if recipe.rounding == Rounding.STOCHASTIC else 0)
        observer = self.observer if (self.sampling and observe) else None
        fused = self.compile
        faults = self._faults

        def cast(x: torch.Tensor) -> torch.Tensor:
            if observer is not None:
                observer(name, role, x.detach(), recipe)
            if torch.compiler.is_compiling():  # already in a graph: no nested compile, no side effects
                return caster(x, recipe, seed)
            with compiled(fused):
                y = caster(x, recipe, seed)
            if caster.last_amax is not None:
                faults.append((name, role, caster.last_amax))
                caster.last_amax = None
            return y

        return cast

    def _run_emulated(self, name, func, args, kwargs, mp: ModulePrecision, call: int, runner=None):
        def c(role: str) -> Callable[[torch.Tensor], torch.Tensor]:
            return self._caster(name, role, mp.recipe(role), call)

        def obs_grad(role: str):
            if not self.sampling or self.observer is None:
                return None
            observer, recipe = self.observer, mp.recipe(role)
            return lambda g: observer(name, role, g.detach(), recipe)

        go_cast = c("grad_output")
        go_obs = obs_grad("grad_output")
        args = list(args)
        if func in _MHA:
            return self._run_mha(func, args, kwargs, c, go_cast, go_obs, obs_grad)
        act = c("activation")
        weight, gw, gw_obs = c("weight"), c("grad_weight"), obs_grad("grad_weight")

        def cast_one(t: Any) -> Any:
            if not _float_tensor(t):
                return t
            if is_param_like(t):
                return cast_operand(t, weight, gw, gw_obs)
            return cast_operand(t, act)

        if func is torch.einsum:
            ops = args[1:]
            if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
                args = [args[0], [cast_one(t) for t in ops[0]]]
            else:
                args = [args[0], *(cast_one(t) for t in ops)]
        else:
            for i in _positions(func, (0, 1)):
                if i < len(args):
                    args[i] = cast_one(args[i])
            for k in _OPERAND_KEYWORDS:
                if k in kwargs:
                    kwargs[k] = cast_one(kwargs[k])
        out = (runner or func)(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return cast_grad(out, go_cast, go_obs)
        return out

    def _run_mha(self, func, args, kwargs, c, go_cast, go_obs, obs_grad):
        act = c("activation")
        cast_inputs: dict[int, torch.Tensor] = {}
        for i in range(3):
            t = args[i]
            if id(t) not in cast_inputs:
                cast_inputs[id(t)] = cast_operand(t, act)
            args[i] = cast_inputs[id(t)]
        w, gw, gw_obs = c("weight"), c("grad_weight"), obs_grad("grad_weight")
        for i in _MHA_WEIGHT_ARGS:
            if i < len(args) and isinstance(args[i], torch.Tensor):
                args[i] = cast_operand(args[i], w, gw, gw_obs)
        for k in _MHA_WEIGHT_KWARGS:
            if isinstance(kwargs.get(k), torch.Tensor):
                kwargs[k] = cast_operand(kwargs[k], w, gw, gw_obs)
        out, weights = func(*args, **kwargs)
        return cast_grad(out, go_cast, go_obs), weights

    # --- discovery without training ---------------------------------------------------------
    def discover(self, *args: Any, **kwargs: Any) -> dict[str, str]:
        """Run one forward pass of ``model(*args, **kwargs)`` (no grad, not counted) to find the sites.

        Leaves no trace: buffers (batch-norm statistics) and the RNG state are restored.
        """
        was = self.counting
        self.counting = False
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        rng = torch.get_rng_state()
        try:
            with torch.no_grad(), self.activate():
                self.model(*args, **kwargs)
        finally:
            self.counting = was
            torch.set_rng_state(rng)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        return self.kinds

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "seed": self.seed,
            "step": self.step,
            "sites": [
                {"name": s.name, "kinds": sorted(s.kinds), "has_weight_op": s.has_weight_op,
                 "covered": s.covered, "reason": s.reason}
                for s in self.sites.values()
            ],
            "casters": {f"{n}|{r}": c.state_dict() for (n, r), c in self._casters.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sites = {}
        for s in state.get("sites", []):
            sites[s["name"]] = Site(s["name"], set(s["kinds"]), bool(s["has_weight_op"]), bool(s["covered"]), s["reason"])
        missing = [n for n in sites if n not in self.map.modules]
        if missing:
            raise PlanError(f"saved engine state names modules this model does not have: {missing}")
        self.sites = sites
        self._index = {n: i for i, n in enumerate(sites)}
        if sites and self.discovering:
            self.discovering = False
            need = {n for n, s in sites.items() if not s.has_weight_op} | (self.map.shared_owners() & set(sites))
            self.map.hook(need)
        self.set_plan(PrecisionPlan.from_dict(state["plan"]))
        self.seed = int(state["seed"])
        self.noise = NoiseTable(self.seed)
        self.step = int(state["step"])
        self._casters.clear()
        for key, cs in state["casters"].items():
            n, r = key.rsplit("|", 1)
            caster = RecipeCaster()
            caster.load_state_dict(cs)
            self._casters[(n, r)] = caster
