"""Modeled energy of one step: counted work x a profile's prices, under a plan.

Energy-table profiles::

    E = sum over GEMMs   MACs x (mult + add energy of the wider operand format)
      + bytes moved x pJ/byte

The bytes moved are an op-level count when the step carries one (every op's
tensors read and written, each at the bytes of the dtype it had; see
:mod:`adaprec.energy.traffic`), else the engine's model of the GEMM operands
(elements per role x storage bytes of the role's format).

Roofline profiles, per module::

    t = max(sum over GEMMs 2 MACs / peak(format), bytes / bandwidth);  E = t x board power

A GEMM is priced at the format it executed in (the engine records it: the
wider of its operands', natively or emulated); emulated GEMMs ran as fp32
arithmetic and are priced so. ``mode="planned"`` prices what the plan asked
for as if every format ran natively: the *simulated* figure for a target
device, never mixed with what ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adaprec.energy.counting import ModuleCost, StepCost, is_float_label
from adaprec.energy.profiles import Profile
from adaprec.energy.rules import storage_bits
from adaprec.formats import get, width_key

__all__ = ["PricedModule", "PricedStep", "price_step", "OPTIMIZER_STATE_ACCESSES", "role_bytes", "PRICING_MODES"]

# Adam-like optimizers keep two state tensors per parameter and read and
# write each once per step: four accesses per counted element.
OPTIMIZER_STATE_ACCESSES = 4

MIXED_RULE = (
    "a GEMM with operands in two formats is priced and attributed at the wider format "
    "(the narrower operand is upcast)"
)


@dataclass(frozen=True)
class PricedModule:
    macs: int
    bitops: int
    bytes_moved: float
    compute_j: float
    memory_j: float
    modeled_j: float
    macs_by_format: dict[str, int]
    bytes_by_format: dict[str, float] = field(default_factory=dict)
    bytes_by_class: dict[str, float] = field(default_factory=dict)
    op_bytes: float = 0.0  # of bytes_moved, those an op-level count saw


@dataclass(frozen=True)
class PricedStep:
    """A step's cost under one plan and profile; plain numbers, safe to cache."""

    modules: dict[str, PricedModule]
    assumptions: frozenset[str] = field(default_factory=frozenset)

    def total(self, attr: str) -> float:
        return sum(getattr(m, attr) for m in self.modules.values())

    @property
    def modeled_j(self) -> float:
        return self.total("modeled_j")

    def macs_by_format(self) -> dict[str, int]:
        return self._sum("macs_by_format")

    def bytes_by_format(self) -> dict[str, float]:
        return self._sum("bytes_by_format")

    def bytes_by_class(self) -> dict[str, float]:
        return self._sum("bytes_by_class")

    def _sum(self, attr: str) -> dict:
        out: dict = {}
        for m in self.modules.values():
            for f, n in getattr(m, attr).items():
                out[f] = out.get(f, 0) + n
        return out


PRICING_MODES = ("executed", "planned", "fp32", "bf16")


def _gemm_format(g, mode: str) -> str:
    if mode == "executed":
        return g.executed
    if mode == "planned":
        return g.fmt
    return mode


def _traffic_bits(key: tuple, mode: str) -> float:
    role, executed, planned, scaling, block = key
    if mode == "executed":
        return storage_bits(get(executed))
    if mode == "planned":
        return storage_bits(get(planned), scaling, block)
    if mode == "bf16" and role != "optimizer_state":
        return 16.0
    return 32.0


# Op classes whose data are GEMM operands and results: narrowed in the bf16 counterfactual and by the plan.
_GEMM_CLASSES = ("gemm", "attention")
OP_BYTES_RULE = (
    "bytes from an op-level count: each op reads its tensor inputs and writes its outputs once, at the bytes "
    "of their dtype (views free; gathers read the rows gathered); cache reuse and allocator traffic left out"
)
COUNTERFACTUAL_OP_RULE = (
    "op-level bytes re-priced: every floating-point element (and every GEMM/attention operand) at 4 bytes (fp32) "
    "or, in the bf16 counterfactual, GEMM and attention operands at 2 bytes and the rest at 4; casts between "
    "formats are dropped (a plain fp32 run has none; the casts autocast would add are not priced)"
)
PLANNED_OP_RULE = (
    "simulated bytes: GEMM and attention operands of a module at its planned GEMM format, every other op's "
    "bytes in the dtype they had here"
)


def _op_bits(key: tuple, mode: str, planned_bits: float | None) -> float:
    """Bits per element of one op-level count entry under a pricing mode."""
    _phase, cls, dtype, bits, _direction = key
    if mode == "executed":
        return bits
    gemm = cls in _GEMM_CLASSES
    if mode == "planned":
        return planned_bits if gemm and planned_bits is not None else bits
    if cls == "cast":
        return 0.0
    if gemm:
        return 16.0 if mode == "bf16" else 32.0
    return 32.0 if is_float_label(dtype) else bits


def _planned_bits(mc: ModuleCost) -> float | None:
    """Storage bits of the widest format the plan gave the module's GEMMs (None: it ran none)."""
    if not mc.gemms:
        return None
    return storage_bits(get(max((g.fmt for g in mc.gemms), key=width_key)))


