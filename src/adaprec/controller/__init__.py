"""The controller: :class:`AdaptivePrecision`, the training-loop face, composed of parts with one job each.

- :mod:`~adaprec.controller.config`: the options (:class:`ControllerConfig`) and the step's :class:`Phase`;
- :mod:`~adaprec.controller.setup`: the engine for this device, discovery, pins, the hardware filter;
- :mod:`~adaprec.controller.gradients`: unscale, inf/NaN check, the step's :class:`StepHealth`;
- :mod:`~adaprec.controller.reducer`: what every rank agrees on (local or multi-rank, one interface);
- :mod:`~adaprec.controller.rollback`: the pre-step copy a guard rollback restores;
- :mod:`~adaprec.controller.books`: the ledger row, wall time and meter of each step;
- :mod:`~adaprec.controller.shadow`: the fp32 shadow audit of the gradients;
- :mod:`~adaprec.controller.report` and :mod:`~adaprec.controller.state`: the account and the saved state.
"""

from adaprec.controller.adaptive import AdaptivePrecision, StepResult
from adaprec.controller.config import ControllerConfig, Phase
from adaprec.controller.gradients import StepHealth

__all__ = ["AdaptivePrecision", "StepResult", "ControllerConfig", "Phase", "StepHealth"]
