"""adaprec under torch.distributed: real 2-process gloo groups on CPU, bounded in time.

One decision for all ranks (with deliberately different data per rank; without the
reduction the plans diverge), the plan and site checks, DDP and FSDP2 training to the
single-process quality, one ledger summed over ranks, checkpoints across world sizes,
and ``adaprec run --nproc 2``.

The ranks are started from a forkserver (fork is unsafe once OpenMP threads ran in
this process; spawn re-imports torch for every start), and every 2-rank scenario that
can share a process group runs in one start (the ``two_ranks`` fixture).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import adaprec
from adaprec.distributed import DistributedError

sys.path.insert(0, str(Path(__file__).parent))
from _train import FAST_INT8_BF16  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

ROOT = Path(__file__).resolve().parents[1]
EB = {"name": "error-budget", "warmup_steps": 4, "patience": 2}
STEPS = 40
SAVE_AT = 20
QUALITY_STEPS = 60


# --- starting ranks ------------------------------------------------------------------------------
def _entry(rank: int, fn, init: str, out: str, world_size: int, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args, nprocs: int = 2, timeout: float = 120.0) -> list:
    """Run ``fn(rank, *args)`` on ``nprocs`` gloo ranks; their return values, in rank order."""
    try:
        multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "adaprec"])
    except Exception:  # noqa: BLE001 - an older Python: the children import as they need
        pass
    out = tempfile.mkdtemp(prefix="adaprec-ranks-")
    init = os.path.join(out, "pg")
    ctx = torch.multiprocessing.start_processes(
        _entry, args=(fn, init, out, nprocs, args), nprocs=nprocs, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.5, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{nprocs} ranks did not finish within {timeout:.0f} s")
    try:
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(nprocs)]
    finally:
        shutil.rmtree(out, ignore_errors=True)


# --- models and data -----------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _batches(rank: int, steps: int):
    """Rank-dependent data: rank 1's first input feature has outliers 3000x the rest."""
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=g)
        if rank == 1:
            x[:, 0] *= 3000.0
        yield x, x[:, 1:5].argmax(1)


def _ddp_controller(distributed=None, **kwargs):
    model = _mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    ap = adaprec.AdaptivePrecision(ddp, opt, EB, hardware=FAST_INT8_BF16, monitor_every=2, seed=3,
                                   distributed=distributed, **kwargs)
    return model, ddp, opt, ap


def _train(ap, net, opt, batches, results=None):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        with ap.autocast():
            loss = nn.functional.cross_entropy(net(x), y)
        ap.backward(loss)
        r = ap.step()
        if results is not None:
            results.append(r)


def _events(ap) -> list[dict]:
    return [e.to_dict() for e in ap.timeline.events]


# --- what the ranks do ------------------------------------------------------------------------------------
def _reduced(rank: int, tmp: str) -> dict:
    """DDP, different data per rank, statistics reduced; rank 0 saves at SAVE_AT."""
    model, ddp, opt, ap = _ddp_controller()
    results: list = []
    batches = list(_batches(rank, STEPS))
    _train(ap, ddp, opt, batches[:SAVE_AT], results)
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ap": ap.state_dict()},
                   os.path.join(tmp, "ckpt.pt"))
        ap.timeline.to_json(os.path.join(tmp, "timeline_at_save.json"))
    _train(ap, ddp, opt, batches[SAVE_AT:], results)
    if rank == 0:
        ap.timeline.to_json(os.path.join(tmp, "timeline.json"))
    rows = ap.energy.steps()
    local = {k: sum(r["rank_local"][k] for r in rows) for k in ("macs", "bytes_moved", "modeled_j", "fp32_modeled_j")}
    local["wall_s"] = sum(r["rank_local"]["wall_s"] or 0.0 for r in rows[:-1])  # the last one's is not exchanged
    return {
        "events": _events(ap), "plan": ap.plan.to_dict(), "losses": [r.loss for r in results],
        "reasons": [r.reason for r in results], "summary": ap.energy.summary(), "local": local,
        "report": ap.report(), "kinds": list(ap.engine.kinds), "collectives": ap.reducer.sync.ex.calls,
    }


