"""torch.distributed support: one precision decision on every rank, DDP and FSDP2 models, one ledger.

Under an initialised process group of two or more ranks, :class:`AdaptivePrecision
<adaprec.AdaptivePrecision>` exchanges, once per step, everything its decision reads
that differs between ranks, in **one** collective (an ``all_gather`` of one float64
vector, :class:`RankSync`):

- every step, a fixed header: the hash of the engine's site list and of the plan the
  step ran under (so ranks that ever disagree stop with a :class:`DistributedError`
  naming the modules), the local loss, the inf/NaN flag of the local gradients, the
  number of cast faults, and the step's energy-ledger totals (MACs, bytes, modeled
  joules, MACs per format) and the previous step's wall time;
- on sampled steps, after the header, the health monitor's pending sums (amax takes
  the max over ranks, SQNR/overflow/underflow sums are added, so the figures are those
  of all ranks' samples pooled), the gradient norms and diversity sums (added over
  shards under FSDP2, the max of identical values under DDP) and shadow-audit sums.

Every rank then reduces the same gathered matrix in the same order, so every rank
builds the same snapshot, bit for bit, and its (pure) policy takes the same decision.
Only on a step where some rank saw inf/NaN does a second, small exchange name the
modules (``all_gather_object``).

The vector's length must be the same on every rank: the header is fixed, and the
sampled part is padded to a capacity agreed from earlier exchanges (it grows, with one
extra exchange, the first time a longer one is needed). This holds when every rank
runs the same model under the same plan; a model whose modules run on some ranks and
not others (data-dependent routing) is refused with a :class:`DistributedError`.

Models: the engine names sites inside a :class:`~torch.nn.parallel.DistributedDataParallel`
(or ``torch.compile``) wrapper (:func:`adaprec.engine.sites.unwrap`), so plans, timelines
and reports name the user's modules (``fc1``, not ``module.fc1``) and a timeline
recorded on 2 ranks replays on 1. A model sharded with
:func:`torch.distributed.fsdp.fully_shard` keeps DTensor parameters; adaprec works on
the local shards (:func:`local`) and teaches the engine which unsharded parameter
belongs to which module (:func:`alias_fsdp_params`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaprec.errors import AdaprecError

__all__ = [
    "DistributedError",
    "World",
    "world",
    "fsdp_modules",
    "is_sharded",
    "local",
    "alias_fsdp_params",
    "stable_hash",
    "Packer",
    "RankSync",
    "StepExchange",
    "rank_zero",
    "launch_backend",
]

# Float64 holds integers exactly up to 2**53: hashes are cut to 48 bits so they travel in the vector.
_HASH_BITS = 48
_MAGIC = 12.0  # first element of every header: version of the layout below


class DistributedError(AdaprecError, RuntimeError):
    """Ranks that disagree (plans, discovered modules, statistics layout), or a set-up adaprec cannot drive."""


# --- the process group ---------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """The initialised default process group: this rank, the number of ranks, where collectives run."""

    rank: int
    size: int
    backend: str
    device: torch.device


def world(group: Any = None, device: torch.device | str | None = None) -> World | None:
    """The process group adaprec reduces over, or None when torch.distributed is not initialised.

    ``device``: where the model lives; the exchanged vector goes there when the
    backend has NCCL and the model is on a GPU, else it stays on the CPU (gloo).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = str(dist.get_backend(group))
    where = torch.device("cpu")
    dev = torch.device(device) if device is not None else None
    if "nccl" in backend.lower() and dev is not None and dev.type == "cuda":
        where = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    elif backend.lower() == "nccl" and torch.cuda.is_available():  # NCCL alone cannot move CPU tensors
        where = torch.device("cuda", torch.cuda.current_device())
    return World(dist.get_rank(group), dist.get_world_size(group), backend, where)


def rank_zero() -> bool:
    """True on rank 0, and in a process that is not part of a process group (nor launched as a rank)."""
    w = world()
    if w is not None:
        return w.rank == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def launch_backend() -> str:
    """The backend a launched rank initialises: gloo for CPU tensors, and NCCL for CUDA ones where GPUs are."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"


# --- models ----------------------------------------------------------------------------------
def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that :func:`torch.distributed.fsdp.fully_shard` was applied to."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return None
    return DTensor


_DTENSOR = _dtensor_type()


def is_sharded(t: Any) -> bool:
    """A DTensor (an FSDP2 parameter, gradient or optimizer state): each rank holds a shard."""
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def local(t: Any) -> Any:
    """This rank's shard of a DTensor (the same storage: in-place ops change the DTensor); others as they are."""
    if _DTENSOR is not None and isinstance(t, _DTENSOR):
        return t._local_tensor  # type: ignore[attr-defined]
    return t


