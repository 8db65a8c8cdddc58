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
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from adaprec.energy.ledger import saving_fraction
from adaprec.errors import MissingExtraError
from adaprec.formats import get
from adaprec.plan import ROLES, PrecisionPlan
from adaprec.timeline import Timeline, TimelineEvent

if TYPE_CHECKING:
    from adaprec.controller import AdaptivePrecision

__all__ = [
    "LOGGER_NAMES", "ExperimentLogger", "RunLoggers", "require", "check_available", "flatten_params", "ledger_metrics",
]

# logger name -> (module to import, extra that installs it)
_BACKENDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "mlflow": ("mlflow.tracking", "mlflow"),
}
LOGGER_NAMES: tuple[str, ...] = tuple(_BACKENDS)
_MAX_PARAM_CHARS = 500  # what every MLflow server accepts; our params are far shorter


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

    def flush(self) -> None:
        """Send what is buffered."""

    def close(self, status: str = "FINISHED") -> None:
        """Flush and release the backend; the run ends with ``status``."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or say which ``adaprec[extra]`` to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{what} needs the {extra!r} package, which cannot be imported ({e}); "
            f"install it with: pip install 'adaprec[{extra}]'"
        ) from None


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
    fmt = mp.optimizer_state if role == "optimizer_state" else mp.recipe(role).format
    return float(get(fmt).bits)


def _all_bits(plan: PrecisionPlan) -> dict[str, float]:
    return {f"{m}.{r}": _bits(plan, m, r) for m in plan.modules for r in (*ROLES, "optimizer_state")}


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
    At the end: ``eval/*``, ``final/<metric>``, ``final/energy/*``.

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
    ) -> None:
        self._loggers = list(loggers)
        self._plan = plan
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
                   formats_seen=seen)
        feed._emit("log_params", {
            **flatten_params(params),
            "run_id": run_id,
            "energy_profile": energy["profile"],
            "energy_kind": energy["kind"]["modeled_j"],  # "modeled (profile 7nm)"
            "energy_meter": ap.meter.name if ap.meter is not None else f"none ({ap.meter_reason})",
        })
        feed._emit("log_precision", start_step, _all_bits(ap.plan), [])
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
        self._emit("log_scalars", step, values)
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
    return out
