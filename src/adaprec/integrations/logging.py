"""What every experiment logger offers, and the feed that drives loggers from a run.

Loggers (:class:`~adaprec.integrations.tensorboard.TensorBoardLogger`,
:class:`~adaprec.integrations.mlflow.MlflowLogger`) share one tiny
interface, :class:`ExperimentLogger`, so the runner treats them alike.

:class:`RunLoggers` turns what the runner commits to its SQLite result store
into logger calls. It is fed the very rows of each commit, after the commit,
and only then. That is why:

- what TensorBoard or MLflow shows equals what ``runs.sqlite`` holds;
- a resumed run continues where the store does (rows written after the last
  checkpoint are dropped from both, so nothing is logged twice but in the
  rare kill between a commit and its checkpoint);
- a logger that fails cannot cost a stored row: it is reported once, dropped,
  and training goes on.

Energy is logged as the ledger holds it: ``energy/modeled_j`` (and a param
``energy_profile``) for the modeled figure; ``energy/measured_j`` only for
steps a meter actually measured.

Precision is logged where people look for it: the bits of every
``module.role`` as scalars ``bits/<module>.<role>`` at the start and at each
change, and, at the end of a run, the precision heat map (bits per tensor
over steps, as in the HTML report) as an image ``precision/heatmap``.
:func:`plan_bits` and :func:`change_line` serve the trainer integrations too.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from adaprec.controller.report import memory_figures
from adaprec.energy.ledger import saving_fraction
from adaprec.errors import MissingExtraError
from adaprec.extras import require
from adaprec.formats import get
from adaprec.formats.storage import storage_format
from adaprec.plan import ROLES, STORAGE_ROLES, PrecisionPlan
from adaprec.timeline import Timeline, TimelineEvent

if TYPE_CHECKING:
    from adaprec.controller import AdaptivePrecision

__all__ = [
    "LOGGER_NAMES", "ExperimentLogger", "RunLoggers", "require", "check_available", "flatten_params", "ledger_metrics",
    "plan_bits", "change_line", "step_change_line", "precision_figure", "is_rank_zero",
]

# logger name -> (module to import, extra that installs it)
_BACKENDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "mlflow": ("mlflow.tracking", "mlflow"),
}
LOGGER_NAMES: tuple[str, ...] = tuple(_BACKENDS)
_MAX_PARAM_CHARS = 500  # what every MLflow server accepts; our params are far shorter
_HEATMAP_COLUMNS = 2000  # a longer run is shown at this many steps, evenly spaced


@runtime_checkable
class ExperimentLogger(Protocol):
    """The five calls a run makes on a logger.

    ``step`` is the 0-based optimizer-step index (``StepResult.step``), as in
    the result store. ``close`` takes MLflow's run status names:
    ``"FINISHED"``, ``"FAILED"`` (training unstable) or ``"KILLED"``
    (interrupted; a resume continues it).
    """

    name: str

    def log_params(self, params: Mapping[str, str]) -> None:
        """The run's configuration, as flat string params."""

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Named numbers at one step (may be buffered until :meth:`flush`)."""

    def log_precision(self, step: int, bits: Mapping[str, float], changes: Sequence[str]) -> None:
        """Bits of each ``module.role`` in force from ``step`` on, and the changes, one line each."""

    def log_figure(self, step: int, tag: str, figure: Any) -> None:
        """A matplotlib figure (the precision heat map at the end of a run). Optional: skipped where missing."""

    def flush(self) -> None:
        """Send what is buffered."""

    def close(self, status: str = "FINISHED") -> None:
        """Flush and release the backend; the run ends with ``status``."""


def check_available(names: Sequence[str]) -> None:
    """Raise :class:`MissingExtraError` now, before training, for a logger whose package is missing."""
    for name in names:
        module, extra = _BACKENDS[name]
        require(module, extra, f"the {name!r} logger")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings to dotted keys; lists as JSON; ``None`` left out; long values cut."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        elif v is not None:
            text = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."
    return out


def _bits(plan: PrecisionPlan, module: str, role: str) -> float:
    mp = plan.get(module)
    if role in STORAGE_ROLES:  # a storage spec: the bits it really keeps per element, scales included
        return float(storage_format(getattr(mp, role)).bits_per_element)
    return float(get(mp.recipe(role).format).bits)


def plan_bits(plan: PrecisionPlan) -> dict[str, float]:
    """Bits of every ``module.role`` of ``plan`` (the four tensor roles and the storage roles)."""
    return {f"{m}.{r}": _bits(plan, m, r) for m in plan.modules for r in (*ROLES, *STORAGE_ROLES)}



def _one_line(text: str) -> str:
    return " ".join(text.split())


def change_line(step: int, events: Sequence[TimelineEvent], *, limit: int = 6) -> str:
    """The plan changes decided at ``step`` as one log line.

    ``adaprec step 40: 12 changes: fc1.weight bf16->int8/tensor, ..., (+6 more) (error-budget: int8: sqnr
    31.0 dB >= 24.0 dB)``: the first ``limit`` changes, then the policy and its reasons (at most two distinct).
    """
    items = [f"{ev.module or '<root>'}.{ev.role} {ev.old}->{ev.new}" for ev in events]
    shown = ", ".join(items[:limit]) + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
    reasons = list(dict.fromkeys(_one_line(ev.reason) for ev in events if ev.reason))
    why = "; ".join(reasons[:2]) + (f"; +{len(reasons) - 2} other reasons" if len(reasons) > 2 else "")
    who = ", ".join(dict.fromkeys(ev.policy for ev in events))
    n = len(events)
    return f"adaprec step {step}: {n} change{'' if n == 1 else 's'}: {shown} ({who}{': ' + why if why else ''})"


def is_rank_zero() -> bool:
    """Not distributed, or rank 0: the process whose log lines a person reads (every rank decides the same)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def step_change_line(ap: AdaptivePrecision, step: int, changes: Sequence[Any] = ()) -> str:
    """:func:`change_line` for the changes ``ap`` decided at ``step`` (read from the end of its timeline).

    ``changes`` (``StepResult.changes``) stands in when the timeline holds none for that step.
    """
    events: list[TimelineEvent] = []
    for ev in reversed(ap.timeline.events):
        if ev.step != step:
            break
        events.append(ev)
    events.reverse()
    if not events:
        events = [TimelineEvent(step, c.module, c.role, c.old, c.new, ap.policy.name) for c in changes]
    return change_line(step, events)