def _param_groups(module: nn.Module) -> list[Any]:
    state = module._get_fsdp_state()  # type: ignore[attr-defined,operator]
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch < 2.10 kept one group per module
        one = getattr(state, "_fsdp_param_group", None)
        groups = [one] if one is not None else []
    return [g for g in groups if g is not None]


def alias_fsdp_params(owners: dict[int, list[str]], names: Mapping[int, str], model: nn.Module) -> int:
    """Teach the engine's site map which FSDP2 *unsharded* parameter belongs to which module.

    Under FSDP2 a module's forward sees the all-gathered parameter, another
    object than the sharded DTensor parameter the module holds between steps;
    FSDP2 keeps that object for the whole run. Each FSDP module is unsharded and
    resharded once here (a collective: every rank must build its AdaptivePrecision
    at the same point, as they do) so the objects exist, and their ids are mapped
    to the owner names of the sharded ones. Returns how many were aliased.
    """
    n = 0
    for m in fsdp_modules(model):
        m.unshard()  # type: ignore[attr-defined,operator]
        try:
            for group in _param_groups(m):
                for fp in getattr(group, "fsdp_params", ()):
                    unsharded = getattr(fp, "_unsharded_param", None)
                    sharded = getattr(fp, "sharded_param", None)
                    if unsharded is None or sharded is None:
                        continue
                    who = list(owners.get(id(sharded), ()))
                    if not who:
                        infos = [getattr(fp, "_module_info", None), *getattr(fp, "_shared_module_infos", ())]
                        who = [names[id(i.module)] for i in infos if i is not None and id(i.module) in names]
                    if who:
                        owners[id(unsharded)] = who
                        n += 1
        finally:
            m.reshard()  # type: ignore[attr-defined,operator]
    return n


# --- hashing -----------------------------------------------------------------------------------
def stable_hash(obj: Any) -> int:
    """A 48-bit hash of ``obj`` (JSON-able) that is the same in every process (Python's ``hash`` is salted)."""
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> (64 - _HASH_BITS)


# --- packing statistics into one vector ----------------------------------------------------------
class Packer:
    """Named float64 segments, each reduced over ranks by ``"sum"`` or ``"max"``, sent as one vector."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.parts: list[torch.Tensor] = []
        self.ops: list[str] = []
        self.sizes: list[int] = []
        self._n = 0

    def add(self, key: str, values: torch.Tensor | float | Sequence[float], op: str = "sum") -> None:
        if op not in ("sum", "max"):
            raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
        t = values if torch.is_tensor(values) else torch.tensor(values, dtype=torch.float64)
        t = t.detach().reshape(-1)
        self.keys.append(key)
        self.parts.append(t)
        self.ops.append(op)
        self.sizes.append(t.numel())
        self._n += self.sizes[-1]

    def __len__(self) -> int:
        return self._n

    def layout(self) -> tuple[tuple[str, int, str], ...]:
        return tuple(zip(self.keys, self.sizes, self.ops, strict=True))

    def layout_hash(self) -> int:
        return stable_hash("\n".join(f"{k}|{n}|{o}" for k, n, o in self.layout()))

    def vector(self, device: torch.device) -> torch.Tensor:
        if not self.parts:
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.cat(self.parts).to(device=device, dtype=torch.float64)

    def max_mask(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(
            [o == "max" for o, n in zip(self.ops, self.sizes, strict=True) for _ in range(n)], dtype=torch.bool,
            device=device,
        )

    def split(self, reduced: Sequence[float]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        pos = 0
        for k, n in zip(self.keys, self.sizes, strict=True):
            out[k] = list(reduced[pos : pos + n])
            pos += n
        return out


# --- the one collective ---------------------------------------------------------------------------
class StepExchange:
    """All-gathers one float64 vector per call; keeps the padded capacity of the sampled part agreed."""

    def __init__(self, w: World, group: Any = None) -> None:
        self.world = w
        self.group = group
        self.capacity = 0
        self.calls = 0  # collectives issued (tests and the bench count them)

    def gather(self, vec: torch.Tensor) -> torch.Tensor:
        """``[world, len(vec)]``: every rank's vector, in rank order (one collective)."""
        import torch.distributed as dist

        vec = vec.to(self.world.device, torch.float64).contiguous()
        out = torch.empty(self.world.size * vec.numel(), dtype=torch.float64, device=vec.device)
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(out, vec, group=self.group)
        self.calls += 1
        return out.reshape(self.world.size, vec.numel())

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (pickled; once, at set-up)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        self.calls += 1
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (pickled; for the rare steps that name modules)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world.size
        dist.all_gather_object(out, obj, group=self.group)
        self.calls += 1
        return out


