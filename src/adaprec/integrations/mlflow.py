"""MLflow logger: a run's params and metrics in an MLflow tracking store.

Needs ``mlflow`` or ``mlflow-skinny`` (``pip install 'adaprec[mlflow]'``),
imported only when a logger is built. Only the tracking client is used, so a
local file store, a tracking server or Databricks all work. See
:class:`~adaprec.integrations.logging.RunLoggers` for the metric names.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

from adaprec.extras import require

__all__ = ["MlflowLogger"]

_MAX_METRICS = 1000  # per log_batch call, MLflow's limit
_MAX_PARAMS = 100
_KEY_BAD = re.compile(r"[^\w./\- :]")


def _key(name: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, ``_ - . / : space``)."""
    return _KEY_BAD.sub("_", name)


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """Let MLflow open a ``file:`` store while the client is built.

    MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set,
    while mlflow-skinny has no SQL store; a file store is what adaprec uses by
    default, so it opts in for that store only (MLflow caches the opened
    store), leaving the variable as it found it. A value the user set wins.
    """
    if urlparse(uri).scheme not in ("", "file") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


class MlflowLogger:
    """Logs one adaprec run as one MLflow run.

    Args:
        tracking_uri: where MLflow stores runs (``file:///abs/path/mlruns``,
            ``http://host:5000``, ...).
        experiment: MLflow experiment name; created when missing.
        run_name: the MLflow run's name (the adaprec run id).
        run_key: identifies this adaprec run across restarts (the runner uses
            ``<run dir>::<run id>``); stored, hashed, as tag ``adaprec.run_key``.
        resume: continue the latest unfinished MLflow run with this
            ``run_key`` instead of starting a new one. A metric's points up
            to the last step it already holds are not sent again, and params
            it already has are kept.
        tags: extra tags for a new run.

    Metrics are buffered and sent in batches at :meth:`flush`. Bits of each
    ``module.role`` are metrics ``bits/<module>.<role>``; a figure (the
    precision heat map) is an artifact ``<tag>.png`` (``precision/heatmap.png``).
    """

    name = "mlflow"

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_key: str | None = None,
        resume: bool = False,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        tracking = require("mlflow.tracking", "mlflow", "the MLflow logger")
        self._entities = importlib.import_module("mlflow.entities")
        with _file_store_allowed(tracking_uri):
            self._client = tracking.MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        exp = self._client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(experiment)
        key = hashlib.sha256(run_key.encode()).hexdigest()[:32] if run_key else None
        run = self._unfinished(exp_id, key) if resume and key else None
        if run is None:
            run = self._client.create_run(
                exp_id, run_name=run_name, tags={**(tags or {}), **({"adaprec.run_key": key} if key else {})}
            )
            self._last_step: dict[str, int] = {}
            self._params: dict[str, str] = {}
        else:  # every key is logged in step order: what a key holds up to its last step is there already
            self._last_step = {
                k: max(m.step for m in self._client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics
            }
            self._params = dict(run.data.params)
        self.run_id: str = run.info.run_id
        self._pending: list[Any] = []
        self._closed = False

    def _unfinished(self, exp_id: str, key: str) -> Any:
        runs = self._client.search_runs(
            [exp_id], filter_string=f"tags.`adaprec.run_key` = '{key}'", order_by=["attributes.start_time DESC"]
        )
        return next((r for r in runs if r.info.status != "FINISHED"), None)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Params the run does not have yet (MLflow params cannot change)."""
        Param = self._entities.Param
        new = [Param(_key(k), str(v)) for k, v in params.items() if _key(k) not in self._params]
        for i in range(0, len(new), _MAX_PARAMS):
            self._client.log_batch(self.run_id, params=new[i : i + _MAX_PARAMS])
        self._params.update({p.key: p.value for p in new})

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        Metric = self._entities.Metric
        now = int(time.time() * 1000)
        for k, v in values.items():
            key = _key(k)
            if step > self._last_step.get(key, -1):
                self._pending.append(Metric(key, float(v), now, int(step)))
        if len(self._pending) >= _MAX_METRICS:
            self.flush()

    def log_precision(self, step: int, bits: Mapping[str, float], changes: Sequence[str]) -> None:
        self.log_scalars(step, {f"bits/{k}": v for k, v in bits.items()})

    def log_figure(self, step: int, tag: str, figure: Any) -> None:
        """A matplotlib figure as the PNG artifact ``<tag>.png`` (a later figure of the same tag replaces it)."""
        self._client.log_figure(self.run_id, figure, f"{tag}.png")

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:_MAX_METRICS], self._pending[_MAX_METRICS:]
            self._client.log_batch(self.run_id, metrics=batch)

    def close(self, status: str = "FINISHED") -> None:
        """Send what is buffered and end the MLflow run with ``status``."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            self._client.set_terminated(self.run_id, status=status)
