"""Modeled energy of one step: counted work x a profile's prices, under a plan.

Energy-table profiles::

    E = sum over GEMMs   MACs x (mult + add energy of the wider operand format)
      + sum over roles   elements x storage bytes of the role's format x pJ/byte

Roofline profiles, per module::

    t = max(sum over GEMMs 2 MACs / peak(format), bytes / bandwidth);  E = t x board power

Mixed operands (e.g. fp8 x bf16): the GEMM runs on the units of the wider
format (more bits; at equal bits a float beats an int, then more mantissa
bits), because hardware upcasts the narrower operand. Its MACs are also
attributed to that format in ``macs_by_format``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adaprec.energy.counting import StepCost
from adaprec.energy.profiles import Profile
from adaprec.energy.rules import storage_bits
from adaprec.formats import Format, get
from adaprec.plan import ModulePrecision, PrecisionPlan

__all__ = ["PricedModule", "PricedStep", "price_step", "wider", "OPTIMIZER_STATE_ACCESSES", "role_bytes"]

# Adam-like optimizers keep two state tensors per parameter and read and
# write each once per step: four accesses per counted element.
OPTIMIZER_STATE_ACCESSES = 4

MIXED_RULE = (
    "a GEMM with operands in two formats is priced and attributed at the wider format "
    "(the narrower operand is upcast)"
)


def wider(a: Format, b: Format) -> Format:
    """The format a mixed-operand GEMM runs in."""
    key = lambda f: (f.bits, f.kind == "float", f.mbits)  # noqa: E731
    return a if key(a) >= key(b) else b


@dataclass(frozen=True)
class PricedModule:
    macs: int
    bitops: int
    bytes_moved: float
    compute_j: float
    memory_j: float
    modeled_j: float
    macs_by_format: dict[str, int]


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
        out: dict[str, int] = {}
        for m in self.modules.values():
            for f, n in m.macs_by_format.items():
                out[f] = out.get(f, 0) + n
        return out


def _role_format(mp: ModulePrecision, role: str) -> tuple[Format, str, int]:
    if role == "optimizer_state":
        return get(mp.optimizer_state), "none", 32
    r = mp.recipe(role)
    return get(r.format), r.scaling, r.block_size


def role_bytes(mp: ModulePrecision, role: str, elements: int) -> float:
    """Bytes of ``elements`` values of ``role`` stored in the plan's format for it."""
    fmt, scaling, block = _role_format(mp, role)
    n = elements * (OPTIMIZER_STATE_ACCESSES if role == "optimizer_state" else 1)
    return n * storage_bits(fmt, scaling, block) / 8


def price_step(cost: StepCost, plan: PrecisionPlan, profile: Profile) -> PricedStep:
    """Price every module of ``cost`` under ``plan`` with ``profile``."""
    assumptions: set[str] = set()
    modules = {}
    table = profile.kind == "energy_table"
    for name, mc in cost.modules.items():
        mp = plan.get(name)
        by_fmt: dict[str, int] = {}
        bops = 0
        compute = 0.0  # joules (table) or seconds (roofline)
        for g in mc.gemms:
            fa, fb = get(mp.recipe(g.a_role).format), get(mp.recipe(g.b_role).format)
            bops += g.macs * fa.bits * fb.bits
            f = wider(fa, fb)
            if fa != fb:
                assumptions.add(MIXED_RULE)
            by_fmt[f.name] = by_fmt.get(f.name, 0) + g.macs
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
        nbytes = sum(role_bytes(mp, r, n) for r, n in mc.elements.items() if n)
        if table:
            memory = nbytes * profile.pj_per_byte * 1e-12
            total = compute + memory
        else:
            p = profile.board_power_w
            memory_t = nbytes / profile.bandwidth_bytes_s
            compute, memory, total = compute * p, memory_t * p, max(compute, memory_t) * p
        modules[name] = PricedModule(mc.macs, bops, nbytes, compute, memory, total, by_fmt)
    if table:
        assumptions.add(
            f"memory traffic priced at {profile.traffic_level} ({profile.pj_per_byte:.4g} pJ/byte): "
            "no on-chip reuse credited"
        )
    else:
        assumptions.add(
            f"roofline time x {profile.board_power_w:g} W board power: an upper-bound style estimate"
        )
    if cost.elements().get("optimizer_state"):
        assumptions.add(
            f"optimizer state: {OPTIMIZER_STATE_ACCESSES} accesses per trainable parameter per step (Adam-like)"
        )
    return PricedStep(modules, frozenset(assumptions))
