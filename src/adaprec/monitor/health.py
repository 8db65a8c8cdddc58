"""The health monitor: per-layer numerical statistics gathered on sampled steps.

The engine calls :meth:`HealthMonitor.observe_tensor` for every tensor it
casts on a sampled step; the controller adds gradients and the loss, then
asks for a :class:`Snapshot`. Observations only accumulate tensors on the
device; the one host sync happens in :meth:`snapshot`, so the hot path
never waits on the GPU. Under ``torch.distributed`` the controller's rank
reducer (:class:`adaprec.controller.reducer.RankReducer`) carries the
accumulated sums in the step's one collective (:meth:`HealthMonitor.pack`,
then :meth:`HealthMonitor.unpack`) so every rank sees the same snapshot and
its policy takes the same decision. :meth:`reduce_distributed` does the same
with its own all-reduces, for a monitor used without the controller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from adaprec.distributed import Packer, local
from adaprec.errors import CheckpointError, PolicyError
from adaprec.formats import get
from adaprec.formats.storage import storage_format
from adaprec.monitor.snapshot import Snapshot, TensorStats
from adaprec.monitor.stats import (
    DEFAULT_CANDIDATES,
    MAX_SAMPLE,
    Pending,
    finish,
    formats_for,
    prepare,
    sample,
    stats_from_sums,
)
from adaprec.monitor.storage_error import prepare_storage
from adaprec.plan import PrecisionPlan, TensorRecipe

__all__ = ["HealthMonitor", "ReduceFn"]

# reduce_fn(tensor, op) reduces ``tensor`` in place across ranks; op is "sum", "max" or "mean".
ReduceFn = Callable[[torch.Tensor, str], None]


def _dist_reduce(t: torch.Tensor, op: str) -> None:
    import torch.distributed as dist

    if op == "max":
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t.div_(dist.get_world_size())


def _sq(x: torch.Tensor) -> torch.Tensor:
    """The squared norm of ``x``, summed in float64."""
    return x.to(torch.float64).square().sum()


def _transformed(x: torch.Tensor) -> bool:
    """Whether ``x`` is a tensor of a running ``torch.func`` transform (vmap, grad, jacrev)."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except AttributeError:  # pragma: no cover - another torch
        return False


