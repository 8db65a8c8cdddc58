"""Setting the policy up for the modules the model really runs: discovery, pins, the hardware filter.

The first forward pass finds the modules that run GEMMs (or :meth:`prepare`
does, with an example batch); each one found before the first decision sets
the policy up again with it. Pins are matched with the plan's one rule
(:func:`adaprec.plan.pin_matches`), formats are filtered by what this device
runs (:func:`adaprec.engine.execution.allowed_formats`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from adaprec.controller.config import ControllerConfig
from adaprec.controller.gradients import param_owners
from adaprec.distributed import alias_fsdp_params, fsdp_modules
from adaprec.engine import Capabilities, PrecisionEngine
from adaprec.engine.allocator import tune_cpu_allocator
from adaprec.engine.execution import allowed_formats
from adaprec.engine.ops import OpCall
from adaprec.engine.sites import unwrap
from adaprec.errors import PlanError, UsageError
from adaprec.formats.storage import storage_format
from adaprec.hardware import DeviceReport, probe
from adaprec.hardware.shapes import (
    MEASURABLE,
    GemmShape,
    ShapeTable,
    formats_that_pay,
    linear_gemms,
    measure_gemms,
)
from adaprec.monitor import HealthMonitor
from adaprec.optim.fused_adam import AUTO_MIN_NUMEL
from adaprec.plan import ModulePrecision, PrecisionPlan, pin_matches
from adaprec.policies import Policy
from adaprec.timeline import Timeline

__all__ = ["PlanSetup", "build_engine", "probe_for", "loss_scaling_needed"]

_WIDE_GRAD_FORMATS = {"fp32", "tf32", "bf16"}


def probe_for(model: nn.Module, hardware: Any, backend: str) -> DeviceReport | None:
    """The device report policies choose formats from (None: no native narrow format)."""
    if isinstance(hardware, DeviceReport):
        return hardware
    if hardware is None or hardware == "none":
        return None
    if hardware != "auto":
        raise UsageError(f"hardware must be 'auto', None or an adaprec.hardware.DeviceReport, got {hardware!r}")
    if backend == "emulate":
        return None
    return probe(next((p.device for p in model.parameters()), torch.device("cpu")))


def build_engine(model: nn.Module, config: ControllerConfig, reducer: Any) -> tuple[PrecisionEngine, Any, str]:
    """The engine for ``model`` on this device: (engine, the device report every rank shares, the allocator's note)."""
    report = reducer.share_report(lambda: probe_for(model, config.hardware, config.backend))
    allocator = _NOT_TUNED
    if config.tune_allocator and not any(p.is_cuda for p in model.parameters()):
        # for speed where int8 GEMMs run natively and fast (their page faults dominate, measured); for memory
        # once the plan keeps something narrow (tune_for_plan): what narrow storage saves goes back to the OS
        fast_int8 = report is not None and "int8" in report.fast_formats("gemm") and config.backend != "emulate"
        allocator = tune_cpu_allocator("speed")[1] if fast_int8 else _UNTUNED
    caps = Capabilities.from_report(report) if report is not None else Capabilities()
    engine = PrecisionEngine(model, backend=config.backend, module_filter=config.module_filter, seed=config.seed,
                             compile=config.compile, capabilities=caps)
    inner = unwrap(model)
    if fsdp_modules(inner):  # FSDP2: the forward sees all-gathered parameters; tell the site map whose
        alias_fsdp_params(engine.map.owners, engine.map.names, inner)
    engine.probe_backward = True  # backward GEMMs go into the ledger as they run
    return engine, report, allocator


_UNTUNED = "glibc defaults (the plan keeps nothing narrow yet)"
_NOT_TUNED = "glibc defaults (tune_allocator=False)"


def tune_for_plan(allocator: str, plan: PrecisionPlan) -> str:
    """The allocator once ``plan`` keeps saved tensors or optimizer state narrow; before that, as it was.

    Where it was left at glibc's defaults (fresh pages for every large tensor cost step time, measured: 1.09x on
    the bench GPT's fp32 plan, and buy nothing while every byte kept is fp32): for memory. Where it was tuned for
    speed (fast int8 GEMMs): balanced while what autograd keeps is 16-bit, since the speed setting kept the freed
    heap and the resident set rose above plain fp32's (Zen 4, bench GPT: 1.16x; balanced 0.78x at a few per cent
    of step time); for memory once it keeps 8-bit codes, whose 1 MiB pieces only that setting puts on pages of
    their own (balanced left them in the heap between the step's temporaries: 944 MiB against 769 MiB). Called
    as each module's plan is first set, inside the first forward, and on every plan change: tuned only after the
    first step, that step's freed activations stay in glibc's heap around small live blocks and every later step
    touches them again (bench GPT, int8 saved tensors: resting RSS 1,043 MiB against 407 MiB tuned in the first
    forward)."""
    if allocator == _NOT_TUNED:  # tune_allocator=False, or CUDA
        return allocator
    kept = [mp for mp in plan.modules.values() if mp.saved != "fp32" or mp.optimizer_state != "fp32"]
    if not kept:
        return allocator
    byte_codes = any(storage_format(mp.saved).bits <= 8 for mp in kept)
    # the setting only ever moves towards keeping less: once for memory, a later "balanced" changes nothing
    return tune_cpu_allocator("memory" if byte_codes or allocator == _UNTUNED else "balanced")[1]


@functools.lru_cache(maxsize=64)
def loss_scaling_needed(plan: PrecisionPlan) -> bool:
    """Whether ``plan`` has an output gradient in a narrow format with no per-tensor scaling (e.g. fp16)."""
    return any(mp.grad_output.scaling == "none" and mp.grad_output.format not in _WIDE_GRAD_FORMATS
               for mp in plan.modules.values())


class PlanSetup:
    """The template plan (every module that runs GEMMs, pins applied) and the policy set up for it."""

    def __init__(self, config: ControllerConfig, engine: PrecisionEngine, policy: Policy,
                 monitor: HealthMonitor, timeline: Timeline, allocator: str = _UNTUNED) -> None:
        self.config, self.engine, self.policy, self.monitor, self.timeline = config, engine, policy, monitor, timeline
        self.allocator = allocator  # glibc's setting in force (build_engine's, then tune())
        self.template = PrecisionPlan()
        self.decided = False  # no decision yet: discovery may still set the policy up again
        self.finalized = False
        self.report: DeviceReport | None = None  # the device probe (set by the controller)
        self.shapes: dict[str, list[GemmShape]] = {}  # module -> its linear GEMMs' shapes, seen in discovery
        self.table: ShapeTable | None = None  # their measured speedups (shape-aware decisions)
        self.widened: dict[str, str] = {}  # module -> why a narrow format the device has does not pay there
        # whether the optimizer's 8-bit moments update in the fused kernel here (set by the controller; asked
        # only when a device restricts the formats)
        self.fused_moments: Callable[[], bool] = lambda: False
        engine.tally.on_record.append(self._seen)
        engine.set_plan(policy.setup(self.template, *config.run_length))

    def discover(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """:meth:`AdaptivePrecision.prepare`: one forward pass finds the modules (before any decision)."""
        if self.decided:
            raise UsageError(
                "prepare() must come before the first ap.step(): the plan's modules are fixed once a step has "
                "run. A module that first ran later runs fp32; to put it under the plan, build a new "
                "AdaptivePrecision and call ap.prepare(example_batch) before its first step"
            )
        if not args and not kwargs and not self.engine.sites:
            raise UsageError("prepare() needs an example batch: ap.prepare(x) runs model(x) once to find its GEMMs")
        if args or kwargs:
            self.engine.discover(*args, **kwargs)

    def _seen(self, name: str, call: OpCall, ex: Any, mp: Any) -> None:
        """During discovery: the shapes of every linear-like GEMM of each module (what pays depends on them)."""
        if self.finalized or call.site_kind != "linear":
            return
        for g in call.gemms:
            if g.mkn is not None:
                self.shapes.setdefault(name, []).extend(linear_gemms(*g.mkn, input_grad=g.grad_a, weight_grad=g.grad_b))

    def allowed(self) -> tuple[dict[str, frozenset[str]] | None, set[str]]:
        """Per module, the formats this device runs natively and faster, and (once measured) that pay at the
        module's own GEMM shapes, casts included (None: research mode, any format)."""
        if self.config.target is not None:
            return None, set()
        allowed, coupled = allowed_formats(self.engine.sites, self.engine.caps, self.engine.backend)
        if self.table is not None:
            for m, fmts in allowed.items():
                measured = fmts & set(MEASURABLE)
                if measured and m in self.shapes:
                    pay = formats_that_pay(self.table, self.shapes[m], measured)
                    allowed[m] = frozenset(fmts - (measured - pay))
        return allowed, coupled

    def _restrict(self) -> None:
        allowed, coupled = self.allowed()
        self.policy.restrict(allowed, coupled, fused_moments=self.fused_modules() if allowed is not None else ())

    def fused_modules(self) -> frozenset[str]:
        """The modules whose 8-bit moments the fused kernel would update here: the kernel covers the optimizer
        and the module owns a parameter of ``AUTO_MIN_NUMEL`` elements or more (smaller ones stay fp32)."""
        if not self.fused_moments():
            return frozenset()
        owners = param_owners(self.engine.map.model, list(self.engine.kinds))
        return frozenset(m for m, params in owners.items() if any(p.numel() >= AUTO_MIN_NUMEL for _, p in params))

    def measure_shapes(self) -> None:
        """Once, after discovery: time the model's distinct linear GEMM shapes in the narrow formats this device
        runs natively and fast (cached on disk like the probe); a format that does not pay at a module's shapes
        is taken off that module's list, and the timeline's notes say so."""
        if self.table is not None or self.config.target is not None or self.config.backend == "emulate":
            return
        if self.config.hardware != "auto":  # a report the caller gave (another machine's, a fixed one): trusted
            return
        allowed, _ = allowed_formats(self.engine.sites, self.engine.caps, self.engine.backend)
        candidates = sorted({f for fmts in allowed.values() for f in fmts} & set(MEASURABLE))
        shapes = [s for m, ss in self.shapes.items() if allowed.get(m, frozenset()) & set(candidates) for s in ss]
        if not candidates or not shapes:
            return
        device = next((p.device for p in self.engine.map.model.parameters()), torch.device("cpu"))
        self.table = measure_gemms(shapes, candidates, device, report=self.report)
        narrowed, _ = self.allowed()
        for m, fmts in allowed.items():
            kept = (narrowed or {}).get(m, fmts)
            lost = sorted(fmts - kept)
            slower = [f for f in lost if f in formats_that_pay(self.table, self.shapes.get(m, []), [f])]
            why = [f"{', '.join(f for f in lost if f not in slower)} do not pay"] if len(slower) < len(lost) else []
            if slower:  # faster than fp32, but no faster than a wider format that pays
                why.append(f"{', '.join(slower)} run no faster than {', '.join(sorted(kept - {'fp32'}))}")
            if lost:
                self.widened[m] = f"{'; '.join(why)} at its GEMM shapes here (measured with their casts)"
        if self.widened and not self.decided:
            self._restrict()
            self.engine.set_plan(self.policy.setup(self.template, *self.config.run_length))

    def pins(self) -> dict[str, str | ModulePrecision]:
        """Embeddings pinned to fp32 (unless ``quantize_embeddings``), then the user's pins that match a module."""
        names = list(self.engine.kinds)
        pins: dict[str, str | ModulePrecision] = {}
        if not self.config.quantize_embeddings:
            pins.update({n: "fp32" for n, s in self.engine.sites.items() if s.covered and s.kinds == {"embedding"}})
        for pattern, pin in self.config.pins.items():
            if pin_matches(pattern, names):
                pins[pattern] = pin
        return pins

    def on_new_site(self, name: str) -> None:
        """The engine met a module that runs GEMMs: set the policy up again with it (before any decision)."""
        if self.decided:
            return
        self.template = PrecisionPlan.uniform(self.engine.kinds, "fp32", pins=self.pins())
        self._restrict()
        self.engine.set_plan(self.policy.setup(self.template, *self.config.run_length))
        self.configure_monitor()
        self.timeline.set_initial(self.engine.plan)
        self.tune(self.engine.plan)  # inside the first forward, before most of its activations are allocated

    def tune(self, plan: PrecisionPlan) -> None:
        """The allocator for memory as soon as ``plan`` keeps something narrow (:func:`tune_for_plan`)."""
        self.allocator = tune_for_plan(self.allocator, plan)

    def configure_monitor(self) -> None:
        """Measure what the policy may choose; a policy that chooses nothing from measurements (static,
        schedule) gets only the format in force measured (the guard's overflow check), and fp32 not at all."""
        wanted, by_role = self.policy.candidate_formats, self.policy.candidate_formats_by_role
        measure = bool(wanted) or bool(by_role.get("saved"))  # storage formats are measured on any device
        self.monitor.set_candidates(wanted, by_role) if measure else self.monitor.set_candidates(())
        self.engine.observe_fp32 = measure

    def finalize(self, model_name: str) -> bool:
        """After discovery: check the pins matched, say what the plan does not cover. True the first time."""
        if self.finalized:
            return False
        self.finalized = True
        names = list(self.engine.kinds)
        for pattern in self.config.pins:
            if not pin_matches(pattern, names):
                raise PlanError(
                    f"pin {pattern!r} matches no module that runs GEMMs; such modules are: {', '.join(names) or '(none)'}"
                )
        if not self.engine.sites:
            _warn(f"no matmul-like op ran in {model_name}'s forward pass: there is nothing to run under a precision "
                  "plan, every step runs as plain fp32 and the ledger counts 0 MACs")
        elif not names:
            _warn("no module that runs GEMMs is under the plan (all filtered out or fused kernels): "
                  f"{self.engine.uncovered}; training runs fp32")
        elif all(n in self.engine.plan.pinned for n in names):
            _warn("every module that runs GEMMs is pinned, so the policy decides nothing; "
                  "unpin some (pins=, quantize_embeddings=True) to let it")
        return True

    def restore(self, template: Mapping[str, Any]) -> None:
        """Set the policy up again for a saved template (the plan in force stays the engine's); the policy's
        own state is loaded after this."""
        self.template = PrecisionPlan.from_dict(template)
        self._restrict()  # with the saved shape table: no timing on resume
        plan = self.engine.plan
        self.policy.setup(self.template, *self.config.run_length)
        self.engine.set_plan(plan)
        self.finalized = False


def _warn(message: str) -> None:
    warnings.warn(f"adaprec: {message}", stacklevel=5)
