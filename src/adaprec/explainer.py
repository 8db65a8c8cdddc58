"""What adaprec would do to a model on this machine, asked before training.

>>> import adaprec
>>> e = adaprec.explain(model, example_inputs)        # policy="error-budget", hardware="auto"
>>> print(e.table())                                  # markdown; e.table("plain"); e.to_dict()

One forward and one backward pass on the example inputs, with the engine's
op recognition counting (as :class:`~adaprec.engine.MacCounter` does, fp32,
numerics unchanged), lists every GEMM the model runs: the module it is
attributed to, the op, operand shapes, MACs forward and backward, the
formats the policy could give it on this device (the hardware-allowed set
per module, exactly as the controller computes it for its policy), which of
them run natively here (:func:`adaprec.engine.execution.decide`), the
modeled energy of one step of that GEMM in fp32 and in its best native
format (the ledger's pricing, :func:`adaprec.energy.price_step`), and the
speedup the device probe measured for that format. Coverage comes first:
the share of MACs under the plan, and what is not covered and why.

The model is left as it was: gradients, buffers (batch-norm statistics) and
the RNG state are restored, and adaprec's hooks are removed.

The command line does the same for a task: ``adaprec explain CONFIG`` (the
config's task and policy), ``adaprec explain digits-cnn`` or
``adaprec explain package.module:function`` (a function returning a Task).
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaprec.controller import AdaptivePrecision
from adaprec.energy import load_profile, price_step
from adaprec.energy.counting import StepCost
from adaprec.energy.roofline import load_target
from adaprec.engine import PrecisionEngine
from adaprec.engine.execution import FP32_EXEC, decide
from adaprec.engine.ops import OP_CLASS, OpCall
from adaprec.engine.tally import call_cost
from adaprec.errors import AdaprecError, TaskError, UsageError
from adaprec.experiments.config import load_config
from adaprec.experiments.runner import epoch_seed
from adaprec.experiments.tasks import get_task
from adaprec.formats import get, width_key
from adaprec.hardware.report import format_speedup
from adaprec.inputs import loss_of, split_inputs
from adaprec.plan import ModulePrecision, TensorRecipe
from adaprec.policies.error_budget import DEFAULT_LADDERS, ErrorBudgetPolicy
from adaprec.policies.ladder import recipe_for
from adaprec.simulation import Simulation, _simulate, meta_model
from adaprec.tables import render_rows

__all__ = ["Explanation", "GemmRow", "MetaDeviceError", "explain", "explain_task", "simulate", "simulate_config"]

_OP_NAMES = {"scaled_dot_product_attention": "attention", "multi_head_attention_forward": "mha"}


@dataclass(frozen=True)
class GemmRow:
    """One matmul-like call of the model (its forward GEMMs and the backward GEMMs autograd runs for it).

    ``formats``: what the policy could give it on this device (narrowest
    first, fp32 always there); ``native``: for each of them, whether this op
    runs natively in it here. ``fp32_j`` and ``best_j``: modeled joules of
    one step of this call (compute and its tensors' traffic) in fp32 and in
    ``best``, the cheapest format of ``formats`` that runs natively;
    ``speedup``: the probe's measured speedup of ``best`` over fp32 for this
    op class (None where not measured).
    """

    module: str
    op: str  # linear | addmm | matmul | mm | bmm | einsum | conv2d | attention | mha | lstm | ...
    kind: str  # the engine's op kind: linear | conv | attention | matmul | einsum | mha | rnn
    shapes: tuple[tuple[int, ...], ...]
    forward_macs: int
    backward_macs: int
    covered: bool
    reason: str  # why not covered ("" when covered)
    start: str  # the precision the policy starts this module in
    formats: tuple[str, ...]
    native: Mapping[str, bool]
    fp32_j: float
    best: str
    best_j: float
    speedup: float | None
    gemms: tuple[Any, ...] = ()  # the engine's OpGemm records: label, MACs, operand roles, which grads run
    elements: Mapping[str, int] = field(default_factory=dict)  # per role, elements read or written in a step

    @property
    def macs(self) -> int:
        """Forward plus backward MACs."""
        return self.forward_macs + self.backward_macs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shapes"] = [list(s) for s in self.shapes]
        d["formats"] = list(self.formats)
        d["native"] = dict(self.native)
        d["elements"] = dict(self.elements)
        d["macs"] = self.macs
        return d


@dataclass(frozen=True)
class Explanation:
    """The answer of :func:`explain`: every GEMM with its formats and costs, coverage first."""

    model: str
    device: str
    policy: str
    backend: str
    profile: str
    rows: tuple[GemmRow, ...]
    total_macs: int  # the engine's count of one step, forward and backward
    uncovered: Mapping[str, str] = field(default_factory=dict)  # module -> why its GEMMs run fp32
    notes: tuple[str, ...] = ()
    simulation: Any = None  # an adaprec.simulation.Simulation when explain() was given a target

    @property
    def covered_macs(self) -> int:
        return sum(r.macs for r in self.rows if r.covered)

    @property
    def coverage(self) -> float:
        """Share of the step's MACs under the plan (1.0 when the model runs no GEMM)."""
        return self.covered_macs / self.total_macs if self.total_macs else 1.0

    @property
    def fp32_j(self) -> float:
        return sum(r.fp32_j for r in self.rows)

    @property
    def best_j(self) -> float:
        return sum(r.best_j for r in self.rows)

    def macs_by_module(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.module] = out.get(r.module, 0) + r.macs
        return out

    # --- showing ------------------------------------------------------------------
    def summary_lines(self) -> list[str]:
        lines = [
            f"adaprec explain: {self.model} on {self.device}",
            f"policy {self.policy}, backend {self.backend}; energy modeled with profile {self.profile}",
            f"coverage: {100 * self.coverage:.1f} % of {self.total_macs:,} MACs per step (forward + backward) "
            "under the plan",
        ]
        by_module = self.macs_by_module()
        for m, why in self.uncovered.items():
            share = by_module.get(m, 0) / self.total_macs if self.total_macs else 0.0
            lines.append(f"  not covered, runs fp32: {m or '<root>'} ({100 * share:.1f} % of MACs): {why}")
        if self.fp32_j > 0:
            saving = 1 - self.best_j / self.fp32_j
            lines.append(
                f"modeled energy per step: fp32 {self.fp32_j:.4g} J; each GEMM in its best native format "
                f"{self.best_j:.4g} J ({100 * saving:.1f} % less)"
            )
        lines += [f"note: {n}" for n in self.notes]
        if self.simulation is not None:  # kept apart from the figures above: nothing in it ran
            lines += ["", *self.simulation.summary_lines()]
        return lines

    _HEAD = ("module", "op", "shapes", "MACs fwd+bwd", "starts in", "formats here", "native here",
             "fp32 J/step", "best", "best J/step", "probed speedup")

    def _cells(self, r: GemmRow) -> tuple[str, ...]:
        native = [f for f in r.formats if r.native.get(f)]
        return (
            r.module or "<root>",
            r.op,
            " · ".join("x".join(map(str, s)) for s in r.shapes),
            f"{r.macs:,}",
            r.start,
            ", ".join(r.formats),
            ", ".join(native) if native else "-",
            f"{r.fp32_j:.3g}",
            r.best,
            f"{r.best_j:.3g}",
            format_speedup(r.speedup) if r.best != "fp32" else "1.00x",
        )

    def table(self, style: str = "markdown") -> str:
        """Coverage and totals, then one row per GEMM call: ``style`` ``"markdown"`` or ``"plain"``."""
        if style not in ("markdown", "plain"):
            raise UsageError(f"table style must be 'markdown' or 'plain', got {style!r}")
        body = [self._cells(r) for r in self.rows]
        lines = self.summary_lines() + [""] + render_rows(self._HEAD, body, style, rule=True)
        if not body:
            lines.append("(no matmul-like op ran)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table("plain")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {
            "model": self.model, "device": self.device, "policy": self.policy, "backend": self.backend,
            "profile": self.profile, "total_macs": self.total_macs, "covered_macs": self.covered_macs,
            "coverage": self.coverage, "uncovered": dict(self.uncovered), "fp32_j": self.fp32_j,
            "best_j": self.best_j, "notes": list(self.notes), "rows": [r.to_dict() for r in self.rows],
            "simulation": None if self.simulation is None else self.simulation.to_dict(),
        }


# --- the counting pass ------------------------------------------------------------------------------


def _short(mp: Any) -> str:
    """A module precision as a few words: ``bf16``, ``int8/tensor``, or ``w=... a=... go=...``."""
    shorts = [mp.weight.short(), mp.activation.short(), mp.grad_output.short()]
    if len({r.split("/")[0] for r in shorts}) == 1:
        return shorts[0] if len(set(shorts)) == 1 else shorts[0].split("/")[0]
    return f"w={shorts[0]} a={shorts[1]} go={shorts[2]}"


def _uniform(fmt: str) -> ModulePrecision:
    """The module precision that puts every operand of an op in ``fmt``, with the recipes policies use."""
    if fmt == "fp32":
        return ModulePrecision()
    gw = fmt if get(fmt).bits >= 16 else "bf16"  # a GEMM output, accumulated wide (as the error budget keeps it)
    return ModulePrecision(
        weight=recipe_for(fmt, "weight"), activation=recipe_for(fmt, "activation"),
        grad_output=recipe_for(fmt, "grad_output"), grad_weight=TensorRecipe(gw),
    )


class MetaDeviceError(UsageError):
    """A model explained on the meta device ran an op that needs tensor values."""


_META_OPS = (  # what torch says on meta -> the op the user wrote
    ("item() cannot be called on meta", "Tensor.item() (also bool(), int(), float() of a tensor, or an `if` / "
                                        "`while` on a tensor: data-dependent control flow)"),
    ("nonzero", "torch.nonzero (also boolean-mask indexing x[mask] and one-argument torch.where: the output "
                "shape depends on the values)"),
    ("copy out of meta", "a copy of values to Python or the host (Tensor.tolist(), .numpy(), .cpu())"),
)


def _on_meta(model: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
    return any(t.is_meta for t in tensors)


@contextlib.contextmanager
def _meta_errors(on_meta: bool) -> Iterator[None]:
    """On the meta device, turn torch's 'needs values' errors into a MetaDeviceError naming the op and the line."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as e:
        if not on_meta or isinstance(e, MetaDeviceError):
            raise
        text = str(e)
        op = next((what for key, what in _META_OPS if key in text), None)
        if op is None and "meta" not in text.lower():
            raise
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if "/torch/" not in f.filename and "/adaprec/" not in f.filename]
        where = f" at {frames[-1].filename}:{frames[-1].lineno} (`{(frames[-1].line or '').strip()}`)" if frames else ""
        raise MetaDeviceError(
            f"the model's forward needs tensor values, which the meta device does not have: {op or text.splitlines()[0]}"
            f"{where}. explain() on meta counts shapes only; make that step shape-only (e.g. pass the mask or "
            "the length as an argument), or explain a smaller copy of the model on the CPU"
        ) from e


def _counting_pass(model: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any],
                   loss_fn: Callable[[Any], Any] | None, module_filter: Any) -> tuple[list[tuple[str, OpCall]], StepCost]:
    """One forward and backward pass under a bare engine (fp32 numerics): every recognised call, and the step's cost.

    The calls are seen through the engine's public tally (``on_record``); the backward GEMMs are recorded at
    forward time and join the cost after backward, as a counting pass that runs no optimizer needs.
    """
    engine = PrecisionEngine(model, backend="emulate", module_filter=module_filter)
    calls: list[tuple[str, OpCall]] = []
    engine.tally.on_record.append(lambda name, call, ex, mp: calls.append((name, call)))
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices):
            for p in model.parameters():
                p.grad = None
            with engine.activate():
                out = model(*args, **kwargs)
            loss = loss_of(out, loss_fn)
            if loss is not None:
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise UsageError("explain(): loss_fn must return a scalar tensor")
                loss.backward()
        engine.commit_backward()
        return calls, engine.pop_step_cost()
    finally:
        engine.remove()


def _restore_after(model: Any) -> Callable[[], None]:
    """Save gradients and buffers now; the returned function puts them back."""
    grads = [(p, p.grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def restore() -> None:
        for p, g in grads:
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)

    return restore


def explain(
    model: Any,
    example_inputs: Any,
    policy: Any = "error-budget",
    hardware: Any = "auto",
    *,
    loss_fn: Callable[[Any], Any] | None = None,
    energy_profile: str = "7nm",
    name: str | None = None,
    target: str | None = None,
    sim_formats: Sequence[str] | None = None,
    **ap_kwargs: Any,
) -> Explanation:
    """Every GEMM ``model`` runs on ``example_inputs``, the formats ``policy`` could give it here, and their costs.

    Args:
        model: an ``nn.Module`` (left as it was).
        example_inputs: one batch: a tensor (``model(x)``), a tuple or list
            (``model(*inputs)``) or a dict (``model(**inputs)``).
        policy: as for :class:`~adaprec.AdaptivePrecision` (name, dict, plan or policy).
        hardware: ``"auto"`` (probe this device, cached), a
            :class:`~adaprec.hardware.DeviceReport`, or None (nothing narrow native).
        loss_fn: ``output -> scalar`` for the backward pass; default: the
            output's ``loss`` (Hugging Face models given labels), else the sum
            of every floating output that needs a gradient.
        energy_profile: the device profile the modeled joules come from.
        name: what to call the model in the table (default: its class name).
        target: a roofline device profile (``"h100-sxm"``, ``"a100"``,
            ``"rtx-4090"``, ``"cpu-epyc-2t"`` or a TOML file): adds
            ``.simulation``, the step priced on that device
            (:mod:`adaprec.simulation`), labelled *simulated for* it and kept
            apart from the figures of this machine. Policies may then choose
            any format (research mode, as for ``AdaptivePrecision(target=)``).
        sim_formats: restrict the simulated plan to these formats.
        **ap_kwargs: other :class:`~adaprec.AdaptivePrecision` keywords that
            change what is covered or allowed (``backend``, ``module_filter``,
            ``pins``, ``quantize_embeddings``).

    A model on the meta device (any size, no memory) is explained from
    shapes alone: the device probe and the monitor, which need values, are
    skipped (a note says so); a forward that needs values (``.item()``,
    ``if`` on a tensor, ``nonzero``) raises :class:`MetaDeviceError` naming the op.

    Returns an :class:`Explanation` (``.table()``, ``.to_dict()``).
    """
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"explain() needs a torch.nn.Module, got {type(model).__name__}")
    profile = load_profile(energy_profile)
    target_profile = None
    if target is not None:
        target_profile = load_target(target)
        ap_kwargs["target"] = target
    args, kwargs = split_inputs(example_inputs)
    on_meta = _on_meta(model, args, kwargs)
    meta_notes: list[str] = []
    if on_meta:
        hardware = None  # a meta tensor has no device to probe
        meta_notes.append(
            "meta device: shapes only. Skipped because they need values: the device probe (nothing narrow is "
            "native here), the monitor (SQNR, overflow), the probed speedups and any measured figure"
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable or [torch.nn.Parameter(torch.zeros(1))], lr=0.0)  # never stepped
    ap_kwargs.setdefault("tune_allocator", False)  # a look at the model changes nothing process-wide
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ap = AdaptivePrecision(model, optimizer, policy, hardware=hardware, energy_profile=energy_profile,
                               **ap_kwargs)
        restore = _restore_after(model)
        try:
            with _meta_errors(on_meta):
                ap.prepare(*args, **kwargs)  # the controller's discovery: sites, pins, the policy set up for them
            # per module, what this device runs natively and fast (None: research)
            allowed, _ = ap.allowed_formats()
            plan = ap.plan
            candidates = tuple(ap.policy.candidate_formats)
            caps, backend = ap.engine.caps, ap.engine.backend
            with _meta_errors(on_meta):
                calls, total = _counting_pass(model, args, kwargs, loss_fn, ap.engine.module_filter)
        finally:
            restore()
            ap.close()
    for w in caught:
        text = str(w.message)
        if text.startswith("adaprec: "):
            notes.append(text.removeprefix("adaprec: "))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    report = ap.hardware
    uncovered: dict[str, str] = {}
    rows: list[GemmRow] = []
    for mod, call in calls:
        if not call.gemms:  # an embedding's gather: traffic, no GEMM
            continue
        kind = call.site_kind
        site = ap.engine.sites.get(mod)
        if site is not None:
            covered, reason = site.covered, site.reason
        else:  # ran only with gradients enabled: the no-grad discovery pass never saw it
            covered, reason = False, "runs only with gradients enabled, so discovery (ap.prepare) does not see it"
        if not covered:
            uncovered[mod] = reason
        mp = plan.modules.get(mod) if covered else None
        formats: tuple[str, ...]
        if mp is None:
            start, formats = ("fp32" if covered else "fp32 (not covered)"), ("fp32",)
        elif mod in plan.pinned:
            start = f"{_short(mp)} (pinned)"
            formats = tuple(dict.fromkeys((mp.weight.format, "fp32")))
        else:
            start = _short(mp)
            wanted = set(candidates) or {mp.weight.format, mp.activation.format, mp.grad_output.format}
            here = allowed.get(mod, frozenset({"fp32"})) if allowed is not None else None
            formats = tuple(sorted({f for f in wanted if here is None or f in here} | {"fp32"}, key=width_key))
        weight_op = call.weight is not None
        fp32_j = price_step(StepCost({mod: call_cost(call, FP32_EXEC, None, kind)}), profile, "fp32").modeled_j
        native: dict[str, bool] = {}
        priced: dict[str, float] = {}
        for f in formats:
            if f == "fp32":
                native[f], priced[f] = True, fp32_j
                continue
            umf = _uniform(f)
            ex = decide(kind, umf, caps, backend, weight_op)
            native[f] = all(nat for _, nat in ex.formats.values())
            if native[f]:
                cost = StepCost({mod: call_cost(call, ex, umf, kind)})
                priced[f] = price_step(cost, profile, "executed").modeled_j
        best = min(priced, key=lambda f: (priced[f], width_key(f)))
        support = report.table_for(OP_CLASS.get(kind, "gemm")).get(best) if report is not None else None
        rows.append(GemmRow(
            module=mod, op=_OP_NAMES.get(call.func_name, call.func_name), kind=kind, shapes=call.shapes,
            forward_macs=call.macs, backward_macs=call.backward_macs(), covered=covered, reason=reason,
            start=start, formats=formats, native=native, fp32_j=fp32_j, best=best, best_j=priced[best],
            speedup=1.0 if best == "fp32" else (support.speedup if support is not None else None),
            gemms=tuple(call.gemms), elements=dict(call.elements),
        ))
    if on_meta:
        device = "the meta device (shapes only; not probed)"
    elif report is None:
        device = "a device not probed (hardware=None: nothing narrow runs natively)"
    else:
        device = f"{report.device} ({report.name}, torch {report.torch_version}, {report.threads} threads)"
    notes = [n for n in dict.fromkeys(notes) if not any(why and why in n for why in uncovered.values())]
    if on_meta:  # the emulation warnings speak of running on this device; nothing runs on meta
        notes = meta_notes + [n for n in notes if "can only emulate" not in n]
    simulation = None
    if target_profile is not None:
        base = getattr(ap.policy, "policy", ap.policy)  # inside the guard
        budget = base if isinstance(base, ErrorBudgetPolicy) else None
        ladders = budget.ladders if budget is not None else DEFAULT_LADDERS
        order = list(plan.modules)
        edges = [order[0], order[-1]] if (budget is None or budget.sensitive_edges) and len(order) > 2 else []
        pinned = {m: plan.modules[m].weight.format for m in plan.pinned if m in plan.modules}
        with _meta_errors(on_meta):
            simulation = _simulate(
                model=model, args=args, kwargs=kwargs, loss_fn=loss_fn, rows=rows, profile=target_profile,
                order=order, pinned=pinned, ladders=ladders, edges=edges,
                allow=None if sim_formats is None else list(sim_formats), name=name or type(model).__name__,
            )
    return Explanation(
        model=name or type(model).__name__, device=device, policy=ap.policy.name, backend=backend,
        profile=profile.name, rows=tuple(rows), total_macs=total.macs, uncovered=uncovered,
        notes=tuple(notes), simulation=simulation,
    )


def explain_task(
    target: str,
    policy: Any = None,
    hardware: Any = "auto",
    seed: int = 0,
    energy_profile: str | None = None,
) -> Explanation:
    """:func:`explain` on a task's model and first training batch, as ``adaprec explain TARGET`` does.

    ``target``: an experiment config file (its task, its energy profile and
    its error-budget policy, else its first policy other than the fp32
    baseline), a built-in task name, or
    ``package.module:function`` returning a Task. ``policy`` and
    ``energy_profile`` override the config's (default ``error-budget``, ``7nm``).
    """
    config_policy, config_profile = None, None
    task_name = target
    if Path(target).suffix.lower() in (".yaml", ".yml", ".json") or Path(target).is_file():
        config = load_config(target)
        task_name = config.task
        config_profile = config.energy_profile
        narrow = [s for s in config.policies if not (s.name == "fp32" and not s.kwargs)]
        narrow.sort(key=lambda s: s.name != "error-budget")  # the default policy if the config has it
        if narrow:
            config_policy = narrow[0].build_arg()
    try:
        task = get_task(task_name)
        model = task.make_model(seed)
        x, y = next(iter(task.train_loader(epoch_seed(seed, 0))))
    except AdaprecError:
        raise
    except Exception as e:
        if ":" not in task_name:
            raise
        raise TaskError(f"user task {task_name!r} raised {type(e).__name__}: {' '.join(str(e).split())}; "
                        "fix the task (rerun with --debug for the traceback)") from e
    return explain(
        model, x, policy if policy is not None else (config_policy or "error-budget"), hardware,
        loss_fn=lambda out: task.loss_fn(out, y), energy_profile=energy_profile or config_profile or "7nm",
        name=task.name,
    )


def simulate(
    model: Any,
    example_inputs: Any,
    target: str = "h100-sxm",
    policy: Any = "error-budget",
    *,
    formats: Sequence[str] | None = None,
    loss_fn: Callable[[Any], Any] | None = None,
    name: str | None = None,
    **ap_kwargs: Any,
) -> Simulation:
    """One training step of ``model`` on ``example_inputs`` priced on ``target`` (a roofline profile).

    ``formats``: restrict the plan to these formats (e.g. ``["fp8_e4m3",
    "fp8_e5m2", "bf16"]`` for a float8-only plan). The model may live on the
    meta device (shapes only). Returns a :class:`Simulation`.
    """
    return explain(model, example_inputs, policy, loss_fn=loss_fn, name=name, target=target,
                   sim_formats=formats, **ap_kwargs).simulation  # type: ignore[return-value]


def simulate_config(spec: str, target: str = "h100-sxm", *, batch: int = 1, seq_len: int = 2048,
                    policy: Any = "error-budget", formats: Sequence[str] | None = None) -> Simulation:
    """:func:`simulate` a preset or Hugging Face config on the meta device, ``batch`` x ``seq_len`` tokens."""
    model, name = meta_model(spec, seq_len)
    x = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    return simulate(model, {"input_ids": x, "labels": x}, target, policy, formats=formats,
                    name=f"{name} ({batch}x{seq_len})")
