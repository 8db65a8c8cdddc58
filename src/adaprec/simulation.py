"""What a training step would cost on a target accelerator, priced on paper (*simulated for* TARGET).

>>> import torch, transformers, adaprec
>>> with torch.device("meta"):                       # any size: shapes only, no memory
...     model = transformers.LlamaForCausalLM(transformers.LlamaConfig(...))
>>> x = torch.zeros(1, 2048, dtype=torch.long, device="meta")
>>> sim = adaprec.simulate(model, {"input_ids": x, "labels": x}, target="h100-sxm")
>>> print(sim.table())                               # or sim.to_dict(); explain(..., target=) carries it too

Counting comes from :func:`adaprec.explain` (every GEMM call, its MACs and
its tensors' element traffic as the ledger counts them). This module adds:

* **the plan on the target** (:func:`plan_for_target`): per module and role,
  the first format of the policy's ladder (error-budget's, cheapest first)
  that the target runs natively for that op class; modules the policy pins
  (embeddings: fp32) and the edges error-budget treats as sensitive (first
  and last module in plan order) kept at bf16 or wider; attention and other
  activation x activation products in one 16-bit dtype, as the controller
  allows them. No value is looked at: this is the narrowest plan the rules
  allow, an upper bound on what measured health would keep narrow.
* **a roofline per GEMM call** (:mod:`adaprec.energy.roofline`): its forward
  and backward GEMMs at their formats' peaks, against the bytes its tensors
  move in their planned storage formats; energy = time x board power.
* **non-GEMM traffic, estimated**: one shape-only pass counts the elements
  every other op reads and writes (eager, unfused: norms, activations,
  residual adds, softmax of the loss), priced at 2 bytes (4 in fp32); fused
  attention is one opaque op (its inputs and outputs are in its GEMM row).
  The optimizer step streams master weights, gradients and two moments.
* **modeled peak memory**: fp32 master weights, the step's cached weight
  casts, fp32 gradients, Adam moments in the plan's optimizer-state format,
  and the activations autograd saves for backward (counted in the same
  pass), GEMM inputs in the plan's activation format.

Each figure exists for three regimes: the plan, the target's bf16 baseline
(autocast-like: every GEMM in bf16, fp32 master weights) and fp32. Nothing
here is measured; every output says *simulated for* the target and names the
profile's sources and calibration.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from adaprec.energy.model import OPTIMIZER_STATE_ACCESSES
from adaprec.energy.profiles import Profile
from adaprec.energy.roofline import RooflineTime, bytes_time, gemm_time
from adaprec.energy.rules import storage_bits
from adaprec.errors import MissingExtraError, UsageError
from adaprec.formats import get, wider, width_key
from adaprec.inputs import loss_of
from adaprec.tables import render_rows

__all__ = ["Simulation", "SimRow", "Regime", "meta_model", "plan_for_target", "PRESETS", "REGIMES"]

REGIMES = ("plan", "bf16", "fp32")
ROLE_NAMES = ("weight", "activation", "grad_output", "grad_weight")
NON_GEMM_BYTES = {"plan": 2, "bf16": 2, "fp32": 4}  # bytes per element of what flows between other ops
MASTER_BYTES = 4  # fp32 master weights, read and written by the optimizer
ADAM_MOMENTS = 2


@dataclass(frozen=True)
class SimRow:
    """One GEMM call priced on the target: the plan's formats and the roofline in each regime."""

    module: str
    op: str
    kind: str
    macs: int
    roles: Mapping[str, str]  # role -> format under the plan
    gemm_formats: Mapping[str, int]  # executed format -> MACs (forward and backward) under the plan
    times: Mapping[str, RooflineTime]  # regime -> roofline time
    bytes_moved: Mapping[str, float]  # regime -> bytes
    why: str  # how the plan's formats were chosen

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module, "op": self.op, "kind": self.kind, "macs": self.macs,
            "roles": dict(self.roles), "gemm_formats": dict(self.gemm_formats), "why": self.why,
            "time_s": {r: t.time_s for r, t in self.times.items()},
            "bound": {r: t.bound for r, t in self.times.items()},
            "bytes": dict(self.bytes_moved),
        }


