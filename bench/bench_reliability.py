"""Reliability bench (issue 11, item 5): the fault matrix and the kill -9 soak of ``adaprec run``.

1. **Fault matrix.** Faults {NaN loss on two consecutive steps, inf in one
   layer's gradients on one step, the same on three consecutive steps, inf in
   an activation (forward hook), an overflow storm (one layer's activations
   x 1e30 for a few steps), a loss spike} x policies {fp32, bf16,
   fp8-hybrid (emulated), error-budget} on digits-cnn, each beside plain
   PyTorch + ``torch.amp.GradScaler`` on the same run (same seed, same data
   order, same faults). Recorded per cell: steps skipped, rollbacks, guard
   plan changes, final accuracy, weights finite, whether the run stopped
   with ``TrainingUnstableError``. The clean fp32 runs over the seeds give
   the seed noise the other cells are judged against.
2. **Soak.** ``adaprec run`` in a subprocess, killed with a real SIGKILL at
   random times N times, then resumed to the end; the store must equal an
   uninterrupted run's, row for row, measured wall-time columns aside.

Both write their tables into ``docs/reliability.md``. ``tests/test_reliability.py``
runs a subset of the same code (short runs, one or two kills).

    python bench/bench_reliability.py                 # full matrix (3 seeds) and a 20-kill soak
    python bench/bench_reliability.py --seeds 1 --kills 3 --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
import adaprec  # noqa: E402
from _markdown import write_section  # noqa: E402
from _train import fake_report  # noqa: E402
from adaprec.errors import TrainingUnstableError  # noqa: E402
from adaprec.experiments.tasks import get_task  # noqa: E402
from adaprec.hardware import cache as hardware_cache  # noqa: E402
from adaprec.hardware.probing import cache_key  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
TASK = "digits-cnn"
FAULT_STEP = 80  # past the guard's loss history, and error-budget has fc all int8 by then
POLICIES = ("fp32", "bf16", "fp8-hybrid", "error-budget")
GRADSCALER = "GradScaler"  # plain PyTorch fp32 + torch.amp.GradScaler("cpu")


# --- faults ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    """One fault, injected the same way into every run of a row.

    ``kind``: ``loss_nan`` (the loss becomes NaN: a bad batch), ``grad_inf``
    (the gradient of ``layer.weight`` is multiplied by inf), ``act_inf`` (one
    element of ``layer``'s output becomes +inf, by a forward hook),
    ``act_scale`` (``layer``'s output is multiplied by ``factor``: an
    overflow storm), ``loss_scale`` (the loss is multiplied by ``factor``: a
    spike). ``steps``: the 0-based training steps it hits.
    """

    name: str
    kind: str
    steps: tuple[int, ...]
    layer: str = ""
    factor: float = 1.0
    label: str = ""


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("none", "none", (), label="no fault"),
    Fault("nan-loss-x2", "loss_nan", (40, 41),
          label="NaN loss, steps 40-41 (a bad batch)"),
    Fault("inf-grad-x1", "grad_inf", (FAULT_STEP,), layer="fc",
          label="inf in fc's weight gradient, step 80"),
    Fault("inf-grad-x3", "grad_inf", (FAULT_STEP, FAULT_STEP + 1, FAULT_STEP + 2), layer="fc",
          label="inf in fc's weight gradient, steps 80-82"),
    Fault("inf-activation", "act_inf", (FAULT_STEP,), layer="conv2",
          label="one +inf in conv2's output (fc's input), step 80"),
    Fault("overflow-storm", "act_scale", tuple(range(FAULT_STEP, FAULT_STEP + 5)), layer="conv1", factor=1e30,
          label="conv1's output x 1e30, steps 80-84"),
    Fault("loss-spike", "loss_scale", (FAULT_STEP,), factor=1e3,
          label="loss x 1000, step 80"),
    # beyond the issue's list: where the guard's stop line is (max_retries=3 failures in a row in fp32)
    Fault("inf-grad-x5", "grad_inf", tuple(range(FAULT_STEP, FAULT_STEP + 5)), layer="fc",
          label="inf in fc's weight gradient, steps 80-84"),
)}
ISSUE_FAULTS = ("nan-loss-x2", "inf-grad-x1", "inf-grad-x3", "inf-activation", "overflow-storm", "loss-spike")


class Injector:
    """Applies one fault to a model: hooks for the layer faults, ``loss()`` for the loss faults."""

    def __init__(self, fault: Fault, model: torch.nn.Module) -> None:
        self.fault, self.step = fault, -1
        self.handles = []
        if fault.kind in ("grad_inf", "act_inf", "act_scale"):
            layer = dict(model.named_modules())[fault.layer]
            if fault.kind == "grad_inf":
                self.handles.append(layer.weight.register_hook(self._grad))
            else:
                self.handles.append(layer.register_forward_hook(self._act))

    def active(self) -> bool:
        return self.step in self.fault.steps

    def _grad(self, g: torch.Tensor) -> torch.Tensor:
        return g * math.inf if self.active() else g

    def _act(self, _module: torch.nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
        if not self.active() or not torch.is_grad_enabled():  # evaluation is never faulty
            return out
        if self.fault.kind == "act_scale":
            return out * self.fault.factor
        out = out.clone()
        out.view(-1)[0] = math.inf
        return out

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        if self.active() and self.fault.kind == "loss_nan":
            return loss * math.nan
        if self.active() and self.fault.kind == "loss_scale":
            return loss * self.fault.factor
        return loss

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# --- one run -----------------------------------------------------------------------------------
@dataclass
class Cell:
    """What one run under one fault did."""

    fault: str
    policy: str
    seed: int
    steps: int
    skipped: int = 0  # optimizer updates not taken (inf/NaN skips; a guard skip with no copy to restore)
    rollbacks: int = 0  # steps the guard rolled back (weights and optimizer state restored)
    plan_changes: int = 0  # steps at which the guard changed the plan
    accuracy: float = math.nan
    finite: bool = True  # every weight finite at the end
    state_finite: bool = True  # every optimizer state tensor finite at the end (Adam's moments)
    state_nonfinite: int = 0  # weights whose Adam second moment is inf/NaN at the end (they no longer move)
    stopped: str = ""  # "" or the TrainingUnstableError message
    stopped_at: int | None = None
    fault_reasons: list[str] = field(default_factory=list)  # what each faulty step said (StepResult.reason)
    narrow_on_fault: list[bool] = field(default_factory=list)  # whether some module was narrower than fp32 then
    activation_formats: list[dict[str, str]] = field(default_factory=list)  # per faulty step: module -> format
    weights_sum: float = math.nan  # sum of every weight (float64): equal sums, same trajectory
    wall_s: float = 0.0


_TASK = None


def _task():
    global _TASK
    if _TASK is None:
        _TASK = get_task(TASK)
    return _TASK


# The guard's loss-spike rollback needs a pre-step copy of weights and optimizer state, off by default (its memory);
# the matrix measures the guard with it (ROLLBACK) and, in its own column set, without (the default).
ROLLBACK = True


def _policy_kwargs(policy: str, rollback: bool | None = None) -> dict:
    kw = {"rollback": ROLLBACK if rollback is None else rollback}
    if policy == "fp8-hybrid":
        return {**kw, "backend": "emulate"}  # no fp8 units on this CPU: research mode, named as such
    return {**kw, "hardware": fake_report()}  # int8 and bf16 native (fixed, so results do not depend on the CPU)


def _batches(task, seed: int, steps: int) -> Iterable[tuple[int, bool, torch.Tensor, torch.Tensor]]:
    """(step, last of its epoch, x, y): the data order of tests/_train.py, the same for every run of a seed."""
    step, epoch = 0, 0
    while True:
        batches = list(task.train_loader(seed * 1000 + epoch))
        for i, (x, y) in enumerate(batches):
            yield step, i == len(batches) - 1, x, y
            step += 1
            if step == steps:
                return
        epoch += 1


def _finish(cell: Cell, model: torch.nn.Module, opt: torch.optim.Optimizer, t0: float) -> Cell:
    cell.wall_s = time.perf_counter() - t0
    cell.accuracy = _task().evaluate(model)["accuracy"]
    cell.finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    cell.weights_sum = sum(float(p.detach().double().sum()) for p in model.parameters())
    cell.state_finite = all(bool(torch.isfinite(v).all()) for st in opt.state.values() for v in st.values()
                            if torch.is_tensor(v) and v.is_floating_point())
    cell.state_nonfinite = sum(int((~torch.isfinite(st["exp_avg_sq"])).sum()) for st in opt.state.values()
                               if "exp_avg_sq" in st)
    return cell


def run_adaprec(policy: str, fault: Fault, steps: int, seed: int = 0) -> Cell:
    task = _task()
    model = task.make_model(seed)
    opt = task.make_optimizer(model)
    ap = adaprec.AdaptivePrecision(model, opt, policy, seed=seed, total_steps=steps,
                                   steps_per_epoch=task.steps_per_epoch, **_policy_kwargs(policy))
    inj = Injector(fault, model)
    cell = Cell(fault.name, policy, seed, steps)
    t0 = time.perf_counter()
    try:
        for step, epoch_end, x, y in _batches(task, seed, steps):
            inj.step = step
            plan = ap.plan
            narrow = not all(plan.get(m).is_fp32 for m in plan.modules)
            opt.zero_grad(set_to_none=True)
            with ap.autocast():
                loss = inj.loss(task.loss_fn(model(x), y))
            ap.backward(loss)
            try:
                res = ap.step()
            except TrainingUnstableError as e:
                cell.stopped, cell.stopped_at = str(e), step
                break
            cell.skipped += not res.stepped and not res.rolled_back
            cell.rollbacks += res.rolled_back
            if res.changes and getattr(ap.policy, "incident", None):
                cell.plan_changes += 1
            if step in fault.steps:
                cell.fault_reasons.append(res.reason)
                cell.narrow_on_fault.append(narrow)
                cell.activation_formats.append({m: plan.get(m).recipe("activation").format for m in plan.modules})
            if epoch_end:
                ap.end_epoch()
    finally:
        inj.remove()
        ap.close()
    return _finish(cell, model, opt, t0)


def run_gradscaler(fault: Fault, steps: int, seed: int = 0) -> Cell:
    """Plain fp32 PyTorch with ``torch.amp.GradScaler("cpu")``, as its docstring's loop (no autocast)."""
    task = _task()
    model = task.make_model(seed)
    opt = task.make_optimizer(model)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    inj = Injector(fault, model)
    cell = Cell(fault.name, GRADSCALER, seed, steps)
    t0 = time.perf_counter()
    for step, _, x, y in _batches(task, seed, steps):
        inj.step = step
        opt.zero_grad(set_to_none=True)
        loss = inj.loss(task.loss_fn(model(x), y))
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped = scaler.get_scale() < before  # the scale backs off exactly when inf/NaN made it skip
        cell.skipped += skipped
        if step in fault.steps:
            cell.fault_reasons.append("skipped (scale backed off)" if skipped else "stepped")
            cell.narrow_on_fault.append(False)
    inj.remove()
    return _finish(cell, model, opt, t0)


def run_cell(policy: str, fault: str | Fault, steps: int, seed: int = 0) -> Cell:
    f = FAULTS[fault] if isinstance(fault, str) else fault
    return run_gradscaler(f, steps, seed) if policy == GRADSCALER else run_adaprec(policy, f, steps, seed)


# --- the matrix ----------------------------------------------------------------------------------
def seed_noise(accuracies: Sequence[float], test_size: int = 360) -> float:
    """How far a final accuracy may sit below the baseline's mean and still count as reaching it:
    two standard deviations of the clean fp32 runs over seeds, and never less than one test image."""
    sd = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return max(2 * sd, 1.0 / test_size)


@dataclass
class Matrix:
    cells: list[Cell]
    baseline: list[float]  # clean fp32 accuracy per seed (plain PyTorch, GradScaler, no fault)
    noise: float
    seeds: tuple[int, ...]
    steps: int

    def of(self, fault: str, policy: str) -> list[Cell]:
        return [c for c in self.cells if c.fault == fault and c.policy == policy]

    def mean_acc(self, fault: str, policy: str) -> float:
        return statistics.mean(c.accuracy for c in self.of(fault, policy))

    @property
    def baseline_mean(self) -> float:
        """Clean fp32 over the matrix's own seeds: every cell is compared with the same seeds (paired)."""
        return statistics.mean(c.accuracy for c in self.of("none", GRADSCALER))

    def reaches(self, fault: str, policy: str) -> bool:
        return self.mean_acc(fault, policy) >= self.baseline_mean - self.noise


def run_matrix(faults: Sequence[str], policies: Sequence[str], seeds: Sequence[int], steps: int,
               noise_seeds: Sequence[int] | None = None, log: Callable[[str], None] = print) -> Matrix:
    noise_seeds = tuple(noise_seeds if noise_seeds is not None else seeds)
    cells: list[Cell] = []
    baseline = []
    for seed in noise_seeds:
        c = run_cell(GRADSCALER, "none", steps, seed)
        baseline.append(c.accuracy)
        if seed in seeds:
            cells.append(c)
    for fault in faults:
        for policy in (GRADSCALER, *policies):
            for seed in seeds:
                if fault == "none" and policy == GRADSCALER:
                    continue
                c = run_cell(policy, fault, steps, seed)
                cells.append(c)
                log(f"{fault:15s} {policy:12s} seed {seed}: skipped {c.skipped} rollbacks {c.rollbacks} "
                    f"guard changes {c.plan_changes} acc {c.accuracy:.4f} finite {c.finite}/{c.state_finite}"
                    f"{' STOPPED at ' + str(c.stopped_at) if c.stopped else ''} ({c.wall_s:.1f} s)")
    return Matrix(cells, baseline, seed_noise(baseline), tuple(seeds), steps)


def _n(values: Iterable[int]) -> str:
    v = list(values)
    return str(v[0]) if len(set(v)) == 1 else "/".join(map(str, v))


def _short(reason: str, n: int = 110) -> str:
    return reason if len(reason) <= n else reason[: n - 1] + "…"


def matrix_markdown(m: Matrix, faults: Sequence[str], policies: Sequence[str]) -> str:
    pols = (GRADSCALER, *policies)
    seeds = len(m.seeds)
    n_weights = sum(p.numel() for p in _task().make_model(0).parameters())
    lines = [
        f"digits-cnn, {m.steps} steps, seeds {', '.join(map(str, m.seeds))}; every cell of a row is the same "
        "model, data order and fault. `GradScaler` is plain fp32 PyTorch with `torch.amp.GradScaler(\"cpu\")` "
        "(it works on fp32: the scale backs off and the step is skipped on inf/NaN, measured). fp8-hybrid is "
        "emulated (`backend=\"emulate\"`); bf16 and error-budget run native int8/bf16 under a fixed device "
        "report (`tests/_train.py:fake_report`), so the figures do not depend on this CPU.",
        "",
        f"**Baseline**: clean fp32 (the *no fault, GradScaler* row) over the same seeds, accuracy "
        f"{m.baseline_mean:.4f}. **Seed noise** {m.noise:.4f}: 2 standard deviations of clean fp32 over "
        f"{len(m.baseline)} seeds ({', '.join(f'{a:.4f}' for a in m.baseline)}), and at least one test image "
        f"of 360. A cell *reaches the baseline* when its mean accuracy is at least {m.baseline_mean:.4f} - "
        f"{m.noise:.4f} = {m.baseline_mean - m.noise:.4f}. A stopped run's accuracy is its model's where it "
        "stopped; its *skipped* count leaves out the step that raised.",
        "",
        "Counts are per run" + (f" (`a/b/c`: seed by seed, when the {seeds} seeds differ)" if seeds > 1 else "")
        + "; *skipped*: updates not taken for inf/NaN; *rollbacks*: steps the guard undid (weights and "
        "optimizer state restored); *guard changes*: steps at which the guard changed the plan; *finite*: "
        "runs whose weights / Adam state are all finite at the end (and how many weights have an inf Adam second "
        "moment: their update is m / sqrt(inf) = 0, they no longer train).",
        "",
        "| fault | policy | skipped | rollbacks | guard changes | accuracy (mean) | reaches baseline | "
        "finite (weights / Adam state) | stopped (TrainingUnstableError) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fault in faults:
        for pol in pols:
            cs = m.of(fault, pol)
            if not cs:
                continue
            stopped = [c for c in cs if c.stopped]
            lines.append(
                f"| {FAULTS[fault].label} | {pol} | {_n(c.skipped for c in cs)} | {_n(c.rollbacks for c in cs)} | "
                f"{_n(c.plan_changes for c in cs)} | {m.mean_acc(fault, pol):.4f} | "
                f"{'yes' if m.reaches(fault, pol) else '**no**'} | "
                f"{sum(c.finite for c in cs)}/{len(cs)} / {sum(c.state_finite for c in cs)}/{len(cs)}"
                + (f" ({_n(c.state_nonfinite for c in cs)} of {n_weights} inf)" if not all(c.state_finite for c in cs)
                   else "") + " | "
                + (f"**{len(stopped)}/{len(cs)}, at step {_n(c.stopped_at for c in stopped)}**" if stopped else "no")
                + " |"
            )
    lines += ["", f"What the first faulty step said (seed {m.seeds[0]}, `StepResult.reason`):", "",
              "| fault | " + " | ".join(pols) + " |", "|---|" + "---|" * len(pols)]
    for fault in faults:
        if fault == "none":
            continue
        row = []
        for pol in pols:
            cs = [c for c in m.of(fault, pol) if c.seed == m.seeds[0]]
            row.append(_short(cs[0].fault_reasons[0]).replace("|", "\\|") if cs and cs[0].fault_reasons else "")
        lines.append(f"| {FAULTS[fault].label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# --- the kill -9 soak ------------------------------------------------------------------------------
WALL_COLUMNS = frozenset({"wall_s", "wall_time_s", "started", "finished", "peak_memory"})  # measured, not replayed
TABLES = {  # table -> its key, to compare row for row
    "runs": ("run_id",), "steps": ("run_id", "step"), "evals": ("run_id", "step", "metric"),
    "timeline": ("run_id", "step", "module", "role"), "energy": ("run_id", "step"), "summary": ("run_id",),
}
SOAK_CONFIG = """\
task: digits-cnn
policies: {policies}
seeds: {seeds}
steps: {steps}
checkpoint_every: {checkpoint_every}
eval_every: {eval_every}
quiet: true
"""


def _untimed(value):
    """A JSON value without measured wall times (any key named in WALL_COLUMNS), at any depth."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in WALL_COLUMNS}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def store_rows(run_dir: Path) -> dict[str, list[dict]]:
    """Every row of every table, keyed order, measured wall times left out (also inside the summary JSON)."""
    conn = sqlite3.connect(f"file:{run_dir / 'runs.sqlite'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        out = {}
        for table, key in TABLES.items():
            rows = []
            for r in conn.execute(f"SELECT * FROM {table} ORDER BY {', '.join(key)}"):  # noqa: S608 - our names
                d = {k: r[k] for k in r.keys() if k not in WALL_COLUMNS}
                if table == "summary":
                    d["json"] = _untimed(json.loads(d["json"]))
                rows.append(d)
            out[table] = rows
        return out
    finally:
        conn.close()


def store_diff(a: dict[str, list[dict]], b: dict[str, list[dict]]) -> list[str]:
    """Where two stores differ (empty: identical, wall times aside)."""
    diffs = []
    for table in TABLES:
        ra, rb = a[table], b[table]
        if len(ra) != len(rb):
            diffs.append(f"{table}: {len(ra)} rows vs {len(rb)}")
            continue
        for x, y in zip(ra, rb, strict=True):
            if x != y:
                cols = [k for k in x if x.get(k) != y.get(k)]
                diffs.append(f"{table} {[x.get(k) for k in TABLES[table]]}: {cols}")
    return diffs


def _env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ, ADAPREC_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _command(resume: bool) -> list[str]:
    return [sys.executable, "-m", "adaprec.cli", "run", "exp.yaml", "--out", "out", *(["--resume"] if resume else [])]


def adaprec_run(workdir: Path, cache_dir: Path, resume: bool = False, timeout: float = 600) -> float:
    """One uninterrupted ``adaprec run`` (or ``--resume``) in ``workdir``; returns its wall time."""
    t0 = time.perf_counter()
    p = subprocess.run(_command(resume), cwd=workdir, env=_env(cache_dir), capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"adaprec run exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return time.perf_counter() - t0


def _fixed_report(cache_dir: Path) -> None:
    """Put the fixed device report (int8 and bf16 fast) where the runs' probe reads it, as the in-process
    columns use it, so the soak's plans (and its timeline rows) do not depend on this CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the runs' OMP_NUM_THREADS (_env): part of the cache key
    try:
        key = cache_key("cpu", "full")
    finally:
        torch.set_num_threads(threads)
    hardware_cache.store(hardware_cache.cache_path(cache_dir, key), key, fake_report())


def write_config(workdir: Path, policies: Sequence[str], seeds: Sequence[int], steps: int,
                 checkpoint_every: int, eval_every: int) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "exp.yaml").write_text(SOAK_CONFIG.format(
        policies=json.dumps(list(policies)), seeds=json.dumps(list(seeds)), steps=steps,
        checkpoint_every=checkpoint_every, eval_every=eval_every))


def _progress(run_dir: Path) -> tuple[int, int]:
    """(steps saved in checkpoints over all runs, runs checkpointed): read from the checkpoint files only,
    so a killed writer's store is not touched (no SQLite recovery) before the next life resumes it."""
    done, runs = 0, 0
    for ck in sorted((run_dir / "checkpoints").glob("*.pt")) if (run_dir / "checkpoints").is_dir() else ():
        try:
            done += int(torch.load(ck, map_location="cpu", weights_only=True)["step"])
            runs += 1
        except Exception:  # noqa: BLE001 - a file being replaced; count it next time
            pass
    return done, runs


@dataclass
class Kill:
    round: int
    life: int
    after_s: float  # seconds after the life's start
    checkpointed_steps: int  # steps saved in checkpoints when it was killed (all runs)
    phase: str  # "start-up", "training", "resumed, before its first checkpoint", "end of training",
    #             "only the report left"
    temps: int  # temp files of interrupted atomic writes found right after the kill


@dataclass
class Round:
    kills: list[Kill]
    lives: int  # processes started, the final resume included
    identical: bool
    diffs: list[str]
    leftovers: list[str]  # temp files or a writer lock left after the final resume
    seconds: float


@dataclass
class Soak:
    rounds: list[Round]
    rows: dict[str, int]  # rows per table of the uninterrupted run's store
    reference_s: float
    startup_s: float  # the reference run's time to its first checkpoint
    total_steps: int

    @property
    def kills(self) -> list[Kill]:
        return [k for r in self.rounds for k in r.kills]

    @property
    def lives(self) -> int:
        return sum(r.lives for r in self.rounds)

    @property
    def identical(self) -> bool:
        return all(r.identical for r in self.rounds)

    @property
    def diffs(self) -> list[str]:
        return [d for r in self.rounds for d in r.diffs]

    @property
    def leftovers(self) -> list[str]:
        return [f for r in self.rounds for f in r.leftovers]


def _temps(run_dir: Path) -> list[str]:
    found = []
    for d in (run_dir, run_dir / "checkpoints", run_dir / "plots"):
        if d.is_dir():
            found += [str(p.relative_to(run_dir)) for p in d.iterdir()
                      if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".tmp.png"))]
    return found


