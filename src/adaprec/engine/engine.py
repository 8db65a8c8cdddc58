"""The engine: makes a live model compute under a PrecisionPlan.

Two PyTorch mechanisms, no monkey-patching:

* forward pre/post hooks on every module keep a stack of the modules whose
  ``forward`` is running, so an op knows which module (and so which part of
  the plan) it belongs to;
* a ``TorchFunctionMode``, active only inside :meth:`PrecisionEngine.activate`,
  intercepts the matmul-like ops (linear, conv, embedding, attention) and
  runs them with quantized operands and gradients (emulation) or in a
  hardware dtype (native).

Swapping the plan is an attribute assignment: nothing is re-wrapped, and the
optimizer never sees a new parameter.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from adaprec.engine.autograd import cast_grad, cast_operand
from adaprec.engine.cast import RecipeCaster, stream_seed
from adaprec.engine.native import can_run_native, fp8_linear, native_dtype_for
from adaprec.errors import ModuleNotSupportedError, PlanError
from adaprec.formats import compiled
from adaprec.plan import ROLES, ModulePrecision, PrecisionPlan

__all__ = ["PrecisionEngine", "find_quantizable", "BACKENDS"]

BACKENDS = ("auto", "emulate", "native")
ModuleFilter = Callable[[nn.Module, str], bool]

_LINEAR = {F.linear}
_CONV = {F.conv1d, F.conv2d}
_EMBED = {F.embedding}
_SDPA = {F.scaled_dot_product_attention}
_BMM = {torch.bmm, torch.matmul, torch.baddbmm, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.bmm}
# nn.MultiheadAttention runs this functional; its inner ops are out of a mode's
# reach (a mode is off inside its own handler), so it is quantized at its
# boundary: inputs and projection weights in, output gradient out.
_MHA = {F.multi_head_attention_forward}
_MHA_WEIGHT_ARGS = (5, 11)
_MHA_WEIGHT_KWARGS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
_ROLE_INDEX = {r: i for i, r in enumerate(ROLES)}
# Numerically sensitive layers stay fp32 by design (as torch.autocast keeps
# them), so they are not reported as unsupported.
_KEPT_FP32 = (
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm,
)


def _module_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return None
    if "scaled_dot_product_attention" in src:
        return "attention"
    return None


def find_quantizable(
    model: nn.Module, module_filter: ModuleFilter | None = None
) -> tuple[dict[str, str], list[str]]:
    """Modules the engine can quantize (fqn -> kind), and modules with weights it cannot.

    Children of nn.MultiheadAttention are run by their parent's functional
    forward, so the parent is the unit.
    """
    kinds: dict[str, str] = {}
    unsupported: list[str] = []
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        kind = _module_kind(module)
        if kind is not None and (module_filter is None or module_filter(module, name)):
            kinds[name] = kind
            if isinstance(module, nn.MultiheadAttention):
                skip_prefixes.append(name + "." if name else "")
        elif kind is None and not isinstance(module, _KEPT_FP32) and any(True for _ in module.parameters(recurse=False)):
            unsupported.append(f"{name or '<root>'} ({type(module).__name__})")
    return kinds, unsupported


class _Mode(TorchFunctionMode):
    def __init__(self, engine: PrecisionEngine) -> None:
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        eng = self.engine
        stack = eng._stack
        if not stack or func not in eng._handled:
            return func(*args, **kwargs)
        return eng._run(stack[-1], func, args, kwargs)


class PrecisionEngine:
    """Applies plans to ``model``.

    Args:
        model: the model; its parameters stay fp32 (they are the master weights).
        backend: ``"emulate"`` quantizes in fp32 arithmetic on any device;
            ``"native"`` runs bf16/fp16/fp8 modules in hardware dtypes wherever
            the plan allows; ``"auto"`` does so only where the device has fast
            units for that dtype.
        module_filter: ``(module, fqn) -> bool``; False keeps a module out of
            every plan (it runs in fp32).
        seed: seed of the stochastic-rounding streams (mixed with step, module, role, call).
        compile: run the casts as fused ``torch.compile`` kernels (identical
            bits; a one-off compile of seconds, then much faster stochastic
            rounding than eager).

    Attribute ``observer``, when set, is called as ``observer(module, role,
    tensor, recipe)`` on sampled steps before each cast (the health monitor).
    """

    def __init__(
        self,
        model: nn.Module,
        backend: str = "auto",
        module_filter: ModuleFilter | None = None,
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        if backend not in BACKENDS:
            raise PlanError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.model = model
        self.backend = backend
        self.seed = int(seed)
        self.compile = bool(compile)
        self.kinds, self.unsupported = find_quantizable(model, module_filter)
        self.module_index = {n: i for i, n in enumerate(self.kinds)}
        self.plan = PrecisionPlan.uniform(self.kinds)
        self.observer: Callable[[str, str, torch.Tensor, Any], None] | None = None
        self.sampling = False
        self.step = 0
        self._calls: dict[str, int] = {}
        self._casters: dict[tuple[str, str], RecipeCaster] = {}
        self._stack: list[str] = []
        self._handled = _LINEAR | _CONV | _EMBED | _SDPA | _BMM | _MHA
        self._notes: set[str] = set()
        self._native_cache: dict[str, torch.dtype | None] = {}
        # module-stack hooks, present only while a plan is being applied (see activate): a module
        # with hooks takes nn.Module's slow call path, which an all-fp32 step need not pay
        self._named_modules = list(model.named_modules())
        self._hooks: list[Any] = []
        if self.unsupported:
            self.note(
                "modules with parameters the engine cannot quantize stay fp32: "
                + ", ".join(self.unsupported)
            )

    # --- hooks ------------------------------------------------------------
    def _push(self, name: str) -> Callable[..., None]:
        stack = self._stack

        def hook(module: nn.Module, args: Any) -> None:
            stack.append(name)

        return hook

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def _attach_stack_hooks(self) -> None:
        for name, module in self._named_modules:
            self._hooks.append(module.register_forward_pre_hook(self._push(name)))
            self._hooks.append(module.register_forward_hook(self._pop, always_call=True))

    def remove(self) -> None:
        """Detach every hook (the model is left exactly as it was)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._stack.clear()

    def note(self, message: str) -> None:
        """Tell the user once per distinct message."""
        if message not in self._notes:
            self._notes.add(message)
            warnings.warn(f"adaprec: {message}", stacklevel=3)

    # --- plan -------------------------------------------------------------
    def set_plan(self, plan: PrecisionPlan) -> None:
        """Make ``plan`` the one in force from the next op on (cheap)."""
        stray = [n for n in plan.modules if n not in self.kinds]
        if stray:
            raise ModuleNotSupportedError(
                f"plan names modules the engine does not quantize: {stray}. Quantizable modules: "
                f"{list(self.kinds)}; build plans with PrecisionPlan.uniform(ap.engine.kinds, ...)"
            )
        self.plan = plan
        self._native_cache.clear()

    def begin_step(self, step: int, sampling: bool) -> None:
        self.step = step
        self.sampling = sampling
        self._calls.clear()

    @contextlib.contextmanager
    def activate(self, enabled: bool = True) -> Iterator[None]:
        """Ops inside run under the plan in force."""
        if not enabled or (self.plan.is_fp32 and not self.sampling):
            yield
            return
        self._attach_stack_hooks()
        try:
            with _Mode(self):
                yield
        finally:
            self.remove()

    # --- execution ----------------------------------------------------------
    def _native_dtype(self, name: str, mp: ModulePrecision, device: torch.device) -> torch.dtype | None:
        if name in self._native_cache:
            return self._native_cache[name]
        dtype = None
        if self.backend != "emulate":
            dtype = native_dtype_for(mp)
            if dtype is not None and self.kinds[name] == "embedding":
                dtype = None
            if dtype is not None and dtype.itemsize == 1 and self.kinds[name] != "linear":
                dtype = None  # fp8 runs natively only for Linear
            if dtype is not None and self.backend == "auto":
                ok, why = can_run_native(device, dtype)
                if not ok:
                    self.note(why)
                    dtype = None
        self._native_cache[name] = dtype
        return dtype

    def _caster(self, name: str, role: str, recipe, call: int) -> Callable[[torch.Tensor], torch.Tensor]:
        key = (name, role)
        caster = self._casters.get(key)
        if caster is None:
            caster = self._casters[key] = RecipeCaster()
        seed = stream_seed(self.seed, self.step, self.module_index[name], _ROLE_INDEX[role], call)
        observer = self.observer if self.sampling else None
        fused = self.compile

        def cast(x: torch.Tensor) -> torch.Tensor:
            if observer is not None:
                observer(name, role, x.detach(), recipe)
            with compiled(fused):
                return caster(x, recipe, seed)

        return cast

    def _run(self, name: str, func, args, kwargs):
        mp = self.plan.modules.get(name)
        kind = self.kinds.get(name)
        if mp is None or kind is None:
            return func(*args, **kwargs)
        if kind == "embedding" and func not in _EMBED:
            return func(*args, **kwargs)
        if kind in ("linear", "conv") and func in _BMM:
            return func(*args, **kwargs)
        if kind != "attention" and func in _MHA:
            return func(*args, **kwargs)
        if mp.is_fp32 and not self.sampling:
            return func(*args, **kwargs)
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        first = args[0]
        dtype = self._native_dtype(name, mp, first.device) if torch.is_tensor(first) else None
        if dtype is not None and func not in _MHA:
            return self._run_native(func, args, kwargs, mp, dtype)
        return self._run_emulated(name, kind, func, args, kwargs, mp, call)

    def _run_native(self, func, args, kwargs, mp: ModulePrecision, dtype: torch.dtype):
        if dtype.itemsize == 1:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            return fp8_linear(x, w, b, mp)
        out_dtype = args[0].dtype
        cast_args = [a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        cast_kwargs = {
            k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()
        }
        return func(*cast_args, **cast_kwargs).to(out_dtype)

    def _run_emulated(self, name, kind, func, args, kwargs, mp: ModulePrecision, call: int):
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
        if func in _EMBED:
            weight = args[1]
            args[1] = cast_operand(weight, c("weight"), c("grad_weight"), obs_grad("grad_weight"))
            return cast_grad(func(*args, **kwargs), go_cast, go_obs)
        if func in _MHA:
            return self._run_mha(func, args, kwargs, c, go_cast, go_obs, obs_grad)
        if func in _SDPA or func in _BMM:
            act = c("activation")
            n = 3 if func in _SDPA else (2 if func is not torch.baddbmm else 3)
            start = 1 if func is torch.baddbmm else 0
            for i in range(start, min(start + n, len(args))):
                if torch.is_tensor(args[i]) and args[i].is_floating_point():
                    args[i] = cast_operand(args[i], act)
            out = func(*args, **kwargs)
            return cast_grad(out, go_cast, go_obs)
        # linear / conv: (input, weight, bias, ...)
        args[0] = cast_operand(args[0], c("activation"))
        if len(args) > 1:
            args[1] = cast_operand(args[1], c("weight"), c("grad_weight"), obs_grad("grad_weight"))
        elif "weight" in kwargs:
            kwargs["weight"] = cast_operand(kwargs["weight"], c("weight"), c("grad_weight"), obs_grad("grad_weight"))
        return cast_grad(func(*args, **kwargs), go_cast, go_obs)

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
            if i < len(args) and torch.is_tensor(args[i]):
                args[i] = cast_operand(args[i], w, gw, gw_obs)
        for k in _MHA_WEIGHT_KWARGS + ("out_proj_weight", "in_proj_weight"):
            if torch.is_tensor(kwargs.get(k)):
                kwargs[k] = cast_operand(kwargs[k], w, gw, gw_obs)
        out, weights = func(*args, **kwargs)
        return cast_grad(out, go_cast, go_obs), weights

    # --- state ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "seed": self.seed,
            "step": self.step,
            "casters": {f"{n}|{r}": c.state_dict() for (n, r), c in self._casters.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_plan(PrecisionPlan.from_dict(state["plan"]))
        self.seed = int(state["seed"])
        self.step = int(state["step"])
        self._casters.clear()
        for key, cs in state["casters"].items():
            n, r = key.rsplit("|", 1)
            caster = RecipeCaster()
            caster.load_state_dict(cs)
            self._casters[(n, r)] = caster