@dataclass(frozen=True)
class Regime:
    """A whole step in one regime (the plan, bf16 or fp32): modeled time, energy and peak memory."""

    name: str
    gemm: RooflineTime
    non_gemm_s: float
    optimizer_s: float
    macs_by_format: Mapping[str, int]
    memory: Mapping[str, float]  # weights, gradients, optimizer_state, activations, total (bytes)
    board_power_w: float

    @property
    def time_s(self) -> float:
        return self.gemm.time_s + self.non_gemm_s + self.optimizer_s

    @property
    def energy_j(self) -> float:
        return self.time_s * self.board_power_w

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_s": self.time_s, "energy_j": self.energy_j, "gemm_s": self.gemm.time_s,
            "gemm_compute_s": self.gemm.compute_s, "gemm_memory_s": self.gemm.memory_s,
            "non_gemm_s": self.non_gemm_s, "optimizer_s": self.optimizer_s,
            "macs_by_format": dict(self.macs_by_format), "memory_bytes": dict(self.memory),
        }


@dataclass(frozen=True)
class Simulation:
    """One step of a model priced on a target device, in three regimes; every figure simulated."""

    model: str
    target: str
    profile: Mapping[str, Any]  # the target profile's summary: sources, calibration
    tokens_per_step: int
    parameters: int
    rows: tuple[SimRow, ...]
    regimes: Mapping[str, Regime]
    non_gemm_elements: int
    assumptions: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        return f"simulated for {self.target}"

    def speedup(self, regime: str = "bf16") -> float:
        """Modeled step time of ``regime`` over the plan's (above 1: the plan is faster)."""
        return self.regimes[regime].time_s / self.regimes["plan"].time_s

    def mac_share(self, regime: str = "plan") -> dict[str, float]:
        by = self.regimes[regime].macs_by_format
        total = sum(by.values()) or 1
        return {f: n / total for f, n in sorted(by.items(), key=lambda kv: -kv[1])}

    def projection(self, tokens: float | None = None, grid_kg_per_kwh: float = 0.4,
                   tokens_per_param: float = 20.0) -> dict[str, Any]:
        """A whole run of ``tokens`` (default ``tokens_per_param`` x parameters), per regime.

        GPU-hours, kWh and tCO2e at ``grid_kg_per_kwh`` (board power only: no
        host, network, cooling or PUE).
        """
        tokens = float(tokens if tokens is not None else tokens_per_param * self.parameters)
        steps = tokens / self.tokens_per_step
        out: dict[str, Any] = {"tokens": tokens, "steps": steps, "grid_kg_per_kwh": grid_kg_per_kwh}
        for name, r in self.regimes.items():
            kwh = steps * r.energy_j / 3.6e6
            out[name] = {"device_hours": steps * r.time_s / 3600, "kwh": kwh, "tco2e": kwh * grid_kg_per_kwh / 1000}
        return out

    def summary_lines(self) -> list[str]:
        p, b, f = (self.regimes[r] for r in REGIMES)
        share = ", ".join(f"{k} {100 * v:.1f} %" for k, v in self.mac_share().items())
        gib = 1024**3
        lines = [
            f"{self.label} (profile {self.profile['name']}: {self.profile['description']}); "
            "nothing below was measured",
            f"  per step ({self.tokens_per_step:,} tokens): plan {p.time_s * 1e3:.1f} ms, {p.energy_j:.4g} J; "
            f"bf16 baseline {b.time_s * 1e3:.1f} ms, {b.energy_j:.4g} J; fp32 {f.time_s * 1e3:.1f} ms, "
            f"{f.energy_j:.4g} J; plan vs bf16 {self.speedup('bf16'):.2f}x faster, "
            f"{100 * (1 - p.energy_j / b.energy_j):.1f} % less energy",
            f"  plan's MACs by format: {share}",
            f"  time split (plan): GEMMs {p.gemm.time_s * 1e3:.1f} ms, other ops {p.non_gemm_s * 1e3:.1f} ms "
            f"(estimated traffic), optimizer {p.optimizer_s * 1e3:.1f} ms",
            "  peak memory modeled (plan / bf16 / fp32, GiB): "
            + "; ".join(f"{k} {p.memory[k] / gib:.2f} / {b.memory[k] / gib:.2f} / {f.memory[k] / gib:.2f}"
                        for k in ("weights", "gradients", "optimizer_state", "activations", "total")),
        ]
        lines += [f"  sources: {s}" for s in self.profile["sources"]]
        if self.profile.get("calibration"):
            lines.append(f"  calibration: {self.profile['calibration']}")
        lines += [f"  assumption: {a}" for a in self.assumptions]
        lines += [f"  note: {n}" for n in self.notes]
        return lines

    _HEAD = ("module", "op", "MACs fwd+bwd", "plan formats (w/a/go)", "GEMMs in", "plan ms", "bound",
             "bf16 ms", "fp32 ms")

    def table(self, style: str = "markdown", max_rows: int | None = None) -> str:
        """Summary, then one row per GEMM call (``max_rows``: the costliest only), all simulated."""
        rows = sorted(self.rows, key=lambda r: -r.times["plan"].time_s)
        if max_rows is not None:
            rows = rows[:max_rows]
        body = []
        for r in rows:
            body.append((
                r.module or "<root>", r.op, f"{r.macs:,}",
                "/".join(r.roles[k] for k in ("weight", "activation", "grad_output")),
                ", ".join(sorted(r.gemm_formats)), f"{r.times['plan'].time_s * 1e3:.3f}", r.times["plan"].bound,
                f"{r.times['bf16'].time_s * 1e3:.3f}", f"{r.times['fp32'].time_s * 1e3:.3f}",
            ))
        lines = self.summary_lines() + [""] + render_rows(self._HEAD, body, style)
        if max_rows is not None and len(self.rows) > max_rows:
            lines.append(f"({len(self.rows) - max_rows} cheaper GEMM calls not shown; to_dict() has all)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table("plain", max_rows=20)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "model": self.model, "target": self.target, "profile": dict(self.profile),
            "tokens_per_step": self.tokens_per_step, "parameters": self.parameters,
            "speedup_vs_bf16": self.speedup("bf16"), "speedup_vs_fp32": self.speedup("fp32"),
            "mac_share": self.mac_share(), "regimes": {k: v.to_dict() for k, v in self.regimes.items()},
            "non_gemm_elements": self.non_gemm_elements, "projection_20_tokens_per_param": self.projection(),
            "assumptions": list(self.assumptions), "notes": list(self.notes),
            "rows": [r.to_dict() for r in self.rows],
        }