# header slots (after it: the energy figures, then the sampled payload)
_H_MAGIC, _H_SITES, _H_PLAN, _H_SAMPLED, _H_NEED, _H_LAYOUT, _H_NONFINITE, _H_LOSS, _H_FAULTS, _H_WALL = range(10)
_HEAD = 10


@dataclass
class Reduced:
    """What the exchange of one step gave every rank (identical on all of them)."""

    loss: float
    nonfinite: bool  # some rank's gradients held inf/NaN
    faults: int  # cast faults summed over ranks
    payload: dict[str, list[float]]
    energy: list[list[float]]  # per rank: the ledger's world figures of this step
    prev_wall: list[float]  # per rank: wall time of the previous step (nan: not timed)


class RankSync:
    """The controller's side of the exchange: builds the header, gathers, checks agreement, reduces."""

    def __init__(self, w: World, group: Any = None) -> None:
        self.world = w
        self.ex = StepExchange(w, group)
        self._plan_hash: tuple[Any, int] | None = None
        self._site_hash: tuple[tuple, int] | None = None
        self._mask: tuple[tuple, torch.Tensor] | None = None
        self._layout: tuple[tuple, int] | None = None

    # --- hashes (cached: plans and site lists change rarely) -------------------------------
    def plan_hash(self, plan: Any) -> int:
        hit = self._plan_hash
        if hit is not None and hit[0] is plan:
            return hit[1]
        h = stable_hash(plan.to_dict())
        self._plan_hash = (plan, h)
        return h

    def site_hash(self, sites: Mapping[str, Any]) -> int:
        key = tuple((n, tuple(sorted(s.kinds)), bool(s.covered)) for n, s in sites.items())
        hit = self._site_hash
        if hit is not None and hit[0] == key:
            return hit[1]
        h = stable_hash([list(k) for k in key])
        self._site_hash = (key, h)
        return h

    def _layout_hash(self, pay: Packer) -> int:
        key = pay.layout()
        hit = self._layout
        if hit is None or hit[0] != key:
            hit = self._layout = (key, pay.layout_hash())
        return hit[1]

    # --- one step ------------------------------------------------------------------------------
    def exchange(
        self,
        step: int,
        *,
        sites: Mapping[str, Any],
        plan: Any,
        sampled: bool,
        loss: float,
        nonfinite: bool,
        faults: int,
        energy: Sequence[float],
        prev_wall: float | None,
        payload: Packer | None,
    ) -> Reduced:
        """The step's one collective (two the first time the sampled part grows), then the checks."""
        w = self.world
        dev = w.device
        pay = payload if (payload is not None and sampled) else Packer()
        need = len(pay)
        head = torch.tensor(
            [_MAGIC, float(self.site_hash(sites)), float(self.plan_hash(plan)), float(bool(sampled)), float(need),
             float(self._layout_hash(pay)), float(bool(nonfinite)), float(loss), float(faults),
             math.nan if prev_wall is None else float(prev_wall), *map(float, energy)],
            dtype=torch.float64,
        )
        n_head = head.numel()
        body = pay.vector(dev)
        cap = self.ex.capacity if sampled else 0
        if sampled:
            fit = body[:cap] if need >= cap else torch.cat([body, torch.zeros(cap - need, dtype=torch.float64, device=dev)])
            vec = torch.cat([head.to(dev), fit])
        else:
            vec = head.to(dev)
        g = self.ex.gather(vec)
        # the header in plain floats: the checks and reductions below run in Python, in rank order, the
        # same on every rank (no per-element tensor ops: they cost more than the collective)
        heads = g[:, :n_head].cpu().tolist()
        self._check_agreement(step, heads, sites, plan)
        needs = [int(h[_H_NEED]) for h in heads]
        if sampled and max(needs) > cap:  # the sampled part grew: agree on a larger capacity, send it again
            self.ex.capacity = max(needs) + max(needs) // 4
            fit = torch.cat([body, torch.zeros(self.ex.capacity - need, dtype=torch.float64, device=dev)])
            bodies = self.ex.gather(fit)
        else:
            bodies = g[:, n_head:]
        if len(set(needs)) > 1 or len({h[_H_LAYOUT] for h in heads}) > 1:
            self._layout_error(step, pay)
        reduced: dict[str, list[float]] = {}
        if need:
            b = bodies[:, :need]
            vals = torch.where(self._max_mask(pay, b.device), b.amax(0), b.sum(0))
            reduced = pay.split(vals.cpu().tolist())
        return Reduced(
            loss=sum(h[_H_LOSS] for h in heads) / w.size,
            nonfinite=any(h[_H_NONFINITE] > 0 for h in heads),
            faults=int(sum(h[_H_FAULTS] for h in heads)),
            payload=reduced,
            energy=[h[_HEAD:] for h in heads],
            prev_wall=[h[_H_WALL] for h in heads],
        )

    def _max_mask(self, pay: Packer, device: torch.device) -> torch.Tensor:
        key = (pay.layout(), device)
        hit = self._mask
        if hit is None or hit[0] != key:
            hit = self._mask = (key, pay.max_mask(device))
        return hit[1]

    def union(self, items: Iterable[Any]) -> list[Any]:
        """Every rank's ``items`` together, sorted and without repeats (a second, rare exchange)."""
        out: set[Any] = set()
        for part in self.ex.gather_objects(sorted(set(items))):
            out.update(tuple(x) if isinstance(x, list) else x for x in part)
        return sorted(out)

    # --- agreement ---------------------------------------------------------------------------------
    def _check_agreement(self, step: int, heads: list[list[float]], sites: Mapping[str, Any], plan: Any) -> None:
        def differ(slot: int) -> bool:
            return any(h[slot] != heads[0][slot] for h in heads)

        if any(h[_H_MAGIC] != _MAGIC for h in heads):
            raise DistributedError(
                f"step {step}: the ranks run different adaprec versions (exchange layouts "
                f"{[h[_H_MAGIC] for h in heads]}); install the same adaprec on every rank"
            )
        if differ(_H_SITES):
            lists = self.ex.gather_objects([[n, sorted(s.kinds), bool(s.covered)] for n, s in sites.items()])
            raise DistributedError(_site_message(step, lists))
        if differ(_H_PLAN):
            plans = self.ex.gather_objects(plan.to_dict())
            raise DistributedError(_plan_message(step, plans))
        if differ(_H_SAMPLED):
            raise DistributedError(
                f"step {step}: the ranks disagree on whether to sample statistics "
                f"({[h[_H_SAMPLED] for h in heads]}); every rank needs the same monitor_every and policy"
            )

    def _layout_error(self, step: int, pay: Packer) -> None:
        layouts = self.ex.gather_objects(pay.layout())
        keys = [{k: (n, o) for k, n, o in lay} for lay in layouts]
        every = set(keys[0]).union(*keys[1:])
        odd = sorted(k for k in every if any(k not in ks or ks[k] != keys[0].get(k) for ks in keys))
        raise DistributedError(
            f"step {step}: the ranks measured different statistics ({', '.join(odd[:8])}"
            f"{' ...' if len(odd) > 8 else ''}): some module ran on some ranks and not on others. adaprec needs "
            "every rank to run the same modules each step (data-dependent routing that skips a module on one rank "
            "is not supported); keep such modules out with module_filter="
        )


