"""The rollback: the master weights and optimizer state from before the last optimizer step, for the guard.

When the guard sees a loss spike after a step it asks for that step to be
undone; this part keeps what is needed to do so, in buffers reused from
step to step (one fused copy each), and saves it with the controller's
state so a spike on the first step after a resume can still be rolled back.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from adaprec.distributed import local
from adaprec.errors import CheckpointError

__all__ = ["Rollback"]


class Rollback:
    """Copies of ``params`` and ``optimizer``'s state, taken by :meth:`save`, put back by :meth:`restore`.

    ``world_size``/``sharded``: FSDP2 shards of one world size cannot be put back under another.
    """

    def __init__(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer, world_size: int = 1,
                 sharded: bool = False) -> None:
        self.params = list(params)
        self.optimizer = optimizer
        self.world_size, self.sharded = world_size, sharded
        self._copy: tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, str]]] | None = None

    def _state_tensors(self) -> tuple[list[tuple[int, str]], list[torch.Tensor]]:
        keys, tensors = [], []
        for i, p in enumerate(self.params):
            for k, v in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(v):
                    keys.append((i, k))
                    tensors.append(local(v))
        return keys, tensors

    def _weights(self) -> list[torch.Tensor]:
        return [local(p.detach()) for p in self.params]

    def save(self) -> None:
        """Copy the weights and optimizer state now (into the buffers of the last copy when they fit)."""
        params = self._weights()
        keys, state = self._state_tensors()
        if self._copy is None or self._copy[2] != keys:
            self._copy = ([p.clone() for p in params], [v.detach().clone() for v in state], keys)
        else:
            torch._foreach_copy_(self._copy[0], params)
            if state:
                torch._foreach_copy_(self._copy[1], state)

    def nbytes(self) -> int:
        """Bytes the copy holds (0 before the first :meth:`save`)."""
        if self._copy is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self._copy[0], *self._copy[1]))

    def restore(self) -> bool:
        """Put back the weights and optimizer state of the last :meth:`save`; False when there is none."""
        if self._copy is None:
            return False
        weights, state, keys = self._copy
        with torch.no_grad():
            torch._foreach_copy_(self._weights(), weights)
            now_keys, now = self._state_tensors()
            if now_keys == keys:
                if state:
                    torch._foreach_copy_(now, state)
            else:  # the state was created after the copy (first step): drop it, as it was
                saved = {i for i, _ in keys}
                for i, p in enumerate(self.params):
                    if i not in saved:
                        self.optimizer.state.pop(p, None)
        return True

    def state_dict(self) -> dict[str, Any] | None:
        if self._copy is None:
            return None
        weights, state, keys = self._copy
        return {
            "world_size": self.world_size,
            "sharded": self.sharded,
            "weights": [t.clone() for t in weights],
            "state": [t.clone() for t in state],
            "keys": [[i, k] for i, k in keys],
        }

    def load_state_dict(self, saved: Mapping[str, Any] | None) -> None:
        """Take a saved copy (None: none). Raises CheckpointError when it does not fit; changes nothing then."""
        self._copy = self._fit(saved)

    def _fit(self, saved: Mapping[str, Any] | None) -> tuple[list, list, list] | None:
        if saved is None:
            return None
        if (saved.get("sharded") or self.sharded) and int(saved.get("world_size", 1)) != self.world_size:
            # FSDP2 shards of another world size: this copy cannot be put back here (it only serves a guard
            # rollback of the very next step; that step can still be skipped)
            warnings.warn(
                f"adaprec: the rollback copy in this state holds FSDP shards of {saved.get('world_size', 1)} ranks, "
                f"this run has {self.world_size}: it is dropped (a guard incident on the next step is skipped, not "
                "rolled back)",
                stacklevel=4,
            )
            return None
        try:
            here = self._weights()
            weights = [w.to(p.device, p.dtype) for w, p in zip(saved["weights"], here, strict=True)]
            bad = [i for i, (w, p) in enumerate(zip(weights, here, strict=True)) if w.shape != p.shape]
            if bad:
                raise ValueError(f"parameter {bad[0]} has shape {tuple(here[bad[0]].shape)}, the saved copy "
                                 f"{tuple(weights[bad[0]].shape)}")
            keys = [(int(i), str(k)) for i, k in saved["keys"]]
            state = [v.to(self.params[i].device) for v, (i, _) in zip(saved["state"], keys, strict=True)]
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise CheckpointError(
                f"adaprec rollback copy does not fit this model and optimizer ({e}); "
                "load the state saved with the same model and optimizer"
            ) from None
        return weights, state, keys