# --- the plan on the target ---------------------------------------------------------------------


def _native(profile: Profile, op_class: str) -> tuple[str, ...]:
    return tuple(profile.native.get(op_class, ())) + ("fp32",)


def plan_for_target(
    modules: Sequence[tuple[str, str]],
    profile: Profile,
    ladders: Mapping[str, Sequence[str]],
    pinned: Mapping[str, str] | None = None,
    edges: Sequence[str] = (),
    allow: Sequence[str] | None = None,
) -> dict[str, tuple[dict[str, str], str]]:
    """Per module: role -> format, and why. ``modules``: (name, op kind) in plan order.

    ``ladders``: per role, formats cheapest first (the policy's). The first
    one native on ``profile`` for the op class (and in ``allow`` when given)
    wins. ``pinned`` modules keep their pin; ``edges`` keep bf16 at least;
    attention and activation x activation products run one 16-bit dtype.
    """

    pinned = dict(pinned or {})
    out: dict[str, tuple[dict[str, str], str]] = {}
    for name, kind in modules:
        if name in out:
            continue
        if name in pinned:
            out[name] = ({r: pinned[name] for r in ROLE_NAMES}, f"pinned to {pinned[name]}")
            continue
        coupled = kind != "linear"
        native = _native(profile, "attention" if kind == "attention" else "gemm")
        if coupled:  # one 16-bit dtype for the whole op, as the controller allows these kinds
            native = tuple(f for f in native if f in ("bf16", "fp16")) or ("fp32",)
        roles: dict[str, str] = {}
        for role in ROLE_NAMES:
            ladder = [f for f in ladders.get(role, ()) if f in native and (allow is None or f in allow or f == "fp32")]
            if name in edges:
                ladder = [f for f in ladder if width_key(f) >= width_key("bf16")]
            roles[role] = ladder[0] if ladder else "fp32"
        if coupled:
            widest = max((roles[r] for r in ("weight", "activation", "grad_output")), key=width_key)
            roles.update({r: widest for r in ("weight", "activation", "grad_output")})
        why = "edge kept at bf16 or wider (error-budget's sensitive first/last module)" if name in edges else (
            "one 16-bit dtype for the op (activation x activation)" if coupled else
            "narrowest native format of each role's ladder")
        out[name] = (roles, why)
    return out