def _unreduced(rank: int) -> dict:
    """The same run with distributed=False: every rank decides from its own statistics."""
    _, ddp, opt, ap = _ddp_controller(distributed=False)
    _train(ap, ddp, opt, _batches(rank, STEPS))
    return {"events": _events(ap), "plan": ap.plan.to_dict()}


def _diverged(rank: int) -> str:
    """Rank 1's policy takes another decision at step 6: the next step's plan check must stop both ranks."""
    _, ddp, opt, ap = _ddp_controller()
    decide = ap.policy.decide

    def odd(snapshot, step):
        plan = decide(snapshot, step)
        return plan.with_role("2", "weight", "fp32") if rank == 1 and step == 6 else plan

    ap.policy.decide = odd
    try:
        _train(ap, ddp, opt, _batches(rank, 12))
    except DistributedError as e:
        return str(e)
    return "no error"


def _one_rank_nan(rank: int) -> dict:
    """Rank 1's input holds an inf at step 8: every rank skips that step, for the same reason."""
    _, ddp, opt, ap = _ddp_controller()
    batches = list(_batches(rank, 12))
    if rank == 1:
        batches[8][0][0, 3] = float("inf")
    results: list = []
    _train(ap, ddp, opt, batches, results)
    return {"reasons": [r.reason for r in results], "stepped": [r.stepped for r in results],
            "overflowed": [r.overflowed for r in results], "events": _events(ap)}


def _other_model(rank: int) -> str:
    """Ranks with different models (rank 1 has one more layer): refused at the first step."""
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)] + ([nn.Linear(4, 4)] if rank == 1 else [])
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ap = adaprec.AdaptivePrecision(model, opt, "fp32", hardware=FAST_INT8_BF16)
    try:
        _train(ap, model, opt, [(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))])
    except DistributedError as e:
        return str(e)
    return "no error"


def _digit_batches(task) -> list:
    """QUALITY_STEPS whole batches of digits-cnn, epoch after epoch (the same for every world size)."""
    out: list = []
    epoch = 0
    while len(out) < QUALITY_STEPS:
        out += list(task.train_loader(epoch))[: QUALITY_STEPS - len(out)]
        epoch += 1
    return out


def _digits(rank: int, kind: str) -> dict:
    """digits-cnn under DDP or FSDP2: each rank trains its half of every batch."""
    from adaprec.experiments.tasks import get_task

    task = get_task("digits-cnn")
    model = task.make_model(0)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in (model.conv1, model.conv2, model.fc):
            fully_shard(m)
        fully_shard(model)
        net = model
    else:
        net = nn.parallel.DistributedDataParallel(model)
    opt = task.make_optimizer(model)
    ap = adaprec.AdaptivePrecision(net, opt, EB, hardware=FAST_INT8_BF16, monitor_every=5, seed=0,
                                   total_steps=QUALITY_STEPS)
    batches = [(x.tensor_split(2)[rank], y.tensor_split(2)[rank]) for x, y in _digit_batches(task)]
    results: list = []
    _train(ap, net, opt, batches, results)
    with ap.not_counted():
        metrics = task.evaluate(model)  # FSDP2: every rank runs the (collective) forward
    s = ap.energy.summary()
    return {"metrics": metrics, "events": _events(ap), "plan": ap.plan.to_dict(), "kinds": list(ap.engine.kinds),
            "modules": sorted(n for n, m in s["modules"].items() if m.get("macs")), "stepped": sum(r.stepped for r in results),
            "grad_type": type(next(model.parameters()).grad).__name__}


def _scenarios(rank: int, tmp: str) -> dict:
    return {
        "reduced": _reduced(rank, tmp),
        "unreduced": _unreduced(rank),
        "diverged": _diverged(rank),
        "nan": _one_rank_nan(rank),
        "other_model": _other_model(rank),
        "ddp": _digits(rank, "ddp"),
        "fsdp": _digits(rank, "fsdp"),
    }


