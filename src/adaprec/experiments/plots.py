"""The report's figures, drawn from store rows with matplotlib's Agg backend (no display)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from adaprec.experiments.store import ResultStore  # noqa: E402

__all__ = ["quality_vs_energy", "precision_heatmap", "loss_curves", "energy_per_step", "bits_of"]

ROLES = ("weight", "activation", "grad_output", "grad_weight")


def bits_of(recipe: str) -> float:
    """Bits of a short recipe string such as ``fp8_e4m3/sr/tensor`` (nan if unknown)."""
    from adaprec.formats import get

    try:
        return float(get(recipe.split("/")[0]).bits)
    except Exception:  # noqa: BLE001 - an unknown format is shown blank, not fatal
        return float("nan")


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {p: ("black" if p == "fp32" else cmap(i % 10)) for i, p in enumerate(labels)}


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def quality_vs_energy(runs: Sequence[Mapping[str, Any]], energy: Mapping[str, float], policies: Sequence[str],
                      metric: str, profile: str, path: Path) -> Path:
    """One point per (policy, seed): modeled energy against final quality."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = _colors(policies)
    for p in policies:
        pts = [(energy[r["run_id"]], r["final_metric"]) for r in runs if r["policy"] == p and r["run_id"] in energy]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, label=p, color=colors[p], s=40, marker="s" if p == "fp32" else "o")
    ax.set_xlabel(f"energy, modeled (profile {profile}) [J]")
    ax.set_ylabel(metric)
    ax.set_title("quality vs energy (one point per policy and seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plan_matrix(initial_plan: Mapping[str, Any], events: Sequence[Mapping[str, Any]], steps: int) -> tuple[list[str], np.ndarray]:
    """Rows ``module.role``, columns steps, values bits in force at that step."""
    mods = initial_plan.get("modules", {}) if initial_plan else {}
    rows = [f"{m}.{r}" for m in mods for r in ROLES]
    current = {f"{m}.{r}": bits_of(str(mods[m][r]["format"])) for m in mods for r in ROLES}
    by_step: dict[int, list[Mapping[str, Any]]] = {}
    for e in events:
        by_step.setdefault(int(e["step"]), []).append(e)
    out = np.full((len(rows), max(steps, 1)), np.nan)
    for s in range(max(steps, 1)):
        out[:, s] = [current.get(r, np.nan) for r in rows]
        for e in by_step.get(s, ()):  # an event at step s takes effect from step s + 1
            key = f"{e['module']}.{e['role']}"
            if key in current:
                current[key] = bits_of(str(e["new"]))
    return rows, out


def precision_heatmap(store: ResultStore, runs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Per-layer precision over time, one panel per run shown (first seed of each policy)."""
    n = max(len(runs), 1)
    fig, axes = plt.subplots(n, 1, figsize=(7.5, 1.2 + 2.6 * n), squeeze=False, layout="constrained")
    im = None
    for ax, run in zip(axes[:, 0], runs, strict=False):
        plan = json.loads(run["initial_plan_json"]) if run.get("initial_plan_json") else {}
        steps = int(run.get("total_steps") or 1)
        rows, mat = plan_matrix(plan, store.rows("timeline", run["run_id"]), steps)
        if not rows:
            ax.text(0.5, 0.5, "no initial plan recorded", ha="center", va="center")
            ax.set_axis_off()
            continue
        im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=32)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=max(4, min(8, 300 // max(len(rows), 1))))
        ax.set_title(f"{run['run_id']}: bits per tensor", fontsize=9)
        ax.set_xlabel("step")
    if im is not None:
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="bits")
    return _save(fig, path)


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(y) < k:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def loss_curves(series: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Training loss per policy (mean over seeds, moving average) against the fp32 baseline."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = _colors(list(series))
    for p, (steps, loss) in series.items():
        k = max(1, len(loss) // 50)
        y = _smooth(loss, k)
        ax.plot(steps[k - 1 :] if k > 1 else steps, y, label=p, color=colors[p],
                linestyle="--" if p == "fp32" else "-", linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds, smoothed)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def energy_per_step(series: Mapping[str, tuple[np.ndarray, np.ndarray]], profile: str, path: Path) -> Path:
    """Modeled joules per step for each policy (mean over seeds)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = _colors(list(series))
    for p, (steps, joules) in series.items():
        ax.plot(steps, joules, label=p, color=colors[p], linestyle="--" if p == "fp32" else "-", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"energy per step, modeled (profile {profile}) [J]")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