def _gemm_formats(gemms: Sequence[Any], roles: Mapping[str, str]) -> dict[str, int]:
    """Executed format -> MACs for a call's forward and backward GEMMs (the wider operand's format)."""
    go = roles["grad_output"]
    out: dict[str, int] = {}

    def add(fmt: str, macs: int) -> None:
        out[fmt] = out.get(fmt, 0) + macs

    for g in gemms:
        fa, fb = roles.get(g.a_role, "fp32"), roles.get(g.b_role, "fp32")
        add(wider(fa, fb), g.macs)
        if g.grad_a:
            add(wider(go, fb), g.macs)
        if g.grad_b:
            add(wider(go, fa), g.macs)
    return out


def _bits(fmt: str) -> float:
    return storage_bits(get(fmt))


# --- the shape-only pass: other ops' traffic and what autograd saves --------------------------------


def _shape_pass(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                loss_fn: Callable[[Any], Any] | None) -> tuple[int, dict[str, int], int]:
    """(elements other ops read and write, saved GEMM-input elements per module, other saved elements).

    GEMMs (``F.linear``, ``addmm`` with a parameter) and fused attention are
    stand-ins that only produce shapes, so the pass is cheap at any size and
    their traffic is not counted twice; every other op runs as it is.
    """
    owner: dict[int, str] = {}
    for mname, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owner.setdefault(id(p), mname)
    params = {id(p) for p in model.parameters()}

    class _Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, out_features):  # type: ignore[override]
            ctx.save_for_backward(x)
            ctx.w_shape = w.shape
            return x.new_empty((*x.shape[:-1], out_features))

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return x.new_empty(x.shape), g.new_empty(ctx.w_shape), None

    class _Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):  # type: ignore[override]
            ctx.shapes = (q.shape, k.shape, v.shape)
            return q.new_empty((*q.shape[:-1], v.shape[-1]))

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            return tuple(g.new_empty(s) for s in ctx.shapes)

    def mark(x: Any, w: Any) -> None:
        name = owner.get(id(w))
        if name is not None:
            x._adaprec_gemm_input = name

    class _Stand(TorchFunctionMode):
        def __torch_function__(self, func, types, a=(), kw=None):  # noqa: ANN001, ANN204
            kw = kw or {}
            if func is F.linear:
                x, w = a[0] if a else kw["input"], a[1] if len(a) > 1 else kw["weight"]
                b = a[2] if len(a) > 2 else kw.get("bias")
                if id(w) in params and w.dim() == 2:
                    mark(x, w)
                    y = _Linear.apply(x, w, w.shape[0])
                    return y if b is None else y + b
            elif func is torch.addmm and len(a) >= 3 and id(a[2]) in params:
                mark(a[1], a[2])
                return _Linear.apply(a[1], a[2].t(), a[2].shape[1]) + a[0]
            elif func is F.scaled_dot_product_attention:
                q, k, v = a[0], a[1], a[2]
                return _Attention.apply(q, k, v)
            return func(*a, **kw)

    skip = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_int_mm", "convolution", "convolution_backward",
            "detach", "alias", "_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty",
            "new_empty_strided", "lift_fresh", "_local_scalar_dense", "zeros_like", "zeros"}

    class _Count(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, a=(), kw=None):  # noqa: ANN001, ANN204
            out = func(*a, **(kw or {}))
            name = func.overloadpacket.__name__
            if name not in skip and not func.is_view:
                outs = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                if name == "embedding":  # a gather: the rows it reads, the rows it writes
                    self.elements += 2 * sum(outs)
                else:
                    ins = [t.numel() for t in tree_leaves((a, kw)) if isinstance(t, torch.Tensor)]
                    self.elements += sum(ins) + sum(outs)
            return out

    saved: dict[int, tuple[Any, int, str | None]] = {}

    def pack(t: Any) -> Any:
        base = t._base if t._base is not None else t
        if id(t) in params or id(base) in params:
            return t
        if id(base) not in saved:
            saved[id(base)] = (base, base.numel(), getattr(t, "_adaprec_gemm_input", None))
        return t

    grads = [(p, p.grad) for p in model.parameters()]
    counter = _Count()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _Stand(), counter:
            out = model(*args, **kwargs)
            loss = loss_of(out, loss_fn)
            if loss is not None:
                loss.backward()
    finally:
        for p, g in grads:
            p.grad = g
    by_module: dict[str, int] = {}
    other = 0
    for _, n, gemm_of in saved.values():
        if gemm_of is None:
            other += n
        else:
            by_module[gemm_of] = by_module.get(gemm_of, 0) + n
    return counter.elements, by_module, other