def _price_ops(mc: ModuleCost, mode: str) -> tuple[float, dict[str, float], dict[str, float]]:
    planned = _planned_bits(mc) if mode == "planned" else None
    total = 0.0
    by_fmt: dict[str, float] = {}
    by_cls: dict[str, float] = {}
    for k, n in mc.ops.items():
        b = n * _op_bits(k, mode, planned) / 8
        if b:
            total += b
            label = k[2] if mode == "executed" else f"{k[2]} as {_op_bits(k, mode, planned):g}-bit"
            by_fmt[label] = by_fmt.get(label, 0.0) + b
            by_cls[k[1]] = by_cls.get(k[1], 0.0) + b
    return total, by_fmt, by_cls


def _price_roles(mc: ModuleCost, mode: str) -> tuple[float, dict[str, float], dict[str, float]]:
    total = 0.0
    by_fmt: dict[str, float] = {}
    by_cls: dict[str, float] = {}
    for k, n in mc.traffic.items():
        if not n:
            continue
        bits = _traffic_bits(k, mode)
        b = role_bytes(k[0], n, bits)
        total += b
        label = k[1] if mode == "executed" else k[2] if mode == "planned" else f"{bits:g}-bit"
        by_fmt[label] = by_fmt.get(label, 0.0) + b
        cls = "optimizer" if k[0] == "optimizer_state" else "gemm"
        by_cls[cls] = by_cls.get(cls, 0.0) + b
    return total, by_fmt, by_cls


def role_bytes(role: str, elements: int, bits: float) -> float:
    """Bytes of ``elements`` values of ``role`` at ``bits`` each (optimizer state: several accesses)."""
    n = elements * (OPTIMIZER_STATE_ACCESSES if role == "optimizer_state" else 1)
    return n * bits / 8


def price_step(cost: StepCost, profile: Profile, mode: str = "executed") -> PricedStep:
    """Price every module of ``cost`` with ``profile``.

    ``mode``: ``executed`` (each GEMM at the format it ran in natively,
    emulated ones at fp32; tensors at the format they were stored in),
    ``planned`` (each at the plan's format, as if this device ran all of them
    natively: the *simulated* figure for a target profile), or a
    counterfactual: ``fp32`` or ``bf16`` for everything. A step with an
    op-level count (``cost.op_counted``) is priced from it in every mode
    (the rules: ``OP_BYTES_RULE``, ``COUNTERFACTUAL_OP_RULE``, ``PLANNED_OP_RULE``).
    """
    if mode not in PRICING_MODES:
        raise ValueError(f"pricing mode {mode!r}; use one of {PRICING_MODES}")
    assumptions: set[str] = set()
    modules = {}
    table = profile.kind == "energy_table"
    for name, mc in cost.modules.items():
        by_fmt: dict[str, int] = {}
        bops = 0
        compute = 0.0  # joules (table) or seconds (roofline)
        for g in mc.gemms:
            f = get(_gemm_format(g, mode))
            bops += g.macs * f.bits * f.bits
            label = g.label if mode == "executed" else f.name
            by_fmt[label] = by_fmt.get(label, 0) + g.macs
            if table:
                op, assumed = profile.op_energy(f)
                compute += g.macs * op.mac * 1e-12
                if assumed:
                    assumptions.add(
                        f"{f.name} MAC energy ({op.mac:.4g} pJ) from the scaling rule, not the {profile.name} table"
                    )
            else:
                peak, assumed = profile.peak(f)
                compute += 2 * g.macs / peak
                if assumed:
                    assumptions.add(f"{f.name} runs at {peak / 1e12:g} TFLOP/s on {profile.name} (no peak of its own)")
        nbytes, bytes_fmt, bytes_cls = (_price_ops if cost.op_counted else _price_roles)(mc, mode)
        if table:
            memory = nbytes * profile.pj_per_byte * 1e-12
            total = compute + memory
        else:
            p = profile.board_power_w
            memory_t = nbytes / profile.bandwidth_bytes_s
            compute, memory, total = compute * p, memory_t * p, max(compute, memory_t) * p
        modules[name] = PricedModule(mc.macs, bops, nbytes, compute, memory, total, by_fmt, bytes_fmt, bytes_cls,
                                     nbytes if cost.op_counted else 0.0)
    if table:
        assumptions.add(
            f"memory traffic priced at {profile.traffic_level} ({profile.pj_per_byte:.4g} pJ/byte): "
            "no on-chip reuse credited"
        )
    else:
        assumptions.add(
            f"roofline time x {profile.board_power_w:g} W board power: an upper-bound style estimate"
        )
    if cost.op_counted:
        assumptions.add(OP_BYTES_RULE)
        if mode in ("fp32", "bf16"):
            assumptions.add(COUNTERFACTUAL_OP_RULE)
        elif mode == "planned":
            assumptions.add(PLANNED_OP_RULE)
    elif cost.elements().get("optimizer_state"):
        assumptions.add(
            f"optimizer state: {OPTIMIZER_STATE_ACCESSES} accesses per trainable parameter per step (Adam-like)"
        )
    if mode == "executed" and any(not g.native for m in cost.modules.values() for g in m.gemms):
        assumptions.add(
            "emulated GEMMs are priced as the fp32 GEMMs they ran as; the extra passes that round their "
            "operands are not priced (see the measured wall time)"
        )
    return PricedStep(modules, frozenset(assumptions))