def _resume(rank: int, tmp: str) -> dict:
    """Load rank 0's checkpoint on both ranks and continue: must equal the uninterrupted run."""
    model, ddp, opt, ap = _ddp_controller()
    state = torch.load(os.path.join(tmp, "ckpt.pt"), weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    ap.load_state_dict(state["ap"])
    results: list = []
    _train(ap, ddp, opt, list(_batches(rank, STEPS))[SAVE_AT:], results)
    return {"events": _events(ap), "plan": ap.plan.to_dict(), "losses": [r.loss for r in results]}


# --- the tests ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ranks"))
    t0 = time.perf_counter()
    res = run_ranks(_scenarios, tmp)
    return {"ranks": res, "tmp": tmp, "seconds": time.perf_counter() - t0}


def test_one_decision_for_all_ranks_with_different_data(two_ranks):
    r0, r1 = (r["reduced"] for r in two_ranks["ranks"])
    assert r0["events"], "the policy changed no format: the test shows nothing"
    assert r0["events"] == r1["events"]
    assert r0["plan"] == r1["plan"]
    assert r0["losses"] == r1["losses"]  # the guard reads the mean loss over ranks, on every rank
    assert r0["kinds"] == r1["kinds"] == ["0", "2", "4"]  # names without DDP's "module." prefix
    assert all(not e["module"].startswith("module.") for e in r0["events"])
    # one collective per step (and one more the first time the sampled part grows), no per-tensor ones
    assert STEPS <= r0["collectives"] <= STEPS + 3


def test_without_the_reduction_the_ranks_diverge(two_ranks):
    u0, u1 = (r["unreduced"] for r in two_ranks["ranks"])
    assert u0["events"] != u1["events"]
    assert u0["plan"] != u1["plan"]


def test_a_diverging_plan_stops_every_rank_naming_the_module(two_ranks):
    for r in two_ranks["ranks"]:
        msg = r["diverged"]
        assert "different precision plans" in msg and "step 7" in msg
        assert "modules that differ: 2" in msg


def test_inf_on_one_rank_skips_the_step_on_every_rank(two_ranks):
    n0, n1 = (r["nan"] for r in two_ranks["ranks"])
    assert n0 == n1
    assert n0["stepped"].count(False) == 1 and not n0["stepped"][8]
    assert "inf/NaN" in n0["reasons"][8]


def test_ranks_with_different_models_are_refused_at_the_first_step(two_ranks):
    for r in two_ranks["ranks"]:
        msg = r["other_model"]
        assert "discovered different modules" in msg and "only on some ranks: 3" in msg


def _single_process_digits() -> dict:
    from adaprec.experiments.tasks import get_task

    task = get_task("digits-cnn")
    model = task.make_model(0)
    opt = task.make_optimizer(model)
    ap = adaprec.AdaptivePrecision(model, opt, EB, hardware=FAST_INT8_BF16, monitor_every=5, seed=0,
                                   total_steps=QUALITY_STEPS)
    _train(ap, model, opt, _digit_batches(task))
    ap.close()
    return task.evaluate(model)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_ddp_and_fsdp2_train_to_single_process_quality(two_ranks, kind):
    d0, d1 = (r[kind] for r in two_ranks["ranks"])
    assert d0["events"] == d1["events"] and d0["plan"] == d1["plan"]
    assert d0["events"], "no precision change: the run exercised no decision"
    assert d0["kinds"] == ["conv1", "conv2", "fc"] and d0["modules"] == ["conv1", "conv2", "fc"]
    assert d0["stepped"] >= QUALITY_STEPS - 2
    if kind == "fsdp":
        assert d0["grad_type"] == "DTensor"  # the gradients stayed sharded: adaprec worked on the shards
    single = _single_process_digits()
    assert d0["metrics"]["accuracy"] == d1["metrics"]["accuracy"]
    assert d0["metrics"]["accuracy"] >= single["accuracy"] - 0.03, (d0["metrics"], single)
    assert d0["metrics"]["accuracy"] > 0.85


def test_ledger_totals_are_the_sum_of_the_ranks(two_ranks):
    r0, r1 = (r["reduced"] for r in two_ranks["ranks"])
    s0, s1 = r0["summary"], r1["summary"]
    assert s0["world_size"] == 2 and "world size: 2" in r0["report"]
    for k in ("macs", "bytes_moved", "modeled_j", "fp32_modeled_j"):
        assert s0[k] == pytest.approx(r0["local"][k] + r1["local"][k], rel=1e-12), k
        assert s0[k] == pytest.approx(s1[k], rel=1e-12)
        assert [p[k] for p in s0["per_rank"]] == pytest.approx([r0["local"][k], r1["local"][k]], rel=1e-12)
    assert s0["macs"] == sum(s0["macs_by_format"].values())
    # wall time: summed over ranks for every step whose times were exchanged (all but the last)
    assert sum(p["wall_s"] for p in s0["per_rank"]) == pytest.approx(r0["local"]["wall_s"] + r1["local"]["wall_s"])
    assert s0["wall_s"] > r0["local"]["wall_s"]


def test_save_under_two_ranks_resume_under_two_is_bit_exact(two_ranks):
    resumed = run_ranks(_resume, two_ranks["tmp"])
    r0 = two_ranks["ranks"][0]["reduced"]
    for r in resumed:
        assert r["losses"] == r0["losses"][SAVE_AT:]
        assert r["events"] == r0["events"] and r["plan"] == r0["plan"]


def test_save_under_two_ranks_resume_and_replay_under_one(two_ranks):
    tmp = Path(two_ranks["tmp"])
    state = torch.load(tmp / "ckpt.pt", weights_only=True)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ap = adaprec.AdaptivePrecision(model, opt, EB, hardware=FAST_INT8_BF16, monitor_every=2, seed=3)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    ap.load_state_dict(state["ap"])
    assert ap.timeline.to_dict() == json.loads((tmp / "timeline_at_save.json").read_text())
    assert ap.step_count == SAVE_AT and ap.energy.summary()["world_size"] == 1
    results: list = []
    _train(ap, model, opt, list(_batches(0, SAVE_AT + 5))[SAVE_AT:], results)
    assert all(r.stepped for r in results) and all(torch.isfinite(torch.tensor(r.loss)) for r in results)
    ap.close()
    # a timeline recorded on 2 DDP ranks replays on the bare model (names without "module.")
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ap = adaprec.AdaptivePrecision(model, opt, f"replay:{tmp / 'timeline.json'}", hardware=FAST_INT8_BF16,
                                   guard=False)
    _train(ap, model, opt, _batches(0, STEPS))
    assert ap.plan.to_dict() == two_ranks["ranks"][0]["reduced"]["plan"]
    ap.close()


def test_adaprec_run_nproc_2_writes_one_store_and_one_report(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("task: digits-cnn\npolicies: [error-budget]\nseeds: 1\nsteps: 12\neval_every: 6\n"
                   "monitor_every: 3\n")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONFAULTHANDLER": "1"}  # a rank that aborts shows where
    p = subprocess.run([sys.executable, "-m", "adaprec.cli", "run", str(cfg), "--out", str(out), "--nproc", "2",
                        "--quiet"], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("report: ") == 1  # rank 0 alone prints
    files = sorted(f.name for f in out.iterdir())
    assert files.count("runs.sqlite") == 1 and "report.html" in files and "report.md" in files
    assert not [f for f in out.rglob("*.tmp")]  # atomic writes left nothing half-written
    from adaprec.experiments.store import ResultStore

    store = ResultStore(out)
    try:
        runs = store.runs()
        summaries = [store.summary(r["run_id"]) for r in runs]
        energy = store.rows("energy", runs[0]["run_id"])
    finally:
        store.close()
    assert sorted(r["status"] for r in runs) == ["finished", "finished"]  # fp32 baseline and error-budget, once
    assert all(s["world_size"] == 2 and len(s["per_rank"]) == 2 for s in summaries)
    assert len(energy) == 12  # one row per step, not one per rank