# --- pricing ------------------------------------------------------------------------------------------


def _simulate(
    *, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], loss_fn: Callable[[Any], Any] | None,
    rows: Sequence[Any], profile: Profile, order: Sequence[str], pinned: Mapping[str, str],
    ladders: Mapping[str, Sequence[str]], edges: Sequence[str], allow: Sequence[str] | None, name: str,
) -> Simulation:
    """Price explain's rows on ``profile`` (called by :func:`adaprec.explain` when given a target)."""


    present = {r.module for r in rows}
    kinds: dict[str, str] = {}
    for r in rows:  # a module with a linear and any other kind is coupled (one dtype)
        kinds[r.module] = r.kind if kinds.get(r.module, r.kind) == r.kind else "matmul"
    modules = [(m, kinds[m]) for m in order if m in present] + [(m, k) for m, k in kinds.items() if m not in order]
    plan = plan_for_target(modules, profile, ladders, pinned, edges, allow)
    regime_roles = {
        "bf16": {r: "bf16" for r in ROLE_NAMES},
        "fp32": {r: "fp32" for r in ROLE_NAMES},
    }
    sim_rows: list[SimRow] = []
    gemm_total = {k: RooflineTime(0.0, 0.0, 0.0) for k in REGIMES}
    macs_by = {k: {} for k in REGIMES}  # type: dict[str, dict[str, int]]
    for r in rows:
        roles, why = plan.get(r.module, ({k: "fp32" for k in ROLE_NAMES}, "not covered: fp32"))
        if not r.covered:
            roles, why = {k: "fp32" for k in ROLE_NAMES}, f"not covered: {r.reason}"
        times, nbytes, fmts_plan = {}, {}, {}
        for regime in REGIMES:
            rr = roles if regime == "plan" else regime_roles[regime]
            if regime == "bf16" and r.kind == "attention" and "bf16" not in _native(profile, "attention"):
                rr = regime_roles["fp32"]  # no 16-bit attention kernel on this target
            fmts = _gemm_formats(r.gemms, rr)
            b = sum(n * _bits(rr.get(role, "fp32")) / 8 for role, n in r.elements.items() if role in rr)
            t = gemm_time(profile, fmts.items(), b)
            times[regime], nbytes[regime] = t, b
            gemm_total[regime] = gemm_total[regime] + t
            for f, n in fmts.items():
                macs_by[regime][f] = macs_by[regime].get(f, 0) + n
            if regime == "plan":
                fmts_plan = fmts
        sim_rows.append(SimRow(r.module, r.op, r.kind, r.macs, roles, fmts_plan, times, nbytes, why))

    non_gemm, saved_gemm, saved_other = _shape_pass(model, args, kwargs, loss_fn)
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    regimes: dict[str, Regime] = {}
    for regime in REGIMES:
        state_fmt = "fp32"
        state_b = _bits(state_fmt) / 8
        if regime == "plan":
            weight_copy = sum(
                p.numel() * _bits(plan.get(owner, ({"weight": "fp32"}, ""))[0]["weight"]) / 8
                for owner, p in _owned_params(model) if p.requires_grad
                and plan.get(owner, ({"weight": "fp32"}, ""))[0]["weight"] != "fp32"
            )
            act = saved_other * NON_GEMM_BYTES["plan"] + sum(
                n * _bits(plan.get(m, ({"activation": "bf16"}, ""))[0]["activation"]) / 8
                for m, n in saved_gemm.items()
            )
        elif regime == "bf16":
            weight_copy = trainable * 2  # autocast's cached bf16 weight casts
            act = (saved_other + sum(saved_gemm.values())) * 2
        else:
            weight_copy = 0
            act = (saved_other + sum(saved_gemm.values())) * 4
        memory = {
            "weights": n_params * MASTER_BYTES + weight_copy,
            "gradients": trainable * 4.0,  # fp32 .grad of fp32 master weights
            "optimizer_state": trainable * ADAM_MOMENTS * state_b,
            "activations": float(act),
        }
        memory["total"] = sum(memory.values())
        # optimizer: master read + write, gradient read, each moment read + write
        opt_bytes = trainable * (2 * MASTER_BYTES + 4 + OPTIMIZER_STATE_ACCESSES * state_b)
        regimes[regime] = Regime(
            regime, gemm_total[regime], bytes_time(profile, non_gemm * NON_GEMM_BYTES[regime]),
            bytes_time(profile, opt_bytes), macs_by[regime], memory, profile.board_power_w,
        )
    tokens = _tokens(args, kwargs)
    assumptions = (
        "roofline per GEMM call: max(2 x MACs / (peak of its format x achievable compute), bytes of its tensors "
        "in their storage formats / (bandwidth x achievable memory)); calls run one after another",
        f"energy = modeled time x {profile.board_power_w:g} W board power (upper-bound style: no idle or "
        "partial-power state)",
        "non-GEMM traffic is an estimate: every other op's inputs and outputs once, eager and unfused "
        f"({non_gemm:,} elements per step), at 2 bytes (4 in fp32); fused attention counted only by its GEMM row",
        "optimizer: Adam-like, fp32 master weights read and written, fp32 gradient read, "
        f"{ADAM_MOMENTS} moments in fp32 read and written",
        "peak memory: fp32 master weights + the step's cached weight casts + fp32 gradients + moments + every "
        "tensor autograd saves for backward (GEMM inputs in the plan's activation format, the rest 2 bytes; "
        "4 in fp32); no activation checkpointing, no fragmentation, no sharding",
        "the bf16 baseline is autocast-like: every GEMM and attention in bf16, fp32 master weights; the fp32 "
        "regime runs fp32 units (not tf32)",
        "the plan is the narrowest each role's ladder allows natively on the target, chosen without looking at "
        "values: measured health may keep modules wider",
    )
    notes = []
    if allow is not None:
        notes.append(f"plan restricted to formats {', '.join(allow)}")
    return Simulation(
        model=name, target=profile.name, profile=profile.summary(), tokens_per_step=tokens, parameters=n_params,
        rows=tuple(sim_rows), regimes=regimes, non_gemm_elements=non_gemm, assumptions=assumptions,
        notes=tuple(notes),
    )


