"""The documented assumptions that price what no table covers.

Published energy tables list a handful of formats (fp32, fp16, bf16, int8);
plans use many more (fp8, fp6, fp4, any ExMy, intN, tf32). Rather than
invent a figure per format, one rule extends a table, and every figure it
produces is labelled *assumed* in summaries:

* a multiplier's energy grows with the square of its significand width
  (mantissa bits + 1 for floats, bit width for integers): an array multiplier
  has that many partial-product cells;
* an adder's energy grows linearly with the operand bit width.

The two coefficients are fitted per profile from the table points of the same
kind (float or int) as the mean ratio energy / width-term, so a format between
two table points lands between them. An int format in a table without int
points uses the float coefficients with bit width as significand width.

Cross-check on the 7 nm table: fp8 E4M3 comes out at about 1.6x an int8 MAC,
inside the 1.5-2.8x range that hardware studies report for fp8 versus int8
MAC units.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaprec.formats import Format

__all__ = ["OpEnergy", "significand_bits", "fit_rule", "rule_energy", "storage_bits"]


@dataclass(frozen=True)
class OpEnergy:
    """Energy of one multiply and one add, in pJ, for one operand format."""

    kind: str  # "float" | "int"
    bits: int
    sig_bits: int
    mult: float
    add: float

    @property
    def mac(self) -> float:
        return self.mult + self.add


def significand_bits(fmt: Format) -> int:
    """Width of the multiplier's significand: mantissa + hidden bit, or all bits of an int."""
    return fmt.mbits + 1 if fmt.kind == "float" else fmt.bits


def fit_rule(points: list[OpEnergy]) -> dict[str, tuple[float, float]]:
    """Per kind: (pJ per significand-bit^2 for mult, pJ per bit for add)."""
    coef: dict[str, tuple[float, float]] = {}
    for kind in ("float", "int"):
        pts = [p for p in points if p.kind == kind]
        if pts:
            coef[kind] = (
                sum(p.mult / p.sig_bits**2 for p in pts) / len(pts),
                sum(p.add / p.bits for p in pts) / len(pts),
            )
    if "int" not in coef and "float" in coef:
        coef["int"] = coef["float"]
    if "float" not in coef and "int" in coef:
        coef["float"] = coef["int"]
    return coef


def rule_energy(fmt: Format, coef: dict[str, tuple[float, float]]) -> OpEnergy:
    """Mult and add energy of ``fmt`` by the scaling rule (an assumption)."""
    c_mult, c_add = coef[fmt.kind]
    sig = significand_bits(fmt)
    return OpEnergy(fmt.kind, fmt.bits, sig, c_mult * sig**2, c_add * fmt.bits)


def storage_bits(fmt: Format, scaling: str = "none", block_size: int = 32) -> float:
    """Bits one element occupies in memory.

    tf32 is a compute format: its tensors are stored as fp32. Block (MX)
    scaling adds one 8-bit shared scale per ``block_size`` elements;
    per-tensor scales are negligible.
    """
    bits = 32.0 if fmt.name == "tf32" else float(fmt.bits)
    if scaling == "block":
        bits += 8.0 / block_size
    return bits
