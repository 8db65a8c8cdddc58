"""Error budget (adaprec's default): the narrowest format whose measured error stays within budget.

Per module and tensor role, the monitor measures what casting that tensor
to each candidate format would cost in SQNR, overflow and underflow. This
policy picks the narrowest format that meets the role's SQNR target and
range limits, narrows only after the condition held for several sampled
snapshots in a row (hysteresis, so formats do not flap), and widens at once
when the format in force breaks the budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from adaprec.errors import FormatSpecError, PlanError, PolicyError, UnknownFormatError
from adaprec.formats import get, width_key
from adaprec.formats.storage import storage_format
from adaprec.monitor.snapshot import Snapshot, TensorStats
from adaprec.optim import fused_adam
from adaprec.optim.narrow_state import fused_takes
from adaprec.plan import ROLES, PrecisionPlan, preset
from adaprec.policies.base import Policy, _check_keys
from adaprec.policies.ladder import GRAD_ROLES, recipe_for

__all__ = ["ErrorBudgetPolicy", "DEFAULT_TARGETS", "DEFAULT_LADDERS", "SAVED_LADDER", "SAVED_TARGET"]


# Ladders run cheapest first, as published per-operation energies order them
# (integer arithmetic costs less than float of the same width: Horowitz 2014,
# Jouppi et al. 2021), not by bit count. Per-tensor scaled integers serve
# tensors with a compact range; fp8 takes over when outliers need exponent bits.
FORWARD_LADDER = ("int4", "int6", "int8", "fp8_e4m3", "bf16", "fp32")
DEFAULT_LADDERS: dict[str, tuple[str, ...]] = {
    "weight": FORWARD_LADDER,
    "activation": FORWARD_LADDER,
    # gradients: int8 with stochastic rounding where the range allows, else
    # E5M2 (range before mantissa), never E4M3 or 4-bit
    "grad_output": ("int8", "fp8_e5m2", "bf16", "fp32"),
    # the weight gradient is a GEMM output accumulated wide; store it in bf16 at least
    "grad_weight": ("bf16", "fp32"),
}
# dB. Gradients tolerate more noise: they are rounded stochastically (unbiased)
# and averaged over many steps by the optimizer.
DEFAULT_TARGETS: dict[str, float] = {"weight": 20.0, "activation": 20.0, "grad_output": 12.0, "grad_weight": 12.0}
# What autograd keeps of a module's ops for backward (the ``saved`` storage role), narrowest first. Storage
# formats need no arithmetic units: any device keeps int8 and fp8 codes. Chosen from the SQNR of the module's
# activation after a round trip through that storage format's own block-scaled codes (measured on whole blocks).
SAVED_LADDER = ("int8", "fp8_e4m3", "bf16", "fp32")
SAVED_TARGET = 30.0
# storage formats packed by a plain cast: what storage="auto" keeps saved tensors in on a real device
_CAST_STORAGE = ("bf16", "fp16", "fp32")
STORAGE_CHOICES = ("auto", "narrow", "fp32")  # whether the storage roles are used (the ``storage`` option)


class ErrorBudgetPolicy(Policy):
    """Closed-loop format choice from measured SQNR and range.

    Args:
        targets: minimum SQNR (dB) per role; missing roles keep the defaults
            (weight 20, activation 20, grad_output 12, grad_weight 12).
        ladders: candidate formats per role, cheapest first (the order is kept); missing roles
            keep the defaults. A role with an empty ladder is never changed.
        max_overflow: largest tolerated fraction of values that saturate.
        max_underflow: largest tolerated fraction of nonzero values flushed to zero.
        patience: consecutive sampled snapshots a narrower format must pass
            before the policy narrows to it.
        warmup_steps: steps run in ``warmup_format`` before any measurement
            counts; ``None`` (default): a tenth of ``total_steps``, at most
            100 (100 when the run length is unknown).
        warmup_format: a preset name for the warm-up (``bf16`` or ``fp32``).
        sensitive_extra_db: added to the target of sensitive modules (the
            first and last module in plan order when ``sensitive_edges``, and
            any module that overflowed or that the guard raised).
        early_extra_db: added to every target right after warm-up, decaying
            linearly to 0 over ``mature_steps`` (default: half of
            ``total_steps``, or 10 x warmup_steps when unknown): young weights
            get more precision, mature ones less.
        optimizer_state: how every unpinned module's optimizer moments are
            kept (a storage spec; ``"int8"``: 8-bit block-wise, the second
            moment on a square-root map; tensors under 4096 elements and
            embeddings stay fp32). ``"fp32"`` keeps the optimizer's own state.
        saved_ladder, saved_target: storage formats for what autograd keeps of
            a module's ops (narrowest first), and the SQNR (dB) the module's
            activation must keep after a round trip through one (its real
            block-scaled codes, measured on whole blocks) to be stored so (plus
            the sensitive and early extras). ``bf16`` during warm-up.
        storage: whether the two storage roles above are used. ``"auto"``
            (default): where this device runs bf16 natively and faster than
            fp32 (its conversions are cheap), with saved tensors only in the
            ladder's formats packed by one cast (bf16) and the moments narrow
            only where the fused 8-bit kernel updates them (``fused_moments``
            of :meth:`restrict`), and in research mode;
            elsewhere what is kept stays fp32, because packing it costs step
            time there (measured on an AVX2-only CPU: 1.4-3.7x plain fp32's
            step) and a plan is never slower than plain PyTorch unless asked.
            ``"narrow"``: always, the whole saved ladder (memory before
            speed). ``"fp32"``: never.
        speed_check: right after the first step, time this policy's plan
            against the fp32 plan on the model itself, in turns (12 steps),
            and keep fp32 for the rest of the run if the plan is not faster
            (:mod:`adaprec.controller.speed_check`). On where the device
            report is the probe's (``hardware="auto"``), on one CPU process.
    """

    name = "error-budget"

    def _usable(self) -> frozenset[str] | None:
        if self.allowed is None:
            return None
        return frozenset().union(*self.allowed.values()) | {"fp32"}

    @property
    def candidate_formats(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for role, ladder in self.candidate_formats_by_role.items():
            if role != "saved":  # storage specs, measured by their own round trip
                seen.update(dict.fromkeys(ladder))
        return tuple(seen)

    @property
    def candidate_formats_by_role(self) -> Mapping[str, tuple[str, ...]]:
        usable = self._usable()
        roles = dict(self.ladders) if usable is None else \
            {r: tuple(f for f in ladder if f in usable) for r, ladder in self.ladders.items()}
        if all(set(ladder) <= {"fp32"} for ladder in roles.values()) and self.saved_ladder == ("fp32",):
            return {}  # nothing to choose between on this device: no statistics to take
        # storage needs no arithmetic units: each activation's round trip through the saved ladder's storage
        # formats is measured anywhere, with their real block-scaled codes (the monitor's "saved" role)
        roles["saved"] = tuple(f for f in self.saved_ladder if f != "fp32")
        return roles

    def ladder_for(self, module: str, role: str) -> tuple[str, ...]:
        """The role's ladder, keeping only the formats this device runs natively for ``module``."""
        allowed = self.allowed_for(module)
        ladder = self.ladders[role]
        if allowed is None or not ladder:
            return ladder
        kept = tuple(f for f in ladder if f in allowed)
        return kept or ("fp32",)

    def _warm_for(self, module: str):  # noqa: ANN202
        allowed = self.allowed_for(module)
        if allowed is None or all(
            self._warm_mp.recipe(r).format in allowed for r in ("weight", "activation", "grad_output")
        ):
            mp = self._warm_mp
        else:
            mp = preset("fp32")
        warm_saved = "bf16" if "bf16" in self.saved_ladder else "fp32"
        mp = mp.with_storage("optimizer_state", self._moments(module)).with_storage("saved", warm_saved)
        return self._flow(module, mp)

    def _flow(self, module: str, mp):  # noqa: ANN001, ANN202
        """The ``output`` role: bf16 (the ops after the module's GEMMs read and write half the bytes, as under
        autocast) where bf16 is fast here, the module computes narrow, and its activations' measured bf16
        round trip keeps the saved target (its ``saved`` role is not fp32); fp32 for the last module in plan
        order, whose output is usually what the loss reads (logits), and wherever the data stays fp32. Not in
        the first step: it finds the modules as it runs, so which one is last is known only after it (and a
        checkpointed block recomputed in its backward must see the dtypes its forward saw)."""
        narrow = (self.flow_narrow and self._deciding and mp.saved != "fp32" and mp.activation.format != "fp32"
                  and not self._last(module))
        return mp.with_storage("output", "bf16" if narrow else "fp32")

    @property
    def flow_narrow(self) -> bool:
        """Whether outputs may flow in bf16: bf16 is native and fast here and kept (research mode emulates
        formats in fp32 data, and before restrict() nothing is known of the device: outputs stay fp32)."""
        return (self.allowed is not None and "bf16" in self.saved_ladder
                and any("bf16" in f for f in self.allowed.values()))

    def _last(self, module: str) -> bool:
        return self.template is not None and next(reversed(self.template.modules), None) == module

    def __init__(
        self,
        targets: Mapping[str, float] | None = None,
        ladders: Mapping[str, Sequence[str]] | None = None,
        max_overflow: float = 1e-4,
        max_underflow: float = 0.1,
        patience: int = 3,
        warmup_steps: int | None = None,
        warmup_format: str = "bf16",
        sensitive_extra_db: float = 6.0,
        sensitive_edges: bool = True,
        early_extra_db: float = 6.0,
        mature_steps: int | None = None,
        optimizer_state: str = "int8",
        saved_ladder: Sequence[str] = SAVED_LADDER,
        saved_target: float = SAVED_TARGET,
        storage: str = "auto",
        speed_check: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(speed_check, bool):
            raise PolicyError(f"error-budget policy: speed_check must be True or False, got {speed_check!r}")
        self.speed_check = speed_check
        try:
            self.optimizer_state = storage_format(optimizer_state, role="optimizer_state").spec
            self.saved_ladder = tuple(storage_format(f, role="activation").spec for f in saved_ladder)
        except (FormatSpecError, UnknownFormatError) as e:
            raise PolicyError(f"error-budget policy: {e}") from None
        if "fp32" not in self.saved_ladder:
            self.saved_ladder += ("fp32",)
        if storage not in STORAGE_CHOICES:
            raise PolicyError(f"error-budget policy: storage must be one of {', '.join(STORAGE_CHOICES)}, got {storage!r}")
        self.storage = storage
        self._narrow_storage = (self.optimizer_state, self.saved_ladder)  # what "narrow" keeps
        self._use_storage(storage != "fp32")
        self._deciding = False  # set by the first decide(): the modules are known
        self.saved_target = float(saved_target)
        self.targets = dict(DEFAULT_TARGETS)
        for role, v in (targets or {}).items():
            if role not in ROLES:
                raise PolicyError(f"error-budget policy: unknown role {role!r} in targets; roles are {', '.join(ROLES)}")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise PolicyError(f"error-budget policy: target for {role} must be a number of dB, got {v!r}")
            self.targets[role] = float(v)
        self.ladders: dict[str, tuple[str, ...]] = dict(DEFAULT_LADDERS)
        for role, ladder in (ladders or {}).items():
            if role not in ROLES:
                raise PolicyError(f"error-budget policy: unknown role {role!r} in ladders; roles are {', '.join(ROLES)}")
            try:
                names = tuple(get(f).name for f in ladder)
            except UnknownFormatError as e:
                raise PolicyError(f"error-budget policy: ladder for {role}: {e}") from None
            if len(set(names)) != len(names):
                raise PolicyError(f"error-budget policy: ladder for {role} repeats a format: {list(names)}")
            self.ladders[role] = names  # the caller's order: cheapest first
        if not 0 <= max_overflow <= 1 or not 0 <= max_underflow <= 1:
            raise PolicyError("error-budget policy: max_overflow and max_underflow are fractions in [0, 1]")
        if not isinstance(patience, int) or patience < 1:
            raise PolicyError(f"error-budget policy: patience must be a positive int, got {patience!r}")
        if warmup_steps is not None and (not isinstance(warmup_steps, int) or warmup_steps < 0):
            raise PolicyError(f"error-budget policy: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        try:
            self._warm_mp = preset(warmup_format)
        except PlanError as e:
            raise PolicyError(f"error-budget policy: warmup_format: {e}") from None
        if mature_steps is not None and (not isinstance(mature_steps, int) or mature_steps < 1):
            raise PolicyError(f"error-budget policy: mature_steps must be a positive int, got {mature_steps!r}")
        self.max_overflow, self.max_underflow = float(max_overflow), float(max_underflow)
        self.patience, self.warmup_format = patience, warmup_format
        self.warmup_request = warmup_steps
        self.warmup_steps = 100 if warmup_steps is None else warmup_steps
        self.sensitive_extra_db, self.sensitive_edges = float(sensitive_extra_db), bool(sensitive_edges)
        self.early_extra_db, self.mature_steps = float(early_extra_db), mature_steps
        self.sensitive: set[str] = set()
        # (module, role) -> [consecutive passing checks, most conservative ladder index seen in the streak]
        self._streak: dict[tuple[str, str], list[int]] = {}

    def _use_storage(self, narrow: bool, casts_only: bool = False) -> None:
        """Narrow storage or fp32; ``casts_only``: what autograd keeps only in formats packed by one native cast
        (bf16), since block-scaled codes are packed by several eager passes per tensor (measured on a Zen 4 CPU,
        encoder LM, default policy: 90 ms per step with bf16 saved tensors, 142 ms with int8 blocks; plain fp32
        151-160 ms)."""
        optimizer_state, ladder = self._narrow_storage if narrow else ("fp32", ("fp32",))
        if casts_only:
            ladder = tuple(f for f in ladder if f in _CAST_STORAGE) or ("fp32",)
            # eager narrow moments are updated chunk by chunk in some thirty tensor passes: measured on an AMX
            # Xeon, the optimizer step took 2.8-13x as long as torch's AdamW with int8 block moments and
            # 1.2-2.2x with bf16 ones. The fused 8-bit kernel (adaprec.optim.fused_adam) took 0.28x (67 M
            # parameters: 85 ms against 303), whatever formats the GEMMs run in, so "auto" keeps 8-bit
            # moments wherever it covers the optimizer, fp32 moments elsewhere ("narrow" trades that time)
            wanted = self._narrow_storage[0]
            optimizer_state = wanted if self.fused_moments and fused_takes(wanted) else "fp32"
        self.optimizer_state, self.saved_ladder = optimizer_state, ladder

    def restrict(self, allowed: Mapping[str, Iterable[str]] | None, coupled: Iterable[str] = (), *,
                 fused_moments: Iterable[str] = ()) -> None:
        super().restrict(allowed, coupled, fused_moments=fused_moments)
        if self.storage == "auto":  # narrow storage where this device converts cheaply (bf16 native and fast)
            research = self.allowed is None
            self._use_storage(research or any("bf16" in f for f in self.allowed.values()), casts_only=not research)

    def _auto_on_device(self) -> bool:
        return self.storage == "auto" and self.allowed is not None

    def _moments(self, module: str) -> str:
        """The module's optimizer-state spec: under ``storage="auto"`` on a device, narrow only for the modules
        the fused kernel updates (``fused_moments``), so the plan says what is held."""
        if self._auto_on_device() and module not in self.fused_moments:
            return "fp32"
        return self.optimizer_state

    def moments_min_numel(self) -> int | None:
        """Under ``storage="auto"`` on a device, moments narrow only for parameters of
        :data:`adaprec.optim.fused_adam.AUTO_MIN_NUMEL` elements or more, where the fused kernel beats torch's
        own step."""
        return fused_adam.AUTO_MIN_NUMEL if self._auto_on_device() else None

    def storage_note(self) -> str:
        """What the storage roles do on this device, and why (for the report)."""
        narrow = self.optimizer_state != "fp32" or self.saved_ladder != ("fp32",)
        if self.storage != "auto":
            return f"storage={self.storage!r}: " + ("kept narrow" if narrow else "kept fp32")
        if not narrow:
            return ("kept fp32: this device has no fast bf16, so packing would slow the step "
                    "(storage='narrow' trades step time for memory)")
        if self.allowed is None:
            return "kept narrow (research mode)"
        moments = (f"optimizer moments 8-bit for parameters of {fused_adam.AUTO_MIN_NUMEL:,} elements or more, "
                   "updated by the fused kernel" if self.optimizer_state != "fp32" else
                   "optimizer moments fp32 (the fused 8-bit kernel does not cover this optimizer or device)")
        if self.saved_ladder == ("fp32",):
            return (f"saved tensors and outputs kept fp32 (no fast bf16 here: packing would slow the step); "
                    f"{moments}")
        return ("kept narrow: bf16 is native and fast here (saved tensors in formats packed by one cast: "
                f"{'/'.join(self.saved_ladder)}, outputs flowing in bf16, {moments}; "
                "storage='narrow' adds block-scaled 8-bit codes for saved tensors, which cost step time)")

    # --- targets ----------------------------------------------------------------------
    def _mature(self) -> int:
        if self.mature_steps is not None:
            return self.mature_steps
        if self.total_steps:
            return max(1, self.total_steps // 2)
        return max(1, 10 * self.warmup_steps)

    def target(self, module: str, role: str, step: int) -> float:
        """The SQNR target (dB) for ``role`` of ``module`` at ``step``."""
        t = self.targets[role]
        age = max(0, step - self.warmup_steps)
        t += self.early_extra_db * max(0.0, 1.0 - age / self._mature())
        if self._is_sensitive(module):
            t += self.sensitive_extra_db
        return t

    def _is_sensitive(self, module: str) -> bool:
        if module in self.sensitive:
            return True
        if self.sensitive_edges and self.template is not None and len(self.template) > 2:
            names = list(self.template.modules)
            return module in (names[0], names[-1])
        return False

    def wants_sample(self, step: int) -> bool:
        """Measure on each of the ``patience`` steps right after warm-up: the first decision needs that
        many checks, and waiting ``patience`` monitor periods for them would keep the run in the
        warm-up format for tens of steps longer than the evidence requires."""
        return self.warmup_steps <= step < self.warmup_steps + self.patience

    def on_guard_raise(self, modules: Iterable[str]) -> None:
        self.sensitive.update(modules)

    def setup(
        self, template: PrecisionPlan, total_steps: int | None = None, steps_per_epoch: int | None = None
    ) -> PrecisionPlan:
        if self.warmup_request is None and total_steps:
            self.warmup_steps = min(100, total_steps // 10)
        self._deciding = False  # the first step finds the modules: no output flows until its decision
        return super().setup(template, total_steps, steps_per_epoch)

    def initial_plan(self, template: PrecisionPlan) -> PrecisionPlan:
        """Training starts in the warm-up format (the first step included)."""
        return template.map(lambda n, _old: self._warm_for(n)) if self.warmup_steps > 0 else template

    # --- the rule -----------------------------------------------------------------------
    def _check(self, stats: TensorStats, fmt: str, target: float, role: str = "weight") -> tuple[bool, str]:
        """Does ``fmt`` meet the budget? With the figure that decided it.

        Gradient roles round stochastically, which keeps small values alive in
        expectation, so the flush-to-zero fraction (measured under nearest
        rounding) does not bind them; their SQNR target does. Nor does it bind
        ``saved`` storage, whose SQNR is its measured round trip, flushes included.
        """
        if fmt == "fp32":
            return True, "fp32 is exact"
        sq = stats.sqnr_db.get(fmt)
        if sq is None:
            return False, f"{fmt} not measured"
        if math.isnan(sq) or sq < target:
            return False, f"sqnr {sq:.1f} dB < {target:.1f} dB"
        ov = stats.overflow_frac.get(fmt, 0.0)
        if ov > self.max_overflow:
            return False, f"overflow {ov:.3%} > {self.max_overflow:.3%}"
        un = stats.underflow_frac.get(fmt, 0.0)
        if role not in GRAD_ROLES and role != "saved" and un > self.max_underflow:
            return False, f"underflow {un:.2%} > {self.max_underflow:.2%}"
        return True, f"sqnr {sq:.1f} dB >= {target:.1f} dB"

    def _position(self, ladder: tuple[str, ...], fmt: str) -> int:
        if fmt in ladder:
            return ladder.index(fmt)
        rank = width_key(fmt)
        for i, f in enumerate(ladder):
            if width_key(f) >= rank:
                return i
        return len(ladder) - 1

    def decide(self, snapshot: Snapshot, step: int) -> PrecisionPlan:
        template = self._template()
        self.last_reasons = {}
        self._deciding = True
        if step < self.warmup_steps:
            plan = template.map(lambda n, _old: self._warm_for(n))
            self._explain(snapshot.plan, plan, f"warm-up in {self.warmup_format} until step {self.warmup_steps}")
            return plan
        plan = snapshot.plan
        if snapshot.nonfinite:
            return plan  # a failed step measures nothing trustworthy; the guard handles it
        self.sensitive.update(m for m in snapshot.overflowed if m in template)
        reasons: dict[tuple[str, str], str] = {}
        for module in template:
            if module in template.pinned:
                continue
            mp = plan.get(module)
            for role in ROLES:
                ladder = self.ladder_for(module, role)
                stats = snapshot.stats(module, role)
                if not ladder or stats is None:
                    continue
                target = self.target(module, role, step)
                current = mp.recipe(role)
                verdicts = [self._check(stats, f, target, role) for f in ladder]
                best = next(i for i, (ok, _) in enumerate(verdicts + [(True, "")]) if ok)
                best = min(best, len(ladder) - 1)
                cur_ok, cur_why = self._check(stats, current.format, target, role)
                key = (module, role)
                new_fmt = None
                if not cur_ok:
                    self._streak.pop(key, None)
                    new_fmt = ladder[best]
                    why = f"{current.format}: {cur_why}; widened to {new_fmt} ({verdicts[best][1]})"
                elif best < self._position(ladder, current.format):
                    streak = self._streak.setdefault(key, [0, best])
                    streak[0] += 1
                    streak[1] = max(streak[1], best)
                    if streak[0] >= self.patience:
                        new_fmt = ladder[streak[1]]
                        _, fig = self._check(stats, new_fmt, target, role)
                        why = f"{new_fmt}: {fig} for {streak[0]} checks"
                        del self._streak[key]
                else:
                    self._streak.pop(key, None)
                if new_fmt is not None and new_fmt != current.format:
                    mp = mp.with_role(role, recipe_for(new_fmt, role, current))
                    reasons[key] = why
            if module in self.coupled:
                mp = self._couple(module, mp, plan.get(module), reasons)
            mp = self._store(module, mp, snapshot.stats(module, "saved"), step, reasons)
            if mp != plan.get(module):
                plan = plan.with_module(module, mp)
        self.last_reasons = reasons
        return plan

    def _store(self, module: str, mp: Any, stats: TensorStats | None, step: int, reasons: dict) -> Any:
        """The storage roles: the optimizer state as configured; what autograd keeps, the narrowest saved
        format whose measured round trip on the module's activation keeps ``saved_target`` dB (widened at once,
        narrowed after ``patience`` checks)."""
        mp = mp.with_storage("optimizer_state", self._moments(module))
        if mp.saved not in self.saved_ladder:
            # no longer offered here (the speed check dropped bf16, so storage="auto" keeps fp32): to the widest
            # offered at once, measured or not (the monitor stops measuring a role with nothing to choose);
            # kept, the module went on packing every saved tensor at the cost the check had just refused
            widest = self.saved_ladder[-1]
            reasons[(module, "saved")] = f"saved {widest}: {mp.saved} is no longer offered on this device"
            return self._flow(module, mp.with_storage("saved", widest))
        if stats is None:
            return self._flow(module, mp)
        target = self.saved_target + (self.target(module, "activation", step) - self.targets["activation"])
        verdicts = [self._check(stats, f, target, "saved") for f in self.saved_ladder]
        best = next(i for i, (ok, _) in enumerate(verdicts) if ok)  # fp32 always passes
        current = mp.saved
        pos = self.saved_ladder.index(current)  # in the ladder: a format no longer offered left above
        key = (module, "saved")
        new = None
        if best > pos:  # the format in force broke the budget: widen now
            self._streak.pop(key, None)
            new, why = self.saved_ladder[best], f"{current}: {verdicts[pos][1]}; widened"
        elif best < pos:
            streak = self._streak.setdefault(key, [0, best])
            streak[0] += 1
            streak[1] = max(streak[1], best)
            if streak[0] >= self.patience:
                new, why = self.saved_ladder[streak[1]], f"{verdicts[streak[1]][1]} for {streak[0]} checks"
                del self._streak[key]
        else:
            self._streak.pop(key, None)
        if new is not None and new != current:
            mp = mp.with_storage("saved", new)
            reasons[key] = f"saved {new}: {why}"
        return self._flow(module, mp)

    def _couple(self, module: str, mp, old, reasons: dict) -> Any:  # noqa: ANN001
        """Activation, weight and output gradient in the widest of the three (their kernel runs one dtype)."""
        roles = ("activation", "weight", "grad_output")
        widest = max((mp.recipe(r).format for r in roles), key=width_key)
        for r in roles:
            if mp.recipe(r).format != widest:
                mp = mp.with_role(r, recipe_for(widest, r, mp.recipe(r)))
                if old.recipe(r).format != widest:
                    reasons[(module, r)] = f"{widest}: kept with the module's other roles (one native dtype per op)"
                else:
                    reasons.pop((module, r), None)
        return mp

    # --- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "sensitive": sorted(self.sensitive),
            "streak": [[m, r, n, i] for (m, r), (n, i) in sorted(self._streak.items())],
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        super().load_state_dict(d)
        _check_keys(d, ["sensitive", "streak"], self.name)
        self.sensitive = set(d["sensitive"])
        self._streak = {(str(m), str(r)): [int(n), int(i)] for m, r, n, i in d["streak"]}