def _checkpoint_since(run_dir: Path, t: float) -> bool:
    ck = run_dir / "checkpoints"
    return ck.is_dir() and any(p.stat().st_mtime >= t for p in ck.glob("*.pt"))


def _reference(workdir: Path, cache: Path) -> tuple[float, float]:
    """The uninterrupted run; (its wall time, its time to the first checkpoint)."""
    t0, start = time.perf_counter(), time.time()
    proc = subprocess.Popen(_command(resume=False), cwd=workdir, env=_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    first = None
    while proc.poll() is None:
        if first is None and _checkpoint_since(workdir / "out", start):
            first = time.perf_counter() - t0
        time.sleep(0.02)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"adaprec run exited {proc.returncode}: {err.strip()[-2000:]}")
    total = time.perf_counter() - t0
    return total, first if first is not None else total


def soak(workdir: Path, kills: int, policies: Sequence[str] = ("error-budget",), seeds: Sequence[int] = (0,),
         steps: int = 120, checkpoint_every: int = 20, eval_every: int = 40, seed: int = 0,
         kills_per_round: int | None = None, wait_for_checkpoint: bool = False,
         log: Callable[[str], None] = print) -> Soak:
    """One uninterrupted reference run, then rounds: the same config killed with SIGKILL at random moments
    and resumed each time, then resumed to the end; each round's store is compared with the reference's,
    row for row. Rounds go on until ``kills`` kills have landed.

    A kill lands at a uniformly random moment of its life, between its start and the time the remaining work
    would take (the reference's start-up, plus its run time scaled by the share of steps not yet checkpointed).
    With ``wait_for_checkpoint`` (the short test), only after that life has written a checkpoint, plus up to
    0.5 s, so that every kill lands in training, a checkpoint write or the report, not in Python's start-up.
    A life that finishes before its kill ends the round; the final resume then only checks.
    """
    rng = random.Random(seed)
    per_round = kills_per_round or kills
    cache = workdir / "hardware-cache"  # one device report for every run, fixed: int8 and bf16 fast
    _fixed_report(cache)
    ref = workdir / "reference"
    write_config(ref, policies, seeds, steps, checkpoint_every, eval_every)
    reference_s, startup_s = _reference(ref, cache)
    log(f"reference run: {reference_s:.1f} s (first checkpoint after {startup_s:.1f} s)")
    total = steps * (len(seeds) * (len(policies) + ("fp32" not in policies)))
    expected = store_rows(ref / "out")
    rounds: list[Round] = []
    landed = 0
    while landed < kills and len(rounds) < 3 * kills:
        killed = workdir / f"round{len(rounds)}"
        write_config(killed, policies, seeds, steps, checkpoint_every, eval_every)
        out = killed / "out"
        done: list[Kill] = []
        lives = 0
        t_round = time.perf_counter()
        while len(done) < min(per_round, kills - landed):
            before, _ = _progress(out)
            proc = subprocess.Popen(_command(resume=(out / "runs.sqlite").exists()), cwd=killed, env=_env(cache),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            lives += 1
            t0, life_start = time.perf_counter(), time.time()
            if wait_for_checkpoint:
                while proc.poll() is None and not _checkpoint_since(out, life_start):
                    time.sleep(0.02)
                delay = (time.perf_counter() - t0) + rng.uniform(0.0, 0.5)
            else:
                remaining = 1.0 - before / total
                delay = rng.uniform(0.0, startup_s + (reference_s - startup_s) * remaining)
            while proc.poll() is None and time.perf_counter() - t0 < delay:
                time.sleep(0.01)
            if proc.poll() is not None:  # finished (or failed) before the kill
                err = proc.stderr.read().decode(errors="replace")
                proc.stderr.close()
                if proc.returncode != 0:
                    raise RuntimeError(f"life {lives} exited {proc.returncode} before its kill: {err.strip()[-2000:]}")
                log(f"round {len(rounds)} life {lives}: finished before its kill at {delay:.1f} s")
                break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            after = time.perf_counter() - t0
            saved, _ = _progress(out)
            if before >= total:
                phase = "only the report left"  # a life resuming runs whose every step was checkpointed
            elif saved >= total:
                phase = "end of training"  # this life checkpointed the last step: last store rows, the report
            elif _checkpoint_since(out, life_start):
                phase = "training"
            elif before == 0:
                phase = "start-up"
            else:
                phase = "resumed, before its first checkpoint"
            done.append(Kill(len(rounds), lives, after, saved, phase, len(_temps(out))))
            log(f"round {len(rounds)} life {lives}: SIGKILL after {after:.2f} s ({phase}; {saved}/{total} steps "
                "checkpointed)")
        adaprec_run(killed, cache, resume=(out / "runs.sqlite").exists())
        lives += 1
        diffs = store_diff(expected, store_rows(out))
        leftovers = _temps(out) + (["writer.lock"] if (out / "writer.lock").exists() else [])
        rounds.append(Round(done, lives, not diffs, diffs, leftovers, time.perf_counter() - t_round))
        log(f"round {len(rounds) - 1}: {len(done)} kills, store identical: {not diffs} {diffs[:5]}")
        landed += len(done)
    return Soak(rounds, {t: len(r) for t, r in expected.items()}, reference_s, startup_s, total)


def soak_markdown(s: Soak, config: dict) -> str:
    kills = s.kills
    phases: dict[str, int] = {}
    for k in kills:
        phases[k.phase] = phases.get(k.phase, 0) + 1
    lines = [
        f"`adaprec run` in a subprocess on digits-cnn (policies fp32 + {', '.join(config['policies'])}; seeds "
        f"{', '.join(map(str, config['seeds']))}; {config['steps']} steps; a checkpoint every "
        f"{config['checkpoint_every']} steps; {sum(s.rows.values())} rows in the store: "
        + ", ".join(f"{t} {n}" for t, n in s.rows.items())
        + f"; {s.reference_s:.0f} s uninterrupted, the first checkpoint after {s.startup_s:.0f} s), killed with a "
        "real SIGKILL at uniformly random moments of each life, resumed with `--resume` after each kill, then "
        "resumed to the end; each round's store is compared with the uninterrupted run's, every row and column "
        "of every table, measured wall times (`wall_s`, `wall_time_s`, `started`, `finished`, also inside the "
        "summary JSON) aside. A round ends when a life finishes before its kill, or after "
        f"{config['kills_per_round']} kills.",
        "",
        "| rounds | kills | kills by phase | kills that left a temp file | processes started | "
        "stores identical to the uninterrupted run | left behind after the final resume | soak time |",
        "|---|---|---|---|---|---|---|---|",
        f"| {len(s.rounds)} | {len(kills)} | " + ", ".join(f"{p}: {n}" for p, n in sorted(phases.items()))
        + f" | {sum(k.temps > 0 for k in kills)} | {s.lives} | "
        f"**{sum(r.identical for r in s.rounds)}/{len(s.rounds)}** | "
        f"{len(s.leftovers)} files | {sum(r.seconds for r in s.rounds):.0f} s |",
        "",
        "Each kill: seconds into its life (steps checkpointed then, of " + str(s.total_steps) + "): "
        + "; ".join(f"{k.after_s:.1f} s ({k.checkpointed_steps})" for k in kills) + ".",
    ]
    if s.diffs:
        lines += ["", "Differences: " + "; ".join(s.diffs[:20])]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the fault matrix")
    ap.add_argument("--noise-seeds", type=int, default=6, help="seeds of the clean fp32 baseline (seed noise)")
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs in the soak, over as many rounds as it takes")
    ap.add_argument("--kills-per-round", type=int, default=5)
    ap.add_argument("--no-matrix", action="store_true")
    ap.add_argument("--no-soak", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print the tables, leave docs/reliability.md alone")
    ap.add_argument("--json", default=None, help="also write every cell of the matrix to this JSON file")
    ap.add_argument("--workdir", default=None, help="where the soak's run directories go (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # 2 shared cores: one thread per run is faster and steadier here
    import warnings

    warnings.filterwarnings("ignore", message="adaprec: backend='emulate'")
    if not args.no_matrix:
        t0 = time.perf_counter()
        faults = ("none", *ISSUE_FAULTS, "inf-grad-x5")
        m = run_matrix(faults, POLICIES, tuple(range(args.seeds)), args.steps,
                       noise_seeds=tuple(range(max(args.noise_seeds, args.seeds))))
        table = matrix_markdown(m, faults, POLICIES)
        table += f"\n\nMeasured by `python bench/bench_reliability.py` in {time.perf_counter() - t0:.0f} s " \
                 f"(torch {torch.__version__}, 1 thread)."
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps([c.__dict__ for c in m.cells], indent=1))
        if not args.no_write:
            write_section("Fault matrix (measured)", table, doc=DOC)
    if not args.no_soak:
        import tempfile

        config = {"policies": ("bf16", "error-budget", "fp8-hybrid"), "seeds": (0, 1), "steps": 200,
                  "checkpoint_every": 25, "eval_every": 50, "kills_per_round": args.kills_per_round}
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            result = soak(Path(tmp), args.kills, seed=0, **config)
        table = soak_markdown(result, config)
        print(table)
        if not args.no_write:
            write_section("kill -9 soak of adaprec run (measured)", table, doc=DOC)

if __name__ == "__main__":
    main()
