"""reduce_distributed under a real two-process gloo group: both ranks build the same snapshot."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaprec.monitor import HealthMonitor
from adaprec.plan import PrecisionPlan, TensorRecipe


def _worker(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        m = HealthMonitor(candidates=("fp8_e4m3", "fp4_e2m1"))
        x = torch.randn(500) * (rank + 1)
        m.observe_tensor("a", "weight", x, TensorRecipe("fp32"))
        m.observe_loss(float(rank + 1))
        assert m.reduce_distributed()
        snap = m.snapshot(0, 0, PrecisionPlan.uniform(["a"]))
        out[rank] = (snap.to_dict()["modules"], snap.loss)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_every_rank_sees_the_same_snapshot(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "pg"), out), nprocs=2, join=True)
        (mods0, loss0), (mods1, loss1) = out[0], out[1]
    assert mods0 == mods1
    assert loss0 == loss1 == 1.5
    assert mods0["a"]["weight"]["amax"] > 0