def _site_message(step: int, lists: list[list[list[Any]]]) -> str:
    names = [[s[0] for s in lst] for lst in lists]
    odd = sorted({n for ns in names for n in ns if any(n not in other for other in names)})
    order = "" if odd else " (the same modules, found in a different order or with different op kinds)"
    return (
        f"step {step}: the ranks discovered different modules that run GEMMs{order}: "
        + "; ".join(f"rank {r}: {len(ns)} modules" for r, ns in enumerate(names))
        + (f"; only on some ranks: {', '.join(m or '<root>' for m in odd[:10])}" if odd else "")
        + ". Every rank must run the same model on batches of the same structure; call ap.prepare(x) on every "
        "rank with the same example batch"
    )


def _plan_message(step: int, plans: list[Mapping[str, Any]]) -> str:
    mods = [dict(p.get("modules", {})) for p in plans]
    names = sorted(set().union(*mods))
    odd = [n for n in names if any(m.get(n) != mods[0].get(n) for m in mods)]
    pins = [sorted(p.get("pinned", ())) for p in plans]
    extra = "" if all(p == pins[0] for p in pins) else f"; pinned modules differ: {pins}"
    return (
        f"step {step}: the ranks are running different precision plans; modules that differ: "
        f"{', '.join(m or '<root>' for m in odd) or '(none)'}{extra}. The policy decided differently on some "
        "rank: its statistics were not reduced (distributed=False), or the policy is not a pure function of "
        "its snapshot (randomness, wall-clock time, rank-local state)"
    )
