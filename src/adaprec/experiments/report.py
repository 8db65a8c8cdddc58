"""The report of a run directory, from the result store alone.

Writes ``report.md``, a self-contained ``report.html`` (images embedded as
data URIs, inline CSS, no external resources) and the PNG figures under
``plots/``. Energy is labelled with where it comes from: modeled from a
named profile, or measured by a meter (else ``n/a`` and why).
"""

from __future__ import annotations

import base64
import html
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adaprec.errors import ConfigError
from adaprec.experiments import plots
from adaprec.experiments.store import DB_NAME, ResultStore
from adaprec.files import write_text_atomic

__all__ = ["write_report", "policy_table"]

COLUMNS = (
    "policy", "seeds", "quality", "vs fp32", "step time (measured)", "time saving vs fp32 (measured)",
    "peak memory (measured)", "energy modeled", "saving vs fp32 (modeled)", "energy measured", "MACs by format", "coverage",
    "guard fallbacks",
)


def _step_time(s: Mapping[str, Any]) -> float | None:
    """Mean measured wall time of a run's training steps (s), from its ledger summary."""
    wall, n = s.get("wall_s"), s.get("timed_steps")
    return float(wall) / n if wall is not None and n else None


def _peak_memory(sums: Sequence[Mapping[str, Any]]) -> str:
    """Mean steady-state peak over a policy's runs, with how it was measured, or n/a and why."""
    readings = [s.get("peak_memory") for s in sums]
    if not readings or any(r is None for r in readings):
        return "n/a: not recorded (a store from before memory was measured)"
    missing = [r for r in readings if r.get("peak_bytes") is None]
    if missing:
        return f"n/a: {missing[0].get('reason') or 'not measurable here'}"
    mib = statistics.fmean(r["peak_bytes"] for r in readings) / 2**20
    methods = sorted({r.get("method", "?") for r in readings})
    return f"{mib:,.0f} MiB ({'; '.join(methods)})"


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _short_reason(reason: str | None) -> str:
    return (reason or "no meter").split(" (")[0]