def precision_figure(initial: PrecisionPlan, events: Iterable[TimelineEvent], steps: int, title: str = "") -> Any:
    """The precision heat map of one run (rows ``module.role``, columns steps, colour bits), or None.

    A matplotlib ``Figure`` drawn without pyplot (so no backend is switched);
    None when matplotlib is not installed or the plan has no module. An
    event decided at step ``s`` is in force from ``s + 1``, as in the report.
    """
    try:
        import numpy as np
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = [f"{m}.{r}" for m in initial.modules for r in ROLES]
    if not rows:
        return None
    index = {r: i for i, r in enumerate(rows)}
    steps = max(int(steps), 1)
    cols = min(steps, _HEATMAP_COLUMNS)  # column j shows the plan in force at step j * steps // cols
    mat = np.empty((len(rows), cols))
    for m in initial.modules:
        for r in ROLES:
            mat[index[f"{m}.{r}"], :] = _bits(initial, m, r)
    for ev in sorted(events, key=lambda e: e.step):  # stable: same-step events keep their order
        i = index.get(f"{ev.module}.{ev.role}")
        first = -(-(ev.step + 1) * cols // steps)  # the first column whose step is >= ev.step + 1
        if i is not None and first < cols:
            mat[i, first:] = float(get(ev.new.split("/")[0]).bits)
    height = min(1.6 + 0.14 * len(rows), 24.0)
    fig = Figure(figsize=(8.0, height), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=32,
                   extent=(0, steps, len(rows) - 0.5, -0.5))
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=max(4, min(8, 300 // len(rows))))
    ax.set_xlabel("step")
    ax.set_title(f"{title + ': ' if title else ''}bits per tensor", fontsize=9)
    fig.colorbar(im, ax=ax, label="bits")
    return fig


class RunLoggers:
    """The loggers of one run, fed with what the runner commits to the result store.

    Per step ``s`` (``log_scalars``): ``train/loss``, ``train/lr``,
    ``train/loss_scale``, ``train/stepped``; ``energy/modeled_j`` (the step),
    ``energy/modeled_j_cumulative``, ``energy/fp32_modeled_j_cumulative``,
    ``energy/saving_vs_fp32`` (cumulative), ``energy/measured_j`` (measured
    steps only); ``precision/mean_bits`` and ``precision/modules/<format>``
    (modules per forward weight format) of the plan in force *during* step
    ``s``. At evaluations: ``eval/<metric>`` at the number of completed steps.
    Precision (``log_precision``): bits of every ``module.role`` at the start,
    then of each changed one at the step from which it is in force (a change
    decided at step ``s`` counts from ``s + 1``, as in the timeline table).
    At the end: ``eval/*``, ``final/<metric>``, ``final/energy/*``, and the
    precision heat map of the whole run as an image (``log_figure``, tag
    ``precision/heatmap``; needs matplotlib).

    Build one with :meth:`open`; with no logger names every call is a no-op.
    """

    def __init__(
        self,
        loggers: Sequence[ExperimentLogger],
        *,
        plan: PrecisionPlan,
        modeled_j: float = 0.0,
        fp32_modeled_j: float = 0.0,
        formats_seen: Iterable[str] = (),
        initial: PrecisionPlan | None = None,
        events: Iterable[TimelineEvent] = (),
        title: str = "",
    ) -> None:
        self._loggers = list(loggers)
        self._plan = plan
        self._initial = initial if initial is not None else plan  # for the heat map: the run from its start
        self._events = list(events)
        self._title = title
        self._modeled = modeled_j
        self._fp32 = fp32_modeled_j
        self._formats = set(formats_seen)  # a format that leaves the plan keeps being logged, as 0
        self._precision = self._plan_scalars()
        self._evals: list[tuple[int, dict[str, float]]] = []

    @classmethod
    def open(
        cls,
        names: Sequence[str],
        *,
        run_dir: str | Path,
        run_id: str,
        dir_name: str,
        ap: AdaptivePrecision,
        start_step: int,
        params: Mapping[str, Any],
        mlflow_tracking_uri: str | None = None,
    ) -> RunLoggers:
        """Open the named loggers for one run of a run directory.

        TensorBoard writes to ``run_dir/tensorboard/<dir_name>/``; MLflow to
        ``mlflow_tracking_uri`` or else a file store ``run_dir/mlruns``, in an
        experiment named after the run directory, one MLflow run per adaprec
        run (reused on resume). ``start_step`` is the number of steps already
        done (a resumed run's checkpoint). A logger that cannot be opened is
        reported and left out.
        """
        if not names:
            return cls([], plan=ap.plan)
        run_dir = Path(run_dir)
        openers: dict[str, Callable[[], ExperimentLogger]] = {
            "tensorboard": lambda: _open_tensorboard(run_dir / "tensorboard" / dir_name, start_step),
            "mlflow": lambda: _open_mlflow(run_dir, run_id, mlflow_tracking_uri, start_step),
        }
        loggers = []
        for name in names:
            try:
                loggers.append(openers[name]())
            except MissingExtraError:
                raise
            except Exception as e:  # noqa: BLE001 - a logger must never stop training
                _warn(name, "could not be opened", e)
        energy = ap.energy.summary()
        past = ap.timeline.initial.modules.values() if ap.timeline.initial is not None else ()
        seen = {mp.weight.format for mp in past} | {
            ev.new.split("/")[0] for ev in ap.timeline.events if ev.role == "weight"  # a resumed run's past
        }
        feed = cls(loggers, plan=ap.plan, modeled_j=energy["modeled_j"], fp32_modeled_j=energy["fp32_modeled_j"],
                   formats_seen=seen, initial=ap.timeline.initial, events=ap.timeline.events, title=run_id)
        feed._emit("log_params", {
            **flatten_params(params),
            "run_id": run_id,
            "energy_profile": energy["profile"],
            "energy_kind": energy["kind"]["modeled_j"],  # "modeled (profile 7nm)"
            "energy_meter": ap.meter.name if ap.meter is not None else f"none ({ap.meter_reason})",
        })
        feed._emit("log_precision", start_step, plan_bits(ap.plan), [])
        return feed

    # --- the runner's calls ---------------------------------------------------
    def committed(
        self,
        steps: Sequence[Mapping[str, Any]],
        events: Sequence[TimelineEvent],
        energy: Sequence[Mapping[str, Any]],
    ) -> None:
        """Log the rows of one store commit: step rows, timeline events and ledger rows."""
        if not self._loggers:
            return
        by_step = {int(r["step"]): r for r in energy}
        self._events.extend(events)
        changes: dict[int, list[TimelineEvent]] = {}
        for ev in events:
            changes.setdefault(ev.step, []).append(ev)
        last = -1
        for row in steps:
            s = last = int(row["step"])
            values = {
                "train/loss": row["loss"], "train/lr": row["lr"], "train/loss_scale": row["loss_scale"],
                "train/stepped": float(bool(row["stepped"])),
            }
            e = by_step.get(s)
            if e is not None:
                self._modeled += e["modeled_j"]
                self._fp32 += e["fp32_modeled_j"]
                values["energy/modeled_j"] = e["modeled_j"]
                values["energy/modeled_j_cumulative"] = self._modeled
                values["energy/fp32_modeled_j_cumulative"] = self._fp32
                values["energy/saving_vs_fp32"] = saving_fraction(self._modeled, self._fp32)
                if e.get("measured_j") is not None:
                    values["energy/measured_j"] = e["measured_j"]
                if e.get("wall_s") is not None:
                    values["time/step_s"] = e["wall_s"]  # measured
                if e.get("bytes_moved"):
                    values["memory/bytes_moved"] = e["bytes_moved"]  # the step's counted op traffic
                if e.get("macs"):
                    values["coverage/covered_mac_fraction"] = (e.get("covered_macs") or 0) / e["macs"]
                    values["coverage/narrow_mac_fraction"] = (e.get("narrow_macs") or 0) / e["macs"]
            values.update(self._precision)
            self._emit("log_scalars", s, values)
            if s in changes:
                self._change(s, changes[s])
        done = last + 1
        for step, result in [x for x in self._evals if x[0] <= done]:
            self._emit("log_scalars", step, {f"eval/{k}": v for k, v in result.items()})
        self._evals = [x for x in self._evals if x[0] > done]
        self._emit("flush")

    def evaluated(self, step: int, values: Mapping[str, float]) -> None:
        """An evaluation after ``step`` completed steps; logged with the commit that covers it."""
        if self._loggers:
            self._evals.append((step, {k: float(v) for k, v in values.items()}))

    def finish(self, step: int, final: Mapping[str, float], summary: Mapping[str, Any]) -> None:
        """Log the final evaluation and the ledger's totals, then close as FINISHED."""
        if not self._loggers:
            return
        values = {f"eval/{k}": float(v) for k, v in final.items()}
        values.update({f"final/{k}": float(v) for k, v in final.items()})
        for k in ("modeled_j", "fp32_modeled_j", "bf16_modeled_j", "saving_vs_fp32", "saving_vs_bf16", "measured_j"):
            if summary.get(k) is not None:
                values[f"final/energy/{k}"] = float(summary[k])
        peak = (summary.get("peak_memory") or {}).get("peak_bytes")
        if peak is not None:  # measured (the reading's method is in the store); absent where it could not be
            values["final/memory/peak_bytes"] = float(peak)
        self._emit("log_scalars", step, values)
        if any(hasattr(lg, "log_figure") for lg in self._loggers):
            fig = precision_figure(self._initial, self._events, step, self._title)
            if fig is not None:
                self._emit("log_figure", step, "precision/heatmap", fig)
        self.close("FINISHED")

    def close(self, status: str = "FINISHED") -> None:
        """Close every logger (idempotent)."""
        self._emit("close", status)
        self._loggers.clear()

    # --- inside -------------------------------------------------------------------
    def _change(self, step: int, events: Sequence[TimelineEvent]) -> None:
        self._plan = Timeline.apply(self._plan, events)
        self._precision = self._plan_scalars()
        bits = {f"{ev.module}.{ev.role}": _bits(self._plan, ev.module, ev.role) for ev in events}
        lines = [
            f"{ev.module}.{ev.role}: {ev.old} -> {ev.new} (decided at step {ev.step} by {ev.policy}"
            + (f": {ev.reason})" if ev.reason else ")")
            for ev in events
        ]
        self._emit("log_precision", step + 1, bits, lines)

    def _plan_scalars(self) -> dict[str, float]:
        mps = list(self._plan.modules.values())
        counts = Counter(mp.weight.format for mp in mps)
        self._formats |= set(counts)
        out = {f"precision/modules/{f}": float(counts.get(f, 0)) for f in sorted(self._formats)}
        bits = [float(get(mp.recipe(r).format).bits) for mp in mps for r in ROLES]
        out["precision/mean_bits"] = sum(bits) / len(bits) if bits else 32.0
        return out

    def _emit(self, method: str, *args: Any) -> None:
        for lg in list(self._loggers):
            if method == "log_figure" and not hasattr(lg, method):  # optional in the interface
                continue
            try:
                getattr(lg, method)(*args)
            except Exception as e:  # noqa: BLE001 - a logger must never stop training or lose stored rows
                self._loggers.remove(lg)
                _warn(lg.name, f"failed in {method}", e)
                if method != "close":
                    try:
                        lg.close("FAILED")
                    except Exception:  # noqa: BLE001, S110 - already reported
                        pass


def _warn(name: str, what: str, e: BaseException) -> None:
    warnings.warn(
        f"adaprec: the {name} logger {what} ({type(e).__name__}: {e}); it is switched off for this run, "
        "training and the result store go on",
        stacklevel=3,
    )


def _open_tensorboard(log_dir: Path, start_step: int) -> ExperimentLogger:
    from adaprec.integrations.tensorboard import TensorBoardLogger

    return TensorBoardLogger(log_dir, start_step=start_step)


def _open_mlflow(run_dir: Path, run_id: str, uri: str | None, start_step: int) -> ExperimentLogger:
    from adaprec.integrations.mlflow import MlflowLogger

    return MlflowLogger(
        tracking_uri=uri or (run_dir / "mlruns").resolve().as_uri(),
        experiment=run_dir.resolve().name,
        run_name=run_id,
        run_key=f"{run_dir.resolve()}::{run_id}",
        resume=start_step > 0,
    )


def ledger_metrics(ap: AdaptivePrecision) -> dict[str, float]:
    """Scalars worth logging from the energy ledger and the timeline (energies are modeled unless named measured)."""
    s = ap.energy.summary()
    out = {
        "energy_modeled_j": float(s["modeled_j"]),
        "energy_fp32_modeled_j": float(s["fp32_modeled_j"]),
        "saving_vs_fp32": float(s["saving_vs_fp32"] or 0.0),
        "narrow_mac_fraction": float(s["narrow_mac_fraction"]),  # run natively below 32 bits, whole model
        "emulated_mac_fraction": float(s["emulated_mac_fraction"]),
        "coverage": float(s["coverage"]),  # share of the model's MACs under the plan
        "plan_changes": float(len(ap.timeline.events)),
    }
    if s.get("wall_s") is not None and s.get("timed_steps"):
        out["step_time_s"] = float(s["wall_s"]) / s["timed_steps"]
    if s.get("measured_j") is not None:
        out["energy_measured_j"] = float(s["measured_j"])
    if s.get("steps"):
        out["bytes_per_step"] = float(s["bytes"]) / s["steps"]  # counted (or replayed) op traffic
    out.update({f"memory/{k}": v for k, v in memory_figures(ap).items()})  # counted from the tensors kept
    return out
