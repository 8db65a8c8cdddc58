"""Optimizer state stored narrow for real: the moments of the user's own optimizer in storage formats.

Rounding Adam's moments inside their fp32 tensors saves no byte. Here the
moments of the parameters a plan narrows live in ``optimizer.state[p]`` as
the codes and scales of a storage format (:mod:`adaprec.formats.storage`),
and :meth:`NarrowOptimizerState.step` updates those parameters itself, one
parameter and one chunk at a time: unpack the chunk's moments to fp32,
apply the optimizer's own update rule, pack them back. No full-size fp32
copy of the moments ever exists; the temporaries are a chunk's worth.
Every other parameter is left to the optimizer's own ``step()``: the
narrow parameters' gradients are hidden from it for that call (Adam and SGD
skip a parameter whose ``.grad`` is None) and put back afterwards.

>>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
>>> narrow = NarrowOptimizerState(opt, model=model)   # model: to find embeddings
>>> narrow.set_formats({p: "int8" for p in model.parameters()})
>>> ...; loss.backward(); narrow.step(); opt.zero_grad()
>>> narrow.nbytes()                                    # {'fp32': 8228, 'int8/block256': 2113536}

What is kept where (per parameter, as the caller's spec says;
:func:`moment_formats` is the one copy of the rule):

- ``"fp32"``: nothing changes; the optimizer's own step, bit for bit.
- ``"bf16"``: both moments bf16 (fp32's exponent range: nothing flushes).
- ``"fp16"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``: the first moment (and SGD's
  momentum) in that format, the second moment (and AMSGrad's max) in the
  same format with the sqrt map, which doubles its range in log terms.
- ``"int8"``, ``"int4"``: the first moment as those integer codes with the
  sqrt map; the second moment as fp8 E4M3 codes with the sqrt map (one
  byte, log-spaced). A linear 8-bit code of ``v`` (even of ``sqrt(v)``)
  rounds a block's small second moments to zero and ``m / (sqrt(v) + eps)``
  then takes steps of ``lr * m / eps``; a linear first moment loses the
  small ones. Both measured in ``docs/memory.md``.
- a pair ``(first, second)`` of storage specs sets both moments exactly.
- tensors under ``min_numel`` (4096) elements and embedding weights stay
  fp32 unless the caller lowers ``min_numel`` / sets
  ``keep_embeddings_fp32=False``, as torchao's and bitsandbytes' 8-bit
  optimizers do.

The state lives in ``optimizer.state[p]`` as integer tensors (codes and
scales viewed as integers, the format's name as bytes): ``Optimizer.
load_state_dict`` casts floating-point state to the parameter's dtype,
integers it leaves alone, so ``optimizer.state_dict()`` alone resumes bit
for bit. ``"step"`` keeps torch's own key and meaning, so a parameter moves
between fp32 and narrow storage at any step without losing its moments.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaprec.errors import CheckpointError, FormatSpecError, OptimizerStateError
from adaprec.formats.storage import (
    PackedTensor,
    StorageFormat,
    as_bytes,
    pack,
    packed_zeros,
    storage_format,
    storage_nbytes,
    unpack,
)
from adaprec.optim import fused_adam

__all__ = [
    "MomentFormats",
    "NarrowOptimizerState",
    "moment_formats",
    "adam_update_",
    "sgd_update_",
    "DEFAULT_MIN_NUMEL",
]

DEFAULT_MIN_NUMEL = 4096
DEFAULT_CHUNK_NUMEL = 1 << 18  # 1 MiB per fp32 temporary
_TAG = "adaprec_format"
_FP32 = "fp32"
_TORCH_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass(frozen=True)
class MomentFormats:
    """The storage of one parameter's first moment and of its second moment (and AMSGrad's max)."""

    name: str
    first: StorageFormat
    second: StorageFormat

    @property
    def identity(self) -> bool:
        return self.first.identity and self.second.identity

    @property
    def tag(self) -> str:
        """``name|first|second``: what ``optimizer.state[p]`` records (as bytes) beside the codes."""
        return f"{self.name}|{self.first.spec}|{self.second.spec}"

    def nbytes(self, numel: int, *, last_dim: int | None = None, amsgrad: bool = False) -> int:
        """Bytes both moments of a ``numel``-element parameter occupy (AMSGrad adds a second-moment copy)."""
        second = storage_nbytes(self.second, numel, last_dim=last_dim)
        return storage_nbytes(self.first, numel, last_dim=last_dim) + second * (2 if amsgrad else 1)

    @classmethod
    def from_tag(cls, tag: str) -> MomentFormats:
        try:
            name, first, second = tag.split("|")
        except ValueError:
            raise CheckpointError(f"narrow optimizer state has a malformed format tag {tag!r}") from None
        return cls(name, storage_format(first, "optimizer_state"), storage_format(second, "optimizer_state"))


def _granularity(fmt: StorageFormat) -> str:
    if fmt.granularity == "block":
        return f"/block{fmt.block_size}"
    return "" if fmt.granularity == "none" else f"/{fmt.granularity}"


def _derived(first: StorageFormat) -> tuple[StorageFormat, StorageFormat]:
    """The storage of both moments for a one-spec request (see the module docstring for why)."""
    if first.identity or first.base == "bf16":
        return first, first
    gran = _granularity(first)
    if first.base in ("int8", "int4"):  # linear integer codes: sqrt map on m, a log-spaced 8-bit code for v
        m = first if first.mapping == "sqrt" else storage_format(f"{first.base}{gran}/sqrt", "optimizer_state")
        return m, storage_format(f"fp8_e4m3{gran}/sqrt", "optimizer_state")
    return first, storage_format(f"{first.base}{gran}/sqrt", "optimizer_state")


def moment_formats(spec: str | tuple[str, str] | MomentFormats) -> MomentFormats:
    """Parse an optimizer-state spec: one storage spec (its second-moment companion derived), or a pair."""
    if isinstance(spec, MomentFormats):
        return spec
    if isinstance(spec, tuple | list):
        if len(spec) != 2:
            raise OptimizerStateError(f"an optimizer-state pair is (first, second); got {spec!r}")
        first, second = (storage_format(s, role="optimizer_state") for s in spec)
        name = f"{first.spec}+{second.spec}"
        if first.identity and second.identity:
            name = _FP32
    else:
        asked = storage_format(spec, role="optimizer_state")
        first, second = _derived(asked)
        name = asked.spec
    if not first.signed:
        raise OptimizerStateError(
            f"{first.spec!r} cannot hold a first moment: its codes are unsigned and the moment is signed; "
            f"use '{first.base[1:]}'"
        )
    return MomentFormats(name, first, second)


def fused_takes(spec: str | tuple[str, str] | MomentFormats) -> bool:
    """Whether moments kept as ``spec`` are the pair the fused kernel updates (:mod:`adaprec.optim.fused_adam`)."""
    try:
        mf = moment_formats(spec)
    except (OptimizerStateError, FormatSpecError):
        return False
    return fused_adam.takes_formats(mf.first, mf.second)


# ---------------------------------------------------------------- the update rules, on fp32 tensors

def adam_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
) -> None:
    """One Adam/AdamW update in place, in the order of torch's single-tensor Adam (same bits in fp32).

    ``step`` is the step count after this update (1 on the first call).
    ``grad`` is never written.
    """
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def sgd_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    *,
    first: bool,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One SGD-with-momentum update in place, in the order of torch's single-tensor SGD.

    ``first``: the buffer is new (torch then copies the gradient into it).
    """
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if first:
        momentum_buffer.copy_(grad)
    else:
        momentum_buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
    grad = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(grad, alpha=-lr)