def policy_table(store: ResultStore) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per policy (fp32 first) plus facts for the page: metric, profile, notes."""
    runs = store.runs()
    finished = [r for r in runs if r["status"] == "finished"]
    policies = list(dict.fromkeys(["fp32", *(r["policy"] for r in runs)]))
    policies = [p for p in policies if any(r["policy"] == p for r in runs)]
    summaries = {r["run_id"]: store.summary(r["run_id"]) or {} for r in finished}
    guard = {
        row["run_id"]: row["n"]
        for row in store.query(
            "SELECT run_id, COUNT(*) AS n FROM timeline WHERE policy='guard' OR reason LIKE 'guard at step%' GROUP BY run_id"
        )
    }
    metric = next((r["metric"] for r in runs), "metric")
    higher = bool(next((r["higher_is_better"] for r in runs), 1))
    profile = next((r["energy_profile"] for r in runs), "?")
    base = [summaries[r["run_id"]].get("modeled_j") for r in finished if r["policy"] == "fp32"]
    base_j = statistics.fmean(base) if base and None not in base else None
    base_q = [r["final_metric"] for r in finished if r["policy"] == "fp32"]
    base_mean = statistics.fmean(base_q) if base_q else None
    base_t = [_step_time(summaries[r["run_id"]]) for r in finished if r["policy"] == "fp32"]
    base_step = statistics.fmean(base_t) if base_t and None not in base_t else None
    reasons: dict[str, str] = {}
    rows = []
    for p in policies:
        mine = [r for r in finished if r["policy"] == p]
        failed = [r for r in runs if r["policy"] == p and r["status"] != "finished"]
        row: dict[str, Any] = {"policy": p, "seeds": f"{len(mine)}" + (f" (+{len(failed)} not finished)" if failed else "")}
        if not mine:
            row.update(dict.fromkeys(COLUMNS[2:], "-"))
            rows.append(row)
            continue
        q_mean, q_std = _mean_std([r["final_metric"] for r in mine])
        sums = [summaries[r["run_id"]] for r in mine]
        modeled = statistics.fmean(float(s.get("modeled_j") or 0.0) for s in sums)
        measured = [s.get("measured_j") for s in sums]
        ref = base_j if base_j else statistics.fmean(float(s.get("fp32_modeled_j") or 0.0) for s in sums)
        macs: dict[str, float] = {}
        for s in sums:
            for f, n in (s.get("macs_by_format") or {}).items():
                macs[f] = macs.get(f, 0.0) + float(n)
        total_macs = sum(macs.values()) or 1.0
        times = [_step_time(s) for s in sums]
        step_t = statistics.fmean(times) if times and None not in times else None
        cov = [float(s.get("coverage") or 0.0) for s in sums]
        if any(m is None for m in measured):
            why = _short_reason(next((s.get("measured_reason") for s in sums if s.get("measured_j") is None), None))
            reasons[why] = next((s.get("measured_reason") or why for s in sums if s.get("measured_j") is None), why)
            measured_txt = f"n/a: {why}"
        else:
            measured_txt = f"{statistics.fmean(measured):.4g} J"
        row.update({
            "quality": f"{q_mean:.4f} ± {q_std:.4f}",
            "vs fp32": "baseline" if p == "fp32" else (f"{q_mean - base_mean:+.4f}" if base_mean is not None else "n/a"),
            "step time (measured)": f"{1e3 * step_t:.2f} ms" if step_t is not None else "n/a",
            "time saving vs fp32 (measured)": "baseline" if p == "fp32" else (
                f"{100 * (1 - step_t / base_step):.1f} %" if step_t is not None and base_step else "n/a"),
            "peak memory (measured)": _peak_memory(sums),
            "energy modeled": f"{modeled:.4g} J",
            "energy measured": measured_txt,
            "saving vs fp32 (modeled)": "baseline" if p == "fp32" else (
                f"{100 * (1 - modeled / ref):.1f} %" if ref else "n/a"),
            "MACs by format": ", ".join(f"{f} {100 * n / total_macs:.0f}%" for f, n in sorted(macs.items(), key=lambda kv: -kv[1])),
            "coverage": f"{100 * statistics.fmean(cov):.0f} %",
            "guard fallbacks": str(sum(guard.get(r["run_id"], 0) for r in mine)),
        })
        row["_step_s"] = step_t
        row["_quality"], row["_modeled_j"] = q_mean, modeled
        rows.append(row)
    facts = {
        "metric": metric, "higher_is_better": higher, "profile": profile, "task": next((r["task"] for r in runs), "?"),
        "policies": policies, "measured_reasons": reasons,
        "failed": [(r["run_id"], r["status"], r.get("error") or "") for r in runs if r["status"] != "finished"],
        "assumptions": sorted({a for s in summaries.values() for a in s.get("assumptions", [])}),
        "uncovered": {m: why for s in summaries.values() for m, why in (s.get("uncovered") or {}).items()},
        "emulated": sorted({f for s in summaries.values() for f in s.get("emulated_formats") or []}),
    }
    return rows, facts


def _series(store: ResultStore, runs: Sequence[Mapping[str, Any]], policies: Sequence[str], table: str,
            col: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per policy, mean over seeds of ``col`` at each step all its runs reached."""
    out = {}
    for p in policies:
        curves = []
        for r in runs:
            if r["policy"] == p:
                vals = [(row["step"], row[col]) for row in store.rows(table, r["run_id"]) if row[col] is not None]
                if vals:
                    curves.append(np.array(vals, dtype=float))
        if curves:
            n = min(len(c) for c in curves)
            out[p] = (curves[0][:n, 0], np.mean([c[:n, 1] for c in curves], axis=0))
    return out


def _figures(store: ResultStore, facts: Mapping[str, Any], plot_dir: Path) -> dict[str, Path]:
    plot_dir.mkdir(exist_ok=True)
    runs = store.runs("finished")
    policies = [p for p in facts["policies"] if any(r["policy"] == p for r in runs)]
    energy = {r["run_id"]: float((store.summary(r["run_id"]) or {}).get("modeled_j") or 0.0) for r in runs}
    first = [next(r for r in runs if r["policy"] == p) for p in policies if p != "fp32"]
    return {
        "quality_vs_energy": plots.quality_vs_energy(
            runs, energy, policies, facts["metric"], facts["profile"], plot_dir / "quality_vs_energy.png"
        ),
        "precision_timeline": plots.precision_heatmap(store, first, plot_dir / "precision_timeline.png"),
        "loss_curves": plots.loss_curves(_series(store, runs, policies, "steps", "loss"), plot_dir / "loss_curves.png"),
        "energy_per_step": plots.energy_per_step(
            _series(store, runs, policies, "energy", "modeled_j"), facts["profile"], plot_dir / "energy_per_step.png"
        ),
    }


