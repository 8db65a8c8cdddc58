"""The controller's report: what ran, what changed, what it cost, in a few lines a person reads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adaprec.controller.adaptive import AdaptivePrecision

__all__ = ["report_lines", "memory_figures"]


def report_lines(ap: AdaptivePrecision) -> list[str]:
    """Coverage, native formats, precision changes, time and energy, from the controller's parts."""
    s = ap.energy.summary()
    world = s.get("world_size", 1)
    device = ap.hardware.name if ap.hardware is not None else "not probed"
    lines = [
        f"adaprec: {ap.step_count} steps, policy {ap.policy.name}, backend {ap.engine.backend}",
        f"plan now: {ap.plan.summary()}",
        f"coverage: {100 * s['coverage']:.1f} % of {s['macs']:,} MACs under the plan"
        + "".join(f"\n  fp32, not covered: {m or '<root>'}: {why}" for m, why in s["uncovered"].items()),
        "ran natively: " + (", ".join(s["native_formats"]) or "fp32 only")
        + (f"; emulated: {', '.join(s['emulated_formats'])}" if s["emulated_formats"] else ""),
        f"narrow MACs (run natively below 32 bits): {100 * s['narrow_mac_fraction']:.1f} %"
        + (f"; emulated: {100 * s['emulated_mac_fraction']:.1f} %" if s["emulated_mac_fraction"] else ""),
        f"precision changes recorded: {len(ap.timeline.events)}",
        f"world size: {world}"
        + (" (statistics reduced over ranks before every decision; MACs, energy and wall time summed over "
           "ranks)" if world > 1 else ""),
        f"device: {device}; allocator: {ap.allocator}",
        (f"wall time, measured: {s['wall_s']:.3f} s over {s['timed_steps']} steps" if s["wall_s"] is not None
         else "wall time: not measured"),
        f"energy, {s['kind']['modeled_j']}: {s['modeled_j']:.4g} J; fp32 would be {s['fp32_modeled_j']:.4g} J"
        f" (saving {100 * (s['saving_vs_fp32'] or 0):.1f} %), static bf16 {s['bf16_modeled_j']:.4g} J",
        "measured: "
        + (f"{s['measured_j']:.4g} J" if s.get("measured_j") is not None else f"n/a ({s.get('measured_reason')})"),
    ]
    if ap.setup.widened:
        lines.append("kept wider where narrow does not pay (measured at the module's GEMM shapes): "
                     + "; ".join(f"{m}: {why}" for m, why in ap.setup.widened.items()))
    if ap.speed.summary:
        lines.append(f"speed check: {ap.speed.summary}")
    lines += memory_lines(ap, s)
    sim = s.get("simulated")
    if sim:
        lines.append(f"{sim['label']}: {sim['modeled_j']:.4g} J vs fp32 {sim['fp32_modeled_j']:.4g} J "
                     f"(saving {100 * sim['saving_vs_fp32']:.1f} %)")
    return lines


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def memory_figures(ap: AdaptivePrecision) -> dict[str, float]:
    """What adaprec keeps, in bytes (counted from the tensors, not measured from the process): the optimizer
    state as stored, the rollback copy (0 when off), what the last step kept for backward, as kept and
    as fp32 would have kept it, and the engine's own buffers held between steps (scratch, noise table)."""
    kept = ap.saved.stats()
    return {
        "optimizer_state_bytes": float(sum(ap.update.states.nbytes().values())),
        "rollback_bytes": float(ap.update.rollback.nbytes()) if ap.update.rollback is not None else 0.0,
        "saved_bytes": float(kept.bytes_after),
        "saved_bytes_fp32": float(kept.bytes_before),
        "engine_buffers_bytes": float(sum(ap.engine.buffer_nbytes().values())),
    }


def memory_lines(ap: AdaptivePrecision, s: Mapping[str, Any]) -> list[str]:
    """What adaprec keeps and what the steps moved: optimizer state, the rollback copy, bytes per step."""
    held = ap.update.states.nbytes()
    lines = [f"storage ({ap.policy.name}): {note}" for note in [ap.policy.storage_note()] if note]
    lines.append("optimizer state held: " + (", ".join(f"{k} {_mib(v)}" for k, v in sorted(held.items())) or "none yet"))
    lines.append("rollback copy: " + (f"{_mib(ap.update.rollback.nbytes())} (weights and optimizer state before the update)"
                                      if ap.update.rollback is not None else "off (a loss spike is skipped, not undone)"))
    buffers = ap.engine.buffer_nbytes()
    lines.append(f"engine buffers: {_mib(sum(buffers.values()))} (" + ", ".join(f"{k} {_mib(v)}" for k, v in buffers.items())
                 + ")")
    kept = ap.saved.stats()
    if kept.bytes_before:
        lines.append(f"kept for backward (last step): {_mib(kept.bytes_after)} of {_mib(kept.bytes_before)} "
                     f"({', '.join(sorted({r.format for r in kept.rows}))})")
    steps = s.get("steps") or 0
    if steps:
        rows = s.get("bytes_steps", {})  # per priced step (the book also counts each update's window apart)
        how = (f"op-level count: {rows.get('counted', 0)} steps counted, {rows.get('replayed', 0)} replayed"
               if ap.bytes.enabled else "GEMM operands only (count_bytes=False): a lower bound")
        lines.append(f"bytes moved: {s['bytes'] / steps / 1e6:.1f} MB per step ({how}; byte coverage "
                     f"{100 * s.get('byte_coverage', 0.0):.1f} %)")
    return lines