def _scalar(x: Any) -> float:
    return float(x.item()) if torch.is_tensor(x) else float(x)


class _Rule:
    """What one optimizer class keeps per parameter and how it steps (Adam/AdamW, SGD)."""

    name = ""

    def moments(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def check(self, group: Mapping[str, Any]) -> None:
        for opt in ("capturable", "differentiable"):
            if group.get(opt):
                raise OptimizerStateError(
                    f"{self.name} with {opt}=True cannot keep narrow state: the narrow update runs outside "
                    f"{'CUDA graphs' if opt == 'capturable' else 'autograd'}; build the optimizer with "
                    f"{opt}=False, or keep this parameter's state fp32"
                )


class _AdamRule(_Rule):
    name = "Adam/AdamW"

    def moments(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group.get("amsgrad") else ("exp_avg", "exp_avg_sq")

    def new_step(self, p: torch.Tensor, group: Mapping[str, Any]) -> torch.Tensor:
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        if group.get("fused") or group.get("capturable"):
            return torch.zeros((), dtype=torch.float32, device=p.device)
        return torch.tensor(0.0, dtype=dtype)

    def update(self, p, g, m, group, step: float) -> None:  # type: ignore[no-untyped-def]
        beta1, beta2 = group["betas"]
        adam_update_(
            p, g, m["exp_avg"], m["exp_avg_sq"], m.get("max_exp_avg_sq"),
            step=step, lr=_scalar(group["lr"]), beta1=_scalar(beta1), beta2=_scalar(beta2),
            eps=_scalar(group["eps"]), weight_decay=_scalar(group["weight_decay"]),
            decoupled=bool(group.get("decoupled_weight_decay", False)), maximize=bool(group.get("maximize")),
        )

    def fused(self, p: torch.Tensor, packs: Mapping[str, PackedTensor], group: Mapping[str, Any],
              step: float) -> None:
        """The same update through the fused 8-bit kernel (the caller checked :func:`fused_adam.applies`).
        The moments hold the parameter's elements in row-major order: a strided parameter is updated in a
        contiguous copy."""
        beta1, beta2 = group["betas"]
        contiguous = p.is_contiguous()
        work = p.detach() if contiguous else p.detach().contiguous()
        fused_adam.adam_step_int8_(
            work, p.grad.contiguous(), packs["exp_avg"], packs["exp_avg_sq"], step=step, lr=_scalar(group["lr"]),
            beta1=_scalar(beta1), beta2=_scalar(beta2), eps=_scalar(group["eps"]),
            weight_decay=_scalar(group["weight_decay"]),
            decoupled=bool(group.get("decoupled_weight_decay", False)), maximize=bool(group.get("maximize")),
        )
        if not contiguous:
            p.detach().copy_(work)


class _SGDRule(_Rule):
    name = "SGD"

    def moments(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group.get("momentum", 0) != 0 else ()

    def update(self, p, g, m, group, first: bool) -> None:  # type: ignore[no-untyped-def]
        sgd_update_(
            p, g, m["momentum_buffer"], first=first, lr=_scalar(group["lr"]),
            momentum=_scalar(group["momentum"]), dampening=_scalar(group["dampening"]),
            nesterov=bool(group["nesterov"]), weight_decay=_scalar(group["weight_decay"]),
            maximize=bool(group.get("maximize")),
        )


def _rule_for(optimizer: torch.optim.Optimizer) -> _Rule:
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam with decoupled_weight_decay=True
        return _AdamRule()
    if isinstance(optimizer, torch.optim.SGD):
        return _SGDRule()
    raise OptimizerStateError(
        f"{type(optimizer).__name__} cannot keep narrow state: supported are torch.optim.Adam, AdamW and SGD "
        "(momentum or not); keep this optimizer's state fp32 (optimizer_state='fp32' in the plan)"
    )


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(p, DTensor)


def _encode(tag: str) -> torch.Tensor:
    return torch.tensor(list(tag.encode()), dtype=torch.uint8)


def _decode(t: torch.Tensor) -> str:
    return bytes(as_bytes(t).tolist()).decode()


def _unit(fmt: StorageFormat, shape: torch.Size) -> int:
    if fmt.granularity == "block":
        return fmt.block_size  # type: ignore[return-value]
    if fmt.granularity == "row":
        return max(1, shape[-1] if len(shape) else 1)
    return 1


def _chunks(numel: int, unit: int, target: int) -> Iterator[tuple[int, int]]:
    size = max(unit, target // unit * unit)
    for a in range(0, numel, size):
        yield a, min(numel, a + size)


def _view(p: PackedTensor, a: int, b: int) -> PackedTensor:
    """Elements [a, b) of a packed parameter-shaped tensor (a on a block/row boundary), sharing its storage."""
    fmt = p.fmt
    if fmt.granularity == "none":
        return PackedTensor(fmt, p.codes.view(-1)[a:b], None, torch.Size([b - a]), p.dtype)
    assert p.scales is not None
    if fmt.granularity == "row":
        cols = p.codes.shape[1]
        r0, r1 = a // cols, -(-b // cols)
        return PackedTensor(fmt, p.codes[r0:r1], p.scales[r0:r1], torch.Size([r1 - r0, cols]), p.dtype)
    blk = fmt.block_size
    assert blk is not None
    k0, k1 = a // blk, -(-b // blk)
    per = blk if fmt.bits >= 8 else blk // 2
    return PackedTensor(fmt, p.codes[k0 * per:k1 * per], p.scales[k0:k1], torch.Size([b - a]), p.dtype)


def _store(dst: PackedTensor, values: torch.Tensor) -> None:
    """Pack fp32 ``values`` (flat) into the storage ``dst`` views."""
    new = pack(values.view(dst.shape), dst.fmt)
    if new.codes.data_ptr() != dst.codes.data_ptr():
        dst.codes.copy_(new.codes.view_as(dst.codes))
    if dst.scales is not None:
        dst.scales.copy_(new.scales)  # type: ignore[arg-type]


class NarrowOptimizerState:
    """Keeps the moments of chosen parameters of an Adam/AdamW/SGD optimizer in storage formats.

    ``optimizer``: the user's own ``torch.optim.Adam``, ``AdamW`` or ``SGD``.
    ``model``: optional; its ``nn.Embedding``/``nn.EmbeddingBag`` weights stay
    fp32 while ``keep_embeddings_fp32``. ``min_numel``: smaller tensors stay
    fp32 (their state costs little and small tensors such as norms and biases
    are the sensitive ones). ``chunk_numel``: elements updated per chunk
    (the size of the fp32 temporaries). ``fused``: update ``"int8"`` Adam
    moments of fp32 CPU parameters with the fused kernel of
    :mod:`adaprec.optim.fused_adam` where it builds (one pass over memory,
    faster than torch's own fp32 AdamW); False keeps the eager update.

    Call :meth:`step` in place of ``optimizer.step()``; ``zero_grad``, LR
    schedulers and ``optimizer.state_dict()`` work as before.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        model: nn.Module | None = None,
        min_numel: int = DEFAULT_MIN_NUMEL,
        keep_embeddings_fp32: bool = True,
        chunk_numel: int = DEFAULT_CHUNK_NUMEL,
        fused: bool = True,
    ) -> None:
        self.optimizer = optimizer
        self.fused = bool(fused)
        self._rule = _rule_for(optimizer)
        if min_numel < 0 or chunk_numel < 1:
            raise OptimizerStateError(
                f"min_numel must be >= 0 and chunk_numel >= 1; got {min_numel} and {chunk_numel}"
            )
        self.min_numel = int(min_numel)
        self.keep_embeddings_fp32 = bool(keep_embeddings_fp32)
        self.chunk_numel = int(chunk_numel)
        self._embeddings: set[int] = set()
        if model is not None:
            for mod in model.modules():
                if isinstance(mod, nn.Embedding | nn.EmbeddingBag):
                    self._embeddings.add(id(mod.weight))
        self._want: dict[torch.Tensor, MomentFormats] = {}
        self._normalize_all()
        for p in self._params():  # a state loaded into the optimizer alone already says its formats
            tag = self.optimizer.state.get(p, {}).get(_TAG)
            if tag is not None:
                self._want[p] = MomentFormats.from_tag(_decode(tag))
        # a later optimizer.load_state_dict casts the bytes to the parameters' dtype: turn them back at once
        optimizer.register_load_state_dict_post_hook(self._normalize_all)

    # ------------------------------------------------------------ formats

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _group(self, p: torch.Tensor) -> Mapping[str, Any]:
        for g in self.optimizer.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise OptimizerStateError(
            f"a parameter of shape {tuple(p.shape)} is not in the optimizer's param_groups; "
            "pass the optimizer the model's parameters (or add_param_group) before setting its format"
        )

    def set_formats(
        self, formats: Mapping[torch.Tensor, str | tuple[str, str] | MomentFormats]
    ) -> dict[torch.Tensor, str]:
        """Choose the state storage of these parameters (the others keep theirs); returns the effective names.

        A narrow spec for a tensor under ``min_numel`` elements or an embedding
        weight gives ``"fp32"`` (see the class docstring). Moments already held
        are converted now (unpacked from the old storage, packed in the new).
        All specs are checked before anything changes.
        """
        groups = {id(q): g for g in self.optimizer.param_groups for q in g["params"]}
        plan: list[tuple[torch.Tensor, MomentFormats | None]] = []
        for p, spec in formats.items():
            group = groups.get(id(p)) or self._group(p)  # _group raises the clear error
            mf = moment_formats(spec)
            if not mf.identity and self._kept_fp32(p):
                mf = moment_formats(_FP32)
            if not mf.identity:
                self._rule.check(group)
                if p.is_complex():
                    raise OptimizerStateError("complex parameters cannot keep narrow state; keep them fp32")
                if _is_dtensor(p):
                    raise OptimizerStateError(
                        "sharded (DTensor, FSDP2) parameters cannot keep narrow state yet; keep them fp32"
                    )
            plan.append((p, None if mf.identity else mf))
        out: dict[torch.Tensor, str] = {}
        for p, mf in plan:
            if mf is None:
                self._want.pop(p, None)
            else:
                self._want[p] = mf
            self._convert(p, groups[id(p)])
            out[p] = _FP32 if mf is None else mf.name
        return out

    def _kept_fp32(self, p: torch.Tensor) -> bool:
        return p.numel() < self.min_numel or (self.keep_embeddings_fp32 and id(p) in self._embeddings)

    def formats(self) -> dict[torch.Tensor, str]:
        """Every parameter of the optimizer and the name of its state's storage (``"fp32"``: the optimizer's own)."""
        return {p: (self._want[p].name if p in self._want else _FP32) for p in self._params()}

    # ------------------------------------------------------------ layout of optimizer.state[p]

    @staticmethod
    def _normalize(state: dict[str, Any]) -> None:
        """Undo ``Optimizer.load_state_dict``'s cast of the byte tensors to the parameter's dtype (exact)."""
        for k, v in state.items():
            if k.startswith("adaprec_") and torch.is_tensor(v) and v.dtype != torch.uint8:
                state[k] = as_bytes(v)

    def _normalize_all(self, *_: Any) -> None:
        for p in self._params():
            state = self.optimizer.state.get(p)
            if state:
                self._normalize(state)

    def _packs(self, p: torch.Tensor, state: dict[str, Any], mf: MomentFormats) -> dict[str, PackedTensor]:
        self._normalize(state)
        out = {}
        for name in self._held(state):
            fmt = mf.first if name in ("exp_avg", "momentum_buffer") else mf.second
            parts = {"codes": state[f"adaprec_{name}_codes"]}
            if f"adaprec_{name}_scales" in state:
                parts["scales"] = state[f"adaprec_{name}_scales"]
            out[name] = PackedTensor.from_state(fmt, parts, p.shape, torch.float32)
        return out

    @staticmethod
    def _held(state: Mapping[str, Any]) -> list[str]:
        return [k[len("adaprec_"):-len("_codes")] for k in state if k.startswith("adaprec_") and k.endswith("_codes")]

    def _moments_fp32(self, p: torch.Tensor, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The moments this parameter's state holds, as fp32 tensors (from whichever layout)."""
        tag = state.get(_TAG)
        if tag is not None:
            return {k: unpack(v) for k, v in self._packs(p, state, MomentFormats.from_tag(_decode(tag))).items()}
        return {k: v.float() for k, v in state.items()
                if k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer") and torch.is_tensor(v)}

    def _convert(self, p: torch.Tensor, group: Mapping[str, Any]) -> None:
        """Bring ``optimizer.state[p]`` to the layout the wanted format says (no-op when it already is)."""
        state = self.optimizer.state.get(p)
        if not state:
            return
        mf = self._want.get(p)
        tag = state.get(_TAG)
        if mf is None and tag is None:
            return
        if mf is not None and tag is not None:
            held = MomentFormats.from_tag(_decode(tag))
            if (held.first, held.second) == (mf.first, mf.second):
                if held.name != mf.name:
                    state[_TAG] = _encode(mf.tag)
                return
        moments = self._moments_fp32(p, state)
        for k in [k for k in state if k.startswith("adaprec_") or k in moments]:
            del state[k]
        if mf is None:  # back to the optimizer's own layout, in the parameter's dtype
            for k, v in moments.items():
                state[k] = v.to(p.dtype).view_as(p)
            return
        state[_TAG] = _encode(mf.tag)
        for k, v in moments.items():
            self._put(state, k, pack(v.view(p.shape), mf.first if k in ("exp_avg", "momentum_buffer") else mf.second))

    @staticmethod
    def _put(state: dict[str, Any], name: str, packed: PackedTensor) -> None:
        for part, t in packed.to_state().items():
            state[f"adaprec_{name}_{part}"] = t

    # ------------------------------------------------------------ step

    def step(self, closure: None = None) -> Any:
        """Update the narrow-state parameters here, then let the optimizer step the others."""
        if closure is not None:
            raise OptimizerStateError(
                "NarrowOptimizerState.step() takes no closure: compute the loss and call backward() first"
            )
        hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p not in self._want:
                        self._convert(p, group)  # a narrow state loaded for a parameter now kept fp32
                        continue
                    if not self._rule.moments(group):
                        continue  # plain SGD keeps nothing: its own step does it all
                    if p.grad.is_sparse:
                        raise OptimizerStateError("sparse gradients cannot update narrow state; keep this state fp32")
                    self._rule.check(group)
                    self._step_param(p, group, self._want[p])
                    hidden.append((p, p.grad))
        for p, _ in hidden:
            p.grad = None
        try:
            return self.optimizer.step()
        finally:
            for p, g in hidden:
                p.grad = g

    def _step_param(self, p: torch.Tensor, group: Mapping[str, Any], mf: MomentFormats) -> None:
        state = self.optimizer.state[p]
        self._convert(p, group)
        names = self._rule.moments(group)
        first = False
        if _TAG not in state:
            state[_TAG] = _encode(mf.tag)
            first = True
        if isinstance(self._rule, _AdamRule) and "step" not in state:
            state["step"] = self._rule.new_step(p, group)
        held = self._held(state)
        for name in names:
            if name not in held:  # new state, or amsgrad switched on: zeros, as torch starts them
                fmt = mf.first if name in ("exp_avg", "momentum_buffer") else mf.second
                self._put(state, name, packed_zeros(fmt, p.shape, device=p.device))
                first = first or name == "momentum_buffer"
        packs = self._packs(p, state, mf)
        if isinstance(self._rule, _AdamRule):
            state["step"] += 1
            step_arg: Any = _scalar(state["step"])
        else:
            step_arg = first
        if (self.fused and isinstance(self._rule, _AdamRule) and len(names) == 2
                and fused_adam.applies(p, mf.first, mf.second)):
            self._rule.fused(p, packs, group, step_arg)
            return
        unit = math.lcm(*(_unit(packs[n].fmt, p.shape) for n in names))
        contiguous = p.is_contiguous()
        work = p.view(-1) if contiguous else p.detach().reshape(-1).clone()
        grad = p.grad.reshape(-1)
        for a, b in _chunks(p.numel(), unit, self.chunk_numel):
            views = {n: _view(packs[n], a, b) for n in names}
            m = {n: unpack(v).reshape(-1) for n, v in views.items()}
            pc = work[a:b]
            g = grad[a:b]
            if g.dtype != torch.float32:
                g = g.float()
            if pc.dtype == torch.float32:
                self._rule.update(pc, g, m, group, step_arg)  # type: ignore[attr-defined]
            else:  # a bf16/fp16 parameter: update in fp32, store once
                pf = pc.float()
                self._rule.update(pf, g, m, group, step_arg)  # type: ignore[attr-defined]
                pc.copy_(pf)
            for n in names:
                _store(views[n], m[n])
        if not contiguous:
            p.copy_(work.view_as(p))

    # ------------------------------------------------------------ bytes and state

    def nbytes(self) -> dict[str, int]:
        """Bytes the optimizer state really occupies, by storage name (``"fp32"``: torch's own fp32 tensors)."""
        out: dict[str, int] = {}
        for p in self._params():
            state = self.optimizer.state.get(p)
            if not state:
                continue
            tag = state.get(_TAG)
            if tag is not None:
                name = MomentFormats.from_tag(_decode(tag)).name
            else:
                dts = [v.dtype for k, v in state.items() if torch.is_tensor(v) and k != "step"]
                name = _TORCH_NAMES.get(dts[0], str(dts[0])) if dts else _FP32
            n = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
            out[name] = out.get(name, 0) + n
        return out

    def state_dict(self) -> dict[str, Any]:
        """The chosen formats (by parameter index, as ``optimizer.state_dict()`` numbers them) and options.

        The moments themselves are in ``optimizer.state_dict()``.
        """
        index = {id(p): i for i, p in enumerate(self._params())}
        return {
            "formats": {index[id(p)]: mf.tag for p, mf in self._want.items()},
            "min_numel": self.min_numel,
            "keep_embeddings_fp32": self.keep_embeddings_fp32,
            "chunk_numel": self.chunk_numel,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            formats = {int(i): MomentFormats.from_tag(str(tag)) for i, tag in state["formats"].items()}
            min_numel, keep = int(state["min_numel"]), bool(state["keep_embeddings_fp32"])
            chunk = int(state["chunk_numel"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"narrow optimizer state dict is missing or has bad entries ({e})") from e
        params = self._params()
        bad = [i for i in formats if not 0 <= i < len(params)]
        if bad:
            raise CheckpointError(
                f"narrow optimizer state names parameter indices {bad}, but the optimizer has {len(params)} "
                "parameters: load it into the optimizer it was saved from"
            )
        self.min_numel, self.keep_embeddings_fp32, self.chunk_numel = min_numel, keep, chunk
        self._want = {params[i]: mf for i, mf in formats.items()}
        for p in params:
            self._convert(p, self._group(p))

