"""Progressive fractional quantization (FracTrain PFQ, NeurIPS 2020): climb a bit-width ladder on loss plateaus.

Training starts at very low precision, where steps are cheapest; when the
loss stops improving at the current rung, precision goes up one rung.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adaprec.errors import PlanError, PolicyError
from adaprec.monitor.snapshot import Snapshot
from adaprec.plan import PrecisionPlan
from adaprec.policies.base import RungPolicy, _check_keys
from adaprec.policies.ladder import fixed_point_module

__all__ = ["ProgressivePolicy", "pfq_plateau", "pfq_switch_epochs"]


def pfq_plateau(segment: Sequence[float], reference: float, eps: float, window: int = 5) -> bool:
    """FracTrain's plateau test on the epoch losses of the current rung.

    True when the segment holds at least ``window + 1`` epochs and, with
    ``L(t)`` its last loss, ``|L(t-i) - L(t)| / reference < eps`` for every
    ``i`` in ``1..window``. ``reference`` is the mean loss of the first
    ``window`` epochs of the run, which makes ``eps`` scale-free.
    """
    if len(segment) < window + 1:
        return False
    last = segment[-1]
    ref = abs(reference)
    diffs = [abs(segment[-1 - i] - last) for i in range(1, window + 1)]
    if ref == 0.0:
        return all(d == 0.0 for d in diffs)
    return all(d / ref < eps for d in diffs)


def pfq_switch_epochs(
    epoch_losses: Sequence[float],
    window: int = 5,
    eps: float = 0.05,
    eps_decay: float = 0.3,
    max_switches: int = 3,
) -> list[int]:
    """The epochs at whose end PFQ switches to the next rung, for a whole loss sequence.

    Only epochs at the current rung count towards a plateau; ``eps`` is
    multiplied by ``eps_decay`` after each switch; at most ``max_switches``.
    """
    switches: list[int] = []
    start, e = 0, eps
    for t in range(len(epoch_losses)):
        if len(switches) >= max_switches:
            break
        if t + 1 < window:
            continue
        ref = sum(epoch_losses[:window]) / window
        if pfq_plateau(epoch_losses[start : t + 1], ref, e, window):
            switches.append(t)
            start, e = t + 1, e * eps_decay
    return switches


class ProgressivePolicy(RungPolicy):
    """FracTrain PFQ: rung ``r`` runs ``int{fwd[r]}`` forward and ``int{bwd[r]}`` errors.

    Checked whenever a snapshot reports newly completed epochs (the
    controller's ``end_epoch()``). Defaults follow FracTrain: forward
    3, 4, 6, 8 bits, backward 6, 6, 8, 8 bits, window 5 epochs, eps 0.05
    decayed by 0.3 per switch, at most 3 switches. ``grad_weight``: format
    of the weight gradient (fp32, accumulated at full precision).
    """

    name = "progressive"

    def __init__(
        self,
        fwd_bits: Sequence[int] = (3, 4, 6, 8),
        bwd_bits: Sequence[int] = (6, 6, 8, 8),
        window: int = 5,
        eps: float = 0.05,
        eps_decay: float = 0.3,
        max_switches: int = 3,
        grad_weight: str = "fp32",
    ) -> None:
        super().__init__()
        fwd, bwd = list(fwd_bits), list(bwd_bits)
        if not fwd or len(fwd) != len(bwd):
            raise PolicyError(f"progressive policy: fwd_bits and bwd_bits need the same non-zero length, "
                              f"got {fwd} and {bwd}")
        for b in fwd + bwd:
            if not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 16:
                raise PolicyError(f"progressive policy: bit-widths must be ints in 2..16, got {b!r}")
        if not isinstance(window, int) or window < 1:
            raise PolicyError(f"progressive policy: window must be a positive int, got {window!r}")
        if not eps > 0 or not 0 < eps_decay <= 1:
            raise PolicyError(f"progressive policy: need eps > 0 and 0 < eps_decay <= 1, got {eps}, {eps_decay}")
        if not isinstance(max_switches, int) or max_switches < 0:
            raise PolicyError(f"progressive policy: max_switches must be an int >= 0, got {max_switches!r}")
        try:
            self.rungs = [fixed_point_module(f, b, grad_weight) for f, b in zip(fwd, bwd, strict=True)]
        except PlanError as e:
            raise PolicyError(f"progressive policy: {e}") from None
        self.fwd_bits, self.bwd_bits = fwd, bwd
        self.window, self.eps0, self.eps_decay = window, float(eps), float(eps_decay)
        self.max_switches = min(max_switches, len(fwd) - 1)
        self.rung = 0
        self.eps = self.eps0
        self.segment_start = 0
        self.epochs_seen = 0
        self.switch_epochs: list[int] = []

    def decide(self, snapshot: Snapshot, step: int) -> PrecisionPlan:
        template = self._template()
        losses = snapshot.epoch_losses
        reason = ""
        for t in range(self.epochs_seen, len(losses)):
            if len(self.switch_epochs) >= self.max_switches or t + 1 < self.window:
                continue
            ref = sum(losses[: self.window]) / self.window
            seg = losses[self.segment_start : t + 1]
            if pfq_plateau(seg, ref, self.eps, self.window):
                spread = max(abs(seg[-1 - i] - seg[-1]) for i in range(1, self.window + 1)) / abs(ref or 1.0)
                reason = (f"loss plateau at epoch {t}: max |L(t-i)-L(t)|/L_ref = {spread:.4f} < eps {self.eps:.4f} "
                          f"over {self.window} epochs -> rung {self.rung + 1} "
                          f"(fwd {self.fwd_bits[self.rung + 1]} / bwd {self.bwd_bits[self.rung + 1]} bits)")
                self.switch_epochs.append(t)
                self.rung += 1
                self.segment_start = t + 1
                self.eps *= self.eps_decay
        self.epochs_seen = max(self.epochs_seen, len(losses))
        plan = self._plan(template)
        self._explain(snapshot.plan, plan, reason or f"progressive rung {self.rung}")
        return plan

    def state_dict(self) -> dict[str, Any]:
        return {"rung": self.rung, "eps": self.eps, "segment_start": self.segment_start,
                "epochs_seen": self.epochs_seen, "switch_epochs": list(self.switch_epochs)}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        super().load_state_dict(d)
        _check_keys(d, ["rung", "eps", "segment_start", "epochs_seen", "switch_epochs"], self.name)
        self.rung = int(d["rung"])
        self.eps = float(d["eps"])
        self.segment_start = int(d["segment_start"])
        self.epochs_seen = int(d["epochs_seen"])
        self.switch_epochs = [int(e) for e in d["switch_epochs"]]