class HealthMonitor:
    """Measures quantization health, gradient statistics and the loss trend.

    Args:
        every: sample tensor statistics every ``every`` steps (step 0 included).
        candidates: formats measured for every tensor besides its current one;
            a policy can only choose among measured formats.
        role_candidates: per tensor role, the formats measured instead of
            ``candidates`` (a policy that chooses per role names them, so no
            row is measured that no decision reads).
        loss_window: how many recent losses the snapshot carries.
        ema_beta: decay of the loss trend EMA (closer to 1 = slower trend).
        diversity_window: number of observed minibatch gradients per module
            over which gradient diversity (MuPPET) is computed; the sums reset
            after each window.
        max_sample: elements per tensor used for the format statistics.
        grad_sample: gradient coordinates kept for the diversity sums (the
            running sum costs that much memory per module).
    """

    def __init__(
        self,
        every: int = 10,
        candidates: Sequence[str] = DEFAULT_CANDIDATES,
        loss_window: int = 50,
        ema_beta: float = 0.95,
        diversity_window: int = 8,
        max_sample: int = MAX_SAMPLE,
        grad_sample: int = 65536,
        role_candidates: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        for key, v in (("every", every), ("loss_window", loss_window), ("diversity_window", diversity_window),
                       ("max_sample", max_sample), ("grad_sample", grad_sample)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PolicyError(f"HealthMonitor {key} must be a positive int, got {v!r}")
        if diversity_window < 2:
            raise PolicyError("HealthMonitor diversity_window must be >= 2 (diversity compares several gradients)")
        if not 0.0 < ema_beta < 1.0:
            raise PolicyError(f"HealthMonitor ema_beta must be in (0, 1), got {ema_beta!r}")
        self.every = every
        self.set_candidates(candidates, role_candidates)
        self.loss_window = loss_window
        self.ema_beta = float(ema_beta)
        self.diversity_window = diversity_window
        self.max_sample = max_sample
        self.grad_sample = grad_sample
        # samples taken this step, measured together when the snapshot (or a reduction) needs them
        self._samples: list[tuple[tuple[str, str], Pending]] = []
        # tensor statistics of the current sampled step: (module, role) -> [formats, scalings, current, amax, sums]
        self._pending: dict[tuple[str, str], list[Any]] = {}
        self._pending_losses: list[torch.Tensor | float] = []
        self._grad_norm: dict[str, torch.Tensor | float] = {}
        # gradient diversity window per module: running sum of sampled gradients, sum of squared norms, count
        self._gsum: dict[str, torch.Tensor] = {}
        self._gsq: dict[str, torch.Tensor] = {}
        self._gcount: dict[str, int] = {}
        self._div: dict[str, tuple[Any, Any]] = {}  # last completed window: (sum ||g||^2, ||sum g||^2)
        self._shadow: dict[str, tuple[float, float]] = {}
        # gradient figures of a distributed step, waiting for the exchange: module -> (sharded, norm, sample)
        self._staged: dict[str, tuple[bool, torch.Tensor, torch.Tensor]] = {}
        self.loss_ema: float | None = None
        self.loss_count = 0
        self.loss_history: list[float] = []
        self.last_loss: float | None = None
        self.epoch_losses: list[float] = []
        self._epoch_sum = 0.0
        self._epoch_count = 0

    def set_candidates(self, candidates: Sequence[str], role_candidates: Mapping[str, Sequence[str]] | None = None) -> None:
        """Measure these formats from now on (the policy's candidates, known once its modules are).

        ``role_candidates["saved"]``: storage specs (``int8/block256``...) whose round trip is measured on each
        observed activation with the real codes (:func:`~adaprec.monitor.storage_error.prepare_storage`), under
        the ``saved`` role: what autograd keeps is block-scaled, which per-tensor statistics understate.
        """
        self.candidates = tuple(get(c).name for c in candidates)
        roles = dict(role_candidates or {})
        self.saved_specs = tuple(storage_format(s, role="activation").spec for s in roles.pop("saved", ()))
        self.role_candidates = {r: tuple(get(c).name for c in cs) for r, cs in roles.items()}

    # --- what the engine and controller call -----------------------------------
    def should_sample(self, step: int) -> bool:
        """Whether tensor statistics are measured at ``step``."""
        return step % self.every == 0

    def observe_tensor(self, module: str, role: str, x: torch.Tensor, recipe: TensorRecipe) -> None:
        """Sample ``x`` (the fp32 tensor before its cast) for measurement under ``recipe`` and every candidate.

        Only the amax and a strided sample are taken now; the format
        statistics of all of a step's samples are computed in one batch.
        """
        if _transformed(x):
            return  # a torch.func transform's batched or wrapped tensor: per-sample views are not the layer's tensor
        candidates = self.role_candidates.get(role, self.candidates)
        pending = prepare(x, recipe, formats_for(recipe, candidates), self.max_sample)
        self._samples.append(((module, role), pending))
        if role == "activation" and self.saved_specs:
            self._samples.append(((module, "saved"), prepare_storage(x, self.saved_specs, self.max_sample)))

    def _measure_samples(self) -> None:
        """Measure the step's samples in one batch and pool them per (module, role)."""
        if not self._samples:
            return
        sums_all = finish([p for _, p in self._samples])
        for (key, p), sums in zip(self._samples, sums_all, strict=True):
            prev = self._pending.get(key)
            if prev is not None and prev[0] == p.formats and prev[1] == p.scalings:
                # the same tensor role seen again this step (shared module, several calls): pool
                prev[3] = torch.maximum(prev[3], p.amax)
                prev[4] = prev[4] + sums
            else:
                self._pending[key] = [p.formats, p.scalings, p.formats[0], p.amax, sums]  # current format first
        self._samples.clear()

    def observe_grads(self, module: str, grad: torch.Tensor | None) -> None:
        """Record the gradient norm and feed the gradient diversity window of ``module``."""
        if grad is None:
            return
        with torch.no_grad():
            g = local(grad).detach().to(torch.float32)  # a DTensor (FSDP2) gradient: this rank's shard
            self._grad_norm[module] = torch.linalg.vector_norm(g)
            self._window_add(module, self._grad_sample_of(g))

    def _grad_sample_of(self, g: torch.Tensor) -> torch.Tensor:
        # fp32: the window's running sum is the monitor's largest buffer (grad_sample elements per module); the
        # squared norms are taken in float64 (_sq) so a window of nearly cancelling gradients keeps its precision
        return torch.nan_to_num(sample(g, self.grad_sample), nan=0.0, posinf=0.0, neginf=0.0).to(torch.float32)

    def _window_add(self, module: str, gs: torch.Tensor, completed: tuple[Any, Any] | None = None) -> None:
        """Feed one gradient sample to the diversity window; ``completed``: the (reduced) figures to keep if it closes."""
        if module in self._gsum and self._gsum[module].shape == gs.shape:
            self._gsum[module] += gs
            self._gsq[module] += _sq(gs)
            self._gcount[module] += 1
        else:
            self._gsum[module] = gs.clone()
            self._gsq[module] = _sq(gs)
            self._gcount[module] = 1
        if self._gcount[module] >= self.diversity_window:
            self._div[module] = completed or (self._gsq[module], _sq(self._gsum[module]))
            del self._gsum[module], self._gsq[module], self._gcount[module]

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Record this step's loss (a tensor is kept on device until the snapshot)."""
        self._pending_losses.append(loss.detach().float().reshape(()) if torch.is_tensor(loss) else float(loss))

    def discard_last_loss(self) -> None:
        """Take the losses of the last snapshot back out of the trend: the step was rolled back, so its loss
        (a spike, an overflow storm) must not raise the trend that the next steps are judged against."""
        saved = getattr(self, "_before_fold", None)
        if saved is None:
            return
        (self.loss_ema, self.loss_count, history, self.last_loss, self._epoch_sum, self._epoch_count) = saved
        self.loss_history[:] = history
        self._before_fold = None

    def observe_shadow(self, audit: Mapping[str, tuple[float, float]]) -> None:
        """Record a shadow audit: per module (cosine, relative error) of the gradient against fp32."""
        self._shadow = {m: (float(c), float(r)) for m, (c, r) in audit.items()}

    def end_epoch(self) -> None:
        """Close the current epoch: its mean loss joins ``epoch_losses``."""
        self._fold_losses()
        self._close_epoch()

    # --- distributed ---------------------------------------------------------------
    def stage_grads(self, module: str, grad: torch.Tensor | None, sharded: bool = False) -> None:
        """:meth:`observe_grads` for a distributed step: this rank's figures wait for the exchange.

        ``sharded``: ``grad`` is this rank's shard of the gradient (FSDP2), so the
        ranks' squared norms and diversity sums add up; otherwise every rank holds the
        same (DDP-averaged) gradient and the figures agree already. :meth:`pack` sends
        them, :meth:`unpack` keeps them (or drops them, on a step with inf/NaN).
        """
        if grad is None:
            return
        with torch.no_grad():
            g = local(grad).detach().to(torch.float32)
            self._staged[module] = (bool(sharded), torch.linalg.vector_norm(g), self._grad_sample_of(g))

    def pack(self, packer: Packer) -> None:
        """Add this rank's pending statistics to ``packer`` (one vector for all ranks; see adaprec.distributed).

        Tensor statistics: amax (max over ranks) and the raw sums (added); staged
        gradients: the norm and, on the step that closes a diversity window, its two
        sums (added over shards, else the max of equal values). Nothing syncs here.
        """
        self._measure_samples()
        for key in sorted(self._pending):
            formats, scalings, _, a, sums = self._pending[key]
            tag = f"t|{key[0]}|{key[1]}|{','.join(formats)}|{','.join(scalings)}"
            packer.add(tag + "|amax", a.to(torch.float64).reshape(1), "max")
            packer.add(tag + "|sums", sums.to(torch.float64), "sum")
        for m in sorted(self._staged):
            sharded, norm, gs = self._staged[m]
            op = "sum" if sharded else "max"
            packer.add(f"g|{m}|norm", (norm.to(torch.float64).square() if sharded else norm.to(torch.float64)), op)
            ongoing = m in self._gsum and self._gsum[m].shape == gs.shape  # else a new window starts (>= 2 long)
            if ongoing and self._gcount[m] + 1 >= self.diversity_window:
                num = self._gsq[m] + _sq(gs)
                den = _sq(self._gsum[m] + gs)
                packer.add(f"d|{m}", torch.stack([num, den]), op)

    def unpack(self, values: Mapping[str, Sequence[float]], grads_ok: bool = True) -> None:
        """Take the statistics reduced over ranks back (``values``: :meth:`Packer.split` of the reduced vector).

        ``grads_ok`` False (the step had inf/NaN somewhere) drops the staged gradients,
        as a single-process step does not observe them.
        """
        for key in sorted(self._pending):
            formats, scalings = self._pending[key][0], self._pending[key][1]
            tag = f"t|{key[0]}|{key[1]}|{','.join(formats)}|{','.join(scalings)}"
            self._pending[key][3] = torch.tensor(values[tag + "|amax"][0], dtype=torch.float64)
            self._pending[key][4] = torch.tensor(list(values[tag + "|sums"]), dtype=torch.float64)
        staged, self._staged = self._staged, {}
        if not grads_ok:
            return
        for m in sorted(staged):
            sharded, _, gs = staged[m]
            n = float(values[f"g|{m}|norm"][0])
            self._grad_norm[m] = math.sqrt(n) if sharded else n
            div = values.get(f"d|{m}")
            self._window_add(m, gs, (float(div[0]), float(div[1])) if div is not None else None)

    def reduce_distributed(self, reduce_fn: ReduceFn | None = None) -> bool:
        """All-reduce the pending statistics so every rank builds the same snapshot.

        Amax takes the max over ranks; signal, error and counts are summed
        (so the SQNR is that of all ranks' samples together); pending losses
        are averaged. Gradient statistics are not reduced: under DDP the
        gradients are already identical on every rank. Returns False (and
        does nothing) when torch.distributed is not initialized and no
        ``reduce_fn`` is given. Every rank must have observed the same
        (module, role) pairs, as they do when they run the same model.
        """
        if reduce_fn is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                return False
            reduce_fn = _dist_reduce
        self._measure_samples()
        keys = sorted(self._pending)
        if keys:
            amaxes = torch.stack([self._pending[k][3].to(torch.float32).reshape(()) for k in keys])
            sums = torch.cat([self._pending[k][4] for k in keys])
            reduce_fn(amaxes, "max")
            reduce_fn(sums, "sum")
            off = 0
            for i, k in enumerate(keys):
                n = self._pending[k][4].numel()
                self._pending[k][3] = amaxes[i]
                self._pending[k][4] = sums[off : off + n]
                off += n
        if self._pending_losses:
            losses = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in self._pending_losses])
            reduce_fn(losses, "mean")
            self._pending_losses = list(losses.unbind())
        return True

    # --- the snapshot ---------------------------------------------------------------
    def snapshot(
        self,
        step: int,
        epoch: int,
        plan: PrecisionPlan,
        nonfinite: bool = False,
        overflowed: Iterable[str] = (),
        nonfinite_cause: str = "",
    ) -> Snapshot:
        """Freeze what was observed since the last snapshot into plain data (one host sync)."""
        ema_before, latest = self._fold_losses()
        self._measure_samples()
        while epoch > len(self.epoch_losses) and self._epoch_count:
            self._close_epoch()  # the controller did not call end_epoch(): close on the boundary
        keys = list(self._pending)
        norm_keys = list(self._grad_norm)
        div_keys = list(self._div)
        flat: list[torch.Tensor] = []
        for k in keys:
            _, _, _, a, s = self._pending[k]
            flat += [a.to(torch.float64).reshape(1).cpu(), s.to(torch.float64).cpu()]
        # only what is still a tensor needs the sync: a norm or diversity read at an earlier snapshot is a
        # float already (on most steps every one of them: nothing to copy, nothing to wait for)
        norm_t = {m for m in norm_keys if torch.is_tensor(self._grad_norm[m])}
        div_t = {m for m in div_keys if any(torch.is_tensor(x) for x in self._div[m])}
        for m in norm_keys:
            if m in norm_t:
                flat.append(torch.as_tensor(self._grad_norm[m], dtype=torch.float64).reshape(1).cpu())
        for m in div_keys:
            if m in div_t:
                num, den = self._div[m]
                flat.append(torch.as_tensor(num, dtype=torch.float64).reshape(1).cpu())
                flat.append(torch.as_tensor(den, dtype=torch.float64).reshape(1).cpu())
        vals = torch.cat(flat).tolist() if flat else []
        pos = 0
        modules: dict[str, dict[str, TensorStats]] = {}
        for k in keys:
            formats, scalings, current, _, s = self._pending[k]
            n = s.numel()
            a, sums = vals[pos], vals[pos + 1 : pos + 1 + n]
            pos += 1 + n
            modules.setdefault(k[0], {})[k[1]] = stats_from_sums(formats, scalings, current, a, sums)
        grad_norm = {}
        for m in norm_keys:
            if m in norm_t:
                self._grad_norm[m] = vals[pos]
                pos += 1
            grad_norm[m] = float(self._grad_norm[m])
        diversity: dict[str, float] = {}
        tot_num = tot_den = 0.0
        for m in div_keys:
            if m in div_t:
                self._div[m] = (vals[pos], vals[pos + 1])
                pos += 2
            num, den = (float(x) for x in self._div[m])
            self._div[m] = (num, den)
            tot_num += num
            tot_den += den
            if den > 0:
                diversity[m] = num / den
        self._pending.clear()
        shadow, self._shadow = self._shadow, {}
        loss_nonfinite = latest is not None and not math.isfinite(latest)
        return Snapshot(
            step=int(step),
            epoch=int(epoch),
            plan=plan,
            loss=latest,
            loss_ema=ema_before,
            loss_history=tuple(self.loss_history),
            epoch_losses=tuple(self.epoch_losses),
            nonfinite=bool(nonfinite) or loss_nonfinite,
            overflowed=tuple(overflowed),
            nonfinite_cause=nonfinite_cause or ("loss" if loss_nonfinite else ("gradients" if nonfinite else "")),
            modules=modules,
            grad_norm=grad_norm,
            grad_diversity=diversity,
            model_grad_diversity=(tot_num / tot_den) if tot_den > 0 else None,
            shadow=shadow,
        )

    # --- loss bookkeeping --------------------------------------------------------------
    def _fold_losses(self) -> tuple[float | None, float | None]:
        """Move pending losses into the trend; returns (EMA before the latest loss, latest loss)."""
        if not self._pending_losses:
            return self.loss_ema, None
        tensors = [v for v in self._pending_losses if torch.is_tensor(v)]
        if tensors:
            floats = iter(torch.stack([t.cpu() for t in tensors]).tolist())
            values = [next(floats) if torch.is_tensor(v) else v for v in self._pending_losses]
        else:
            values = list(self._pending_losses)
        self._pending_losses = []
        # what the trend was before these losses, so a step that is undone can be taken out (discard_last_loss)
        self._before_fold = (self.loss_ema, self.loss_count, list(self.loss_history), self.last_loss,
                             self._epoch_sum, self._epoch_count)
        ema_before = self.loss_ema
        for v in values:
            ema_before = self.loss_ema
            self.last_loss = v
            if not math.isfinite(v):
                continue  # a nonfinite loss is an incident, not part of the trend
            b = self.ema_beta
            self.loss_ema = v if self.loss_ema is None else b * self.loss_ema + (1 - b) * v
            self.loss_count += 1
            self.loss_history.append(v)
            self._epoch_sum += v
            self._epoch_count += 1
        del self.loss_history[: -self.loss_window]
        return ema_before, values[-1]

    def _close_epoch(self) -> None:
        if self._epoch_count:
            self.epoch_losses.append(self._epoch_sum / self._epoch_count)
        self._epoch_sum = 0.0
        self._epoch_count = 0

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Loss trend, epoch losses and the gradient diversity windows (tensors only for the windows)."""
        self._fold_losses()
        return {
            "loss_ema": self.loss_ema,
            "loss_count": self.loss_count,
            "loss_history": list(self.loss_history),
            "last_loss": self.last_loss,
            "epoch_losses": list(self.epoch_losses),
            "epoch_sum": self._epoch_sum,
            "epoch_count": self._epoch_count,
            "grad_norm": {m: float(v) for m, v in self._grad_norm.items()},
            "div_window": {
                m: {"sum": self._gsum[m].cpu().clone(), "sq": float(self._gsq[m]), "count": self._gcount[m]}
                for m in self._gsum
            },
            "div_last": {m: [float(a), float(b)] for m, (a, b) in self._div.items()},
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        try:
            self.loss_ema = d["loss_ema"]
            self.loss_count = int(d["loss_count"])
            self.loss_history = [float(v) for v in d["loss_history"]]
            self.last_loss = d["last_loss"]
            self.epoch_losses = [float(v) for v in d["epoch_losses"]]
            self._epoch_sum = float(d["epoch_sum"])
            self._epoch_count = int(d["epoch_count"])
            self._grad_norm = {m: float(v) for m, v in d["grad_norm"].items()}
            self._gsum = {m: w["sum"].to(torch.float32).clone() for m, w in d["div_window"].items()}
            self._gsq = {m: torch.tensor(float(w["sq"]), dtype=torch.float64) for m, w in d["div_window"].items()}
            self._gcount = {m: int(w["count"]) for m, w in d["div_window"].items()}
            self._div = {m: (float(a), float(b)) for m, (a, b) in d["div_last"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(
                f"health monitor state is missing or has a malformed entry ({e!r}); "
                "pass the dict written by HealthMonitor.state_dict()"
            ) from None
        self._pending.clear()
        self._samples.clear()
        self._pending_losses = []
