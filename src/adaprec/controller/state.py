"""The controller's protocol checks and its saved state: misuse becomes a clear error, a bad state changes nothing."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from adaprec.controller.config import Phase
from adaprec.errors import CheckpointError, UsageError
from adaprec.hardware.shapes import GemmShape, ShapeTable

if TYPE_CHECKING:
    from adaprec.controller.adaptive import AdaptivePrecision

__all__ = ["check_forward", "check_backward", "warn_outside", "state_of", "load_into"]

VERSION = 2
_REQUIRED = ("step", "epoch", "engine", "policy", "monitor", "loss_scaler", "timeline", "energy", "template")


def check_forward(phase: Phase, active: bool) -> None:
    """A training forward may start: not twice in a step, not nested."""
    if phase is Phase.BACKWARD:
        raise UsageError("autocast() entered again before step(): call ap.step() after ap.backward(loss)")
    if phase is Phase.FORWARD:
        raise UsageError("autocast() entered twice before backward(): one forward pass per step, then ap.backward(loss)")
    if active:
        raise UsageError("autocast() is already active: do not nest `with ap.autocast():` blocks")


def check_backward(phase: Phase, loss: Any) -> None:
    """A backward may run: after one forward, on a scalar loss."""
    if phase is not Phase.FORWARD:
        raise UsageError(
            "backward() needs a forward pass inside `with ap.autocast():` first"
            if phase is Phase.READY
            else "backward() called twice without step(): call ap.step() between them"
        )
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise UsageError("backward() needs the scalar loss tensor")


def warn_outside(ap: AdaptivePrecision) -> None:
    """Once: gradients of trainable parameters no known optimizer holds stay multiplied by the loss scale."""
    if ap._warned_outside or ap._scale == 1.0:
        return
    mine = {id(p) for p in ap._params} | ap.check.unscaled_ids
    outside = [n for n, p in ap.engine.map.model.named_parameters()
               if p.requires_grad and p.grad is not None and id(p) not in mine]
    if outside:
        ap._warned_outside = True
        warnings.warn(
            f"adaprec: {len(outside)} trainable parameter(s) ({', '.join(outside[:3])}"
            f"{', ...' if len(outside) > 3 else ''}) belong to no optimizer adaprec knows: their gradients "
            f"are still multiplied by the loss scale ({ap._scale:g}). Call ap.unscale_(other_optimizer) "
            "before stepping that optimizer, as with torch.amp.GradScaler",
            stacklevel=4,
        )


def state_of(ap: AdaptivePrecision) -> dict[str, Any]:
    """Everything needed to resume bit-exactly (the model and optimizer are saved by the caller)."""
    return {
        "version": VERSION,
        "step": ap._step,
        "epoch": ap._epoch,
        "decided": ap.setup.decided,
        "template": ap.setup.template.to_dict(),
        "engine": ap.engine.state_dict(),
        "policy": ap.policy.state_dict(),
        "monitor": ap.monitor.state_dict(),
        "loss_scaler": ap.loss_scaler.state_dict(),
        "timeline": ap.timeline.state_dict(),
        "energy": ap.energy.state_dict(),
        "world_size": ap.reducer.world_size,
        # the parameter shapes this state was saved with: a state of another model is refused whole
        "params": [[n, list(p.shape)] for n, p in ap.engine.map.model.named_parameters()],  # global (FSDP) shapes
        # the copy of the last step's starting point a guard rollback would restore: without it, a
        # spike seen on the first step after a resume could only be skipped, not rolled back
        "rollback": ap.update.rollback.state_dict() if ap.update.rollback is not None else None,
        # the formats the optimizer's moments are kept in (the moments themselves: optimizer.state_dict())
        "optimizer_state": ap.update.states.state_dict(),
        "bytes": ap.bytes.state_dict(),
        "saved": ap.saved.state_dict(),
        "speed": ap.speed.state_dict(),  # the speed check's timings and verdict (a resume does not redo it)
        # the measured GEMM shapes decisions were made from: a resume decides the same without timing again
        "shape_table": None if ap.setup.table is None else {
            "table": ap.setup.table.state_dict(),
            "shapes": {m: [list(g) for g in gs] for m, gs in ap.setup.shapes.items()},
        },
    }


def load_into(ap: AdaptivePrecision, state: Mapping[str, Any]) -> None:
    """Restore everything :func:`state_of` saved: all of it, or (on a bad state) nothing."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"adaprec state must be the dict AdaptivePrecision.state_dict() returned, got {type(state).__name__}")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"adaprec state dict lacks {missing}; pass the dict returned by AdaptivePrecision.state_dict()")
    _check_params(ap, state.get("params"))
    before = state_of(ap)
    try:
        _load(ap, state)
    except Exception as e:
        _load(ap, before)
        if isinstance(e, CheckpointError):
            raise CheckpointError(f"{e}; nothing was changed") from e.__cause__
        raise CheckpointError(
            f"adaprec state does not fit this model, optimizer or configuration ({type(e).__name__}: {e}); "
            "nothing was changed. Load a state saved by the same set-up"
        ) from e


def _check_params(ap: AdaptivePrecision, saved: Any) -> None:
    """Refuse, before touching anything, a state saved with parameters of other names or shapes."""
    if saved is None:  # a state of an older adaprec: the later checks still catch what they can
        return
    here = {n: list(p.shape) for n, p in ap.engine.map.model.named_parameters()}
    try:
        there = {str(n): [int(d) for d in shape] for n, shape in saved}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"adaprec state has an unreadable parameter list ({e}); nothing was changed") from None
    diff = [f"{n}: saved {there.get(n)}, here {here.get(n)}" for n in sorted(set(here) | set(there))
            if here.get(n) != there.get(n)]
    if diff:
        raise CheckpointError(
            "adaprec state was saved with another model (" + "; ".join(diff[:4])
            + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            + "); nothing was changed. Load the state saved with this model"
        )


def _load(ap: AdaptivePrecision, state: Mapping[str, Any]) -> None:
    step, epoch = int(state["step"]), int(state["epoch"])
    ap.engine.load_state_dict(state["engine"])
    table = state.get("shape_table")
    ap.setup.table = None if table is None else ShapeTable.from_dict(table["table"])
    if table is not None:
        ap.setup.shapes = {str(m): [GemmShape.of(g) for g in gs] for m, gs in table["shapes"].items()}
    ap.setup.restore(state["template"])
    ap.policy.load_state_dict(state["policy"])
    ap.setup.configure_monitor()
    ap.monitor.load_state_dict(state["monitor"])
    ap.loss_scaler.load_state_dict(state["loss_scaler"])
    ap.timeline.load_state_dict(state["timeline"])
    ap.energy.load_state_dict(state["energy"])
    if ap.update.rollback is not None:
        ap.update.rollback.load_state_dict(state.get("rollback"))
    ap.update.states.load_state_dict(state.get("optimizer_state"))
    ap.bytes.load_state_dict(state.get("bytes"))
    ap.saved.load_state_dict(state.get("saved"))
    ap.speed.load_state_dict(state.get("speed"), ap)
    ap.reducer.step_timed(step - 1, None)
    ap._shadow_sums = {}
    ap._step, ap._epoch = step, epoch
    ap.setup.decided = bool(state.get("decided", step > 0))
    if ap.engine.sites:
        ap._finalize()
    ap._phase, ap._unscaled = Phase.READY, None
    ap.books.cancel()
