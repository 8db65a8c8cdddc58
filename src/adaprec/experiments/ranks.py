"""Experiments on several ranks: ``adaprec run --nproc N``, or the runner under ``torchrun``.

The per-step collective that makes every rank decide the same lives in
:mod:`adaprec.distributed`; this module is the plumbing of a multi-rank
experiment: joining the process group, wrapping the model, slicing batches,
the store as ranks other than 0 see it, and launching the ranks.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adaprec.distributed import DistributedError, launch_backend, world

__all__ = ["launched_world_size", "RankRun", "NullStore", "launch"]


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it for each rank it starts (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


class RankRun:
    """How one process of a multi-rank experiment takes part: data-parallel training, rank 0 writes.

    Every rank trains the same model (wrapped in DistributedDataParallel) on its
    slice of each batch, so a step's global batch, the number of steps and the
    data order are those of a single-process run; adaprec reduces its statistics
    over the ranks, so every rank takes the same decisions. Rank 0 alone writes the
    result store, the checkpoints and the report (and evaluates).
    """

    def __init__(self, created: bool) -> None:
        w = world()
        assert w is not None
        self.rank, self.size, self.backend = w.rank, w.size, w.backend
        self._created = created

    @classmethod
    def from_env(cls) -> RankRun | None:
        """Join the process group torchrun describes (initialising it if needed); None when there is one rank."""
        if dist.is_available() and dist.is_initialized():
            return cls(created=False) if dist.get_world_size() > 1 else None
        if launched_world_size() <= 1:
            return None
        if not dist.is_available():
            raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run on one process")
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count())
        dist.init_process_group(launch_backend())
        return cls(created=True)

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model in DistributedDataParallel (parameters shared: the optimizer and checkpoints use ``model``)."""
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        ids = [dev.index] if dev.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, x: Any, y: Any) -> tuple[Any, Any]:
        """This rank's contiguous slice of a batch (the ranks' slices together are the whole batch)."""
        if not (torch.is_tensor(x) and torch.is_tensor(y)):
            raise DistributedError(
                f"adaprec run --nproc slices each batch between ranks and needs (tensor, tensor) batches; the task "
                f"yields ({type(x).__name__}, {type(y).__name__}). Run it on one process"
            )
        if len(x) < self.size:
            raise DistributedError(
                f"a batch of {len(x)} cannot be split between {self.size} ranks; use fewer ranks (--nproc) "
                "or a larger batch"
            )
        return x.tensor_split(self.size)[self.rank], y.tensor_split(self.size)[self.rank]

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, wait: bool = False) -> None:
        """Leave the process group (only if this object created it).

        ``wait``: first meet every rank at a barrier (after a run that ended well), and
        free what still holds the group (DDP reducers), so no rank tears its group down
        while another still uses it: a rank that did abort at exit, now and then
        ("terminate called without an active exception").
        """
        if self._created and dist.is_initialized():
            if wait:
                dist.barrier()
            gc.collect()
            dist.destroy_process_group()
            self._created = False


class NullStore:
    """The result store as ranks other than 0 see it: every write is rank 0's, so nothing happens here."""

    def __init__(self, finished: Iterable[str] = ()) -> None:
        self._finished = set(finished)

    def finished_runs(self) -> set[str]:
        return set(self._finished)

    def transaction(self) -> Any:
        return contextlib.nullcontext()

    def close(self) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``adaprec <argv>`` on ``nproc`` local ranks through ``torch.distributed.run``; the exit status.

    Each rank is ``python -m adaprec.cli <argv>`` with torchrun's RANK / WORLD_SIZE
    environment (``--standalone``: a rendezvous on this machine, on a free port).
    Returns 0, 2 when a rank stopped on a user error (it printed the one line),
    130 when interrupted, else 1.
    """
    # torchrun's launcher (elastic agents) is imported only when ranks are launched: it costs a second at start-up
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise DistributedError(f"--nproc must be >= 1, got {nproc}")
    # torchrun would set 1 thread per rank (and say so); share this machine's cores instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc_per_node={nproc}", "--module", "adaprec.cli", *argv]
    )
    try:
        run(args)
    except ChildFailedError as e:
        codes = {getattr(f, "exitcode", 1) for f in e.failures.values()}
        if 2 in codes:
            return 2
        if any(c in (130, -2) for c in codes):
            return 130
        return 1
    return 0