def _owned_params(model: Any) -> list[tuple[str, Any]]:
    seen: set[int] = set()
    out = []
    for mname, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((mname, p))
    return out


def _tokens(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """Tokens in the example batch: the first integer tensor's elements (else the first tensor's rows)."""
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    ints = [t for t in tensors if not t.is_floating_point()]
    if ints:
        return int(ints[0].numel())
    if tensors:
        t = tensors[0]
        return int(t.shape[0] * (t.shape[1] if t.dim() > 2 else 1))
    return 1


# --- models on the meta device, by name or Hugging Face config --------------------------------------

# Sizes as published in each model's Hugging Face config (architecture only: no weights are read).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2-124m": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=2048)),
    "llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                               tie_word_embeddings=True)),
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "llama3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "llama2-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)),
}


def meta_model(spec: str, seq_len: int = 2048) -> tuple[Any, str]:
    """A causal LM built on the meta device from a preset name or a Hugging Face ``config.json``; (model, name).

    Needs ``transformers``. Nothing is allocated: parameters are shapes only.
    """
    try:
        import transformers
    except ImportError:
        raise MissingExtraError("building a model from a config needs transformers: pip install transformers") from None
    if spec in PRESETS:
        kind, kw = PRESETS[spec]
        if kind == "gpt2":
            cfg: Any = transformers.GPT2Config(**{**kw, "n_positions": max(kw["n_positions"], seq_len)})
        else:
            cfg = transformers.LlamaConfig(**kw, max_position_embeddings=max(4096, seq_len))
        name = spec
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UsageError(
                f"{spec!r} is neither a known model ({', '.join(PRESETS)}) nor a Hugging Face config.json; "
                "pass one of those names or the path of a config file"
            )
        try:
            d = json.loads(path.read_text())
            cfg = transformers.AutoConfig.for_model(**d)
        except (ValueError, KeyError) as e:
            raise UsageError(f"{path}: not a Hugging Face model config ({e}); it needs a 'model_type'") from None
        name = path.parent.name if path.name == "config.json" else path.stem
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model, name
