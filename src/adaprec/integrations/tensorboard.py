"""TensorBoard logger: a run's scalars, params and precision changes as event files.

Needs the ``tensorboard`` package (``pip install 'adaprec[tensorboard]'``),
imported only when a logger is built. View with
``tensorboard --logdir RUN_DIR/tensorboard``: one TensorBoard run per adaprec
run. See :class:`~adaprec.integrations.logging.RunLoggers` for the tags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adaprec.extras import require

__all__ = ["TensorBoardLogger"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


class TensorBoardLogger:
    """Writes scalars with ``add_scalar``, params and precision changes with ``add_text``, figures with ``add_figure``.

    Args:
        log_dir: the directory of this run's event files.
        start_step: steps already done. A resumed run passes its checkpoint
            step: TensorBoard then hides (purges) whatever an interrupted
            attempt wrote from that step on, so no step shows twice.

    Bits of each ``module.role`` are scalars ``bits/<module>.<role>``; the
    changes themselves are text under ``precision/changes``; params are one
    Markdown table under ``run/params``; the precision heat map is an image
    under ``precision/heatmap`` (TensorBoard's Images tab).
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, *, start_step: int = 0) -> None:
        tb = require("torch.utils.tensorboard", "tensorboard", "the TensorBoard logger")
        self.log_dir = Path(log_dir)
        self._start = start_step
        # purge_step only when resuming: 0 would ask TensorBoard to purge a fresh run's past
        self._writer = tb.SummaryWriter(log_dir=str(self.log_dir), purge_step=start_step or None)
        self._closed = False

    def log_params(self, params: Mapping[str, str]) -> None:
        rows = "\n".join(f"| {_cell(k)} | {_cell(v)} |" for k, v in sorted(params.items()))
        self._writer.add_text("run/params", "| param | value |\n|---|---|\n" + rows, global_step=self._start)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, v in values.items():
            self._writer.add_scalar(tag, float(v), global_step=step)

    def log_precision(self, step: int, bits: Mapping[str, float], changes: Sequence[str]) -> None:
        for key, b in bits.items():
            self._writer.add_scalar(f"bits/{key}", float(b), global_step=step)
        if changes:
            text = f"in force from step {step}:\n\n" + "\n".join(f"- {_cell(c)}" for c in changes)
            self._writer.add_text("precision/changes", text, global_step=step)

    def log_figure(self, step: int, tag: str, figure: Any) -> None:
        """A matplotlib figure as an image (the caller keeps and closes the figure)."""
        self._writer.add_figure(tag, figure, global_step=step, close=False)

    def flush(self) -> None:
        self._writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close the event file (TensorBoard has no run status; ``status`` is ignored)."""
        if not self._closed:
            self._closed = True
            self._writer.close()