CAPTIONS = {
    "quality_vs_energy": "Final quality against modeled energy, one point per policy and seed.",
    "precision_timeline": "Bits of each tensor (module.role) over training, first seed of each policy.",
    "loss_curves": "Training loss, mean over seeds, against the fp32 baseline (dashed).",
    "energy_per_step": "Modeled energy of each training step.",
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em;width:100%}
th,td{border:1px solid #ccc;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f1f3f5}tr.baseline td{background:#fafafa;font-weight:600}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.note{font-size:.85em;color:#555}
"""


def _headers(facts: Mapping[str, Any]) -> list[str]:
    arrow = "higher is better" if facts["higher_is_better"] else "lower is better"
    h = list(COLUMNS)
    h[2] = f"{facts['metric']} (mean ± std; {arrow})"
    h[COLUMNS.index("energy modeled")] = f"energy, modeled (profile {facts['profile']}, what executed)"
    return h


def _notes(facts: Mapping[str, Any]) -> list[str]:
    """Plain-text notes under the table: what is modeled, measured, emulated and not covered."""
    notes = [
        f"Energy is modeled from the device profile {facts['profile']} on what executed (emulated formats "
        "priced as the fp32 arithmetic they ran as); it is not a measurement. Step time is measured on this machine.",
        "Peak memory is measured from the end of the first tenth of each run's steps (the method is in the cell: "
        "the process high-water mark on CPU, max_memory_allocated on CUDA); the runs of one experiment share a "
        "process, so memory an earlier run left with the allocator can raise a later run's CPU figure.",
    ]
    if facts.get("emulated"):
        notes.append("Emulated (no native kernel on this device, or slower than fp32): " + ", ".join(facts["emulated"]))
    for m, why in (facts.get("uncovered") or {}).items():
        notes.append(f"Not under the plan, run in fp32: {m or '<root>'}: {why}")
    notes += [f"Measured energy n/a: {full}" for full in facts["measured_reasons"].values()]
    notes += [f"Run {rid} {st}: {err}" for rid, st, err in facts["failed"]]
    return notes


def _html(rows: Sequence[Mapping[str, Any]], facts: Mapping[str, Any], figs: Mapping[str, Path]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in _headers(facts))
    body = "".join(
        f'<tr class="{"baseline" if r["policy"] == "fp32" else "policy"}">'
        + "".join(f"<td>{e(str(r[c]))}</td>" for c in COLUMNS) + "</tr>"
        for r in rows
    )
    imgs = "".join(
        f'<figure><img alt="{e(name)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{e(CAPTIONS[name])}</figcaption></figure>"
        for name, p in figs.items()
    )
    notes = [e(n) for n in _notes(facts)]
    notes += [f"Assumption: {e(a)}" for a in facts["assumptions"]]
    return (
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>adaprec report: {e(facts['task'])}</title>"
        f"<style>{CSS}</style></head><body><h1>adaprec report: {e(facts['task'])}</h1>"
        f"<h2>Policies against the fp32 baseline</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        + "".join(f'<p class="note">{n}</p>' for n in notes)
        + f"<h2>Figures</h2>{imgs}</body></html>\n"
    )


def _markdown(rows: Sequence[Mapping[str, Any]], facts: Mapping[str, Any], figs: Mapping[str, Path], run_dir: Path) -> str:
    cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = [f"# adaprec report: {facts['task']}", "", "| " + " | ".join(map(cell, _headers(facts))) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines.append("")
    lines += _notes(facts)
    lines.append("")
    for name, p in figs.items():
        lines += [f"![{CAPTIONS[name]}]({p.relative_to(run_dir).as_posix()})", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write report.html, report.md and plots/*.png for ``run_dir``; returns their paths by name."""
    run_dir = Path(run_dir)
    if not (run_dir / DB_NAME).is_file():
        raise ConfigError(f"{run_dir} holds no {DB_NAME}; pass the directory `adaprec run` wrote (its --out)")
    with ResultStore(run_dir) as store:
        rows, facts = policy_table(store)
        if not store.runs("finished"):
            raise ConfigError(f"{run_dir} has no finished run yet; finish it with `adaprec run CONFIG --resume`")
        figs = _figures(store, facts, run_dir / "plots")
    out = {
        "html": write_text_atomic(run_dir / "report.html", _html(rows, facts, figs)),
        "markdown": write_text_atomic(run_dir / "report.md", _markdown(rows, facts, figs, run_dir)),
    }
    return {**out, **figs}
