"""Runner: every policy (fp32 baseline first) x every seed, into one run directory.

Each run checkpoints itself every ``checkpoint_every`` steps (atomically),
so ``resume=True`` skips finished runs and continues a killed one from its
last checkpoint with the same results an uninterrupted run gives: the data
order of every epoch is a function of (seed, epoch), and the checkpoint
holds model, optimizer, controller state and RNG states.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adaprec import errors as _errors
from adaprec.errors import (
    AdaprecError,
    CheckpointError,
    ConfigError,
    RunDirError,
    TaskError,
    TrainingUnstableError,
)
from adaprec.experiments.config import ExperimentConfig, PolicySpec
from adaprec.experiments.ranks import NullStore, RankRun
from adaprec.experiments.store import DB_NAME, ResultStore, remove_stale_temp_files
from adaprec.experiments.tasks import Task, get_task
from adaprec.integrations.logging import RunLoggers, check_available
from adaprec.memory import PeakMemory, release_free_memory

__all__ = ["run_experiment", "run_id_for", "epoch_seed"]

CONFIG_NAME = "config.json"


def run_id_for(spec: PolicySpec, seed: int) -> str:
    return f"{spec.label}-seed{seed}"


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: distinct per (seed, epoch), so any epoch can be replayed."""
    return seed * 1_000_003 + epoch


def _is_baseline(spec: PolicySpec) -> bool:
    return spec.name == "fp32" and not spec.kwargs


def _slug(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", run_id)


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: never half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _one_line(e: BaseException) -> str:
    return re.sub(r"\s*\n\s*", " ", str(e)).strip() or type(e).__name__


def _user_task_error(name: str, what: str, e: Exception) -> TaskError:
    return TaskError(f"{what} of user task {name!r} raised {type(e).__name__}: {_one_line(e)}; fix the task "
                     "(rerun with --debug for the traceback)")


def _load_task(name: str) -> Task:
    """``get_task``, with a user entry point's own exception wrapped as TaskError naming it (cause kept)."""
    try:
        return get_task(name)
    except AdaprecError:
        raise
    except Exception as e:
        if ":" not in name:
            raise
        raise _user_task_error(name, "the entry point", e) from e


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    """An --out that cannot be a run directory, or a --resume of nothing, fails before anything is written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is an existing file, not a directory; choose another --out "
                          "(a directory to create, or a run directory to --resume)")
    if resume:
        if not run_dir.is_dir():
            raise RunDirError(f"--resume: run directory {run_dir} does not exist; run without --resume to start "
                              "it, or pass the --out of the run to continue")
        if not (run_dir / DB_NAME).is_file():
            raise RunDirError(f"--resume: {run_dir} holds no result store ({DB_NAME}), so nothing to resume; run "
                              "without --resume to start, or pass the --out of the run to continue")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:
        raise RunDirError(f"cannot create run directory {run_dir} ({getattr(e, 'strerror', None) or e}); "
                          "choose another --out") from None


def _prepare_dir(config: ExperimentConfig, run_dir: Path, resume: bool) -> ResultStore:
    """Create or reopen the run directory; refuse to mix results of two configs."""
    _check_run_dir(run_dir, resume)
    saved = run_dir / CONFIG_NAME
    # what does not change results stays out of the resume identity (a resume may add a logger)
    identity = config.model_dump(mode="json", exclude={"out", "quiet", "compile", "loggers", "mlflow_tracking_uri"})
    text = json.dumps(identity, indent=2, sort_keys=True)
    if saved.exists():
        if not resume:
            raise ConfigError(
                f"run directory {run_dir} already holds results; pass --resume (resume=True) to continue it, "
                "or choose another --out"
            )
        if saved.read_text(encoding="utf-8") != text:
            raise ConfigError(
                f"run directory {run_dir} was started with a different config ({saved}); "
                "resume with the same config, or choose another --out"
            )
    was_run_dir = saved.exists() or (run_dir / DB_NAME).exists()
    store = ResultStore(run_dir, writer=True)  # the writer lock: a second live run on this directory stops here
    try:
        if was_run_dir:
            remove_stale_temp_files(run_dir)  # what a killed atomic write left (we hold the lock)
        if not saved.exists():
            _atomic(saved, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        (run_dir / "checkpoints").mkdir(exist_ok=True)
    except BaseException:
        store.close()
        raise
    return store


def _open_store(config: ExperimentConfig, run_dir: Path, resume: bool, ranks: RankRun | None) -> Any:
    """The result store; under torch.distributed rank 0's alone (the other ranks get a NullStore).

    Rank 0 opens (and locks) the run directory and tells the others which runs
    are finished, or the error that stopped it, so every rank stops alike.
    """
    if ranks is None:
        return _prepare_dir(config, run_dir, resume)
    if ranks.writer:
        try:
            store = _prepare_dir(config, run_dir, resume)
        except AdaprecError as e:
            ranks.share((type(e).__name__, str(e)))
            raise
        ranks.share(("", sorted(store.finished_runs())))
        return store
    kind, what = ranks.share(None)
    if kind:
        cls = getattr(_errors, kind, AdaprecError)
        raise (cls if isinstance(cls, type) and issubclass(cls, AdaprecError) else AdaprecError)(what)
    return NullStore(what)


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    report: bool = True,
) -> Path:
    """Train ``config.task`` under each policy and seed; write the store (and the report).

    Args:
        config: a validated :class:`ExperimentConfig` (see :func:`load_config`).
        out_dir: run directory; default ``config.out``, else ``runs/<task>``.
        resume: continue an existing run directory: finished runs are
            skipped, a killed run continues from its last checkpoint.
        progress: a progress bar per run (also off when ``config.quiet``).
        report: write report.html / report.md at the end.

    Under ``torchrun`` (``adaprec run --nproc N``) every rank trains its slice of
    each batch in DistributedDataParallel, adaprec takes one decision for all
    ranks, and rank 0 alone writes the store, the checkpoints and the report.

    Returns the run directory.
    """
    run_dir = Path(out_dir or config.out or Path("runs") / _slug(config.task))
    task = _load_task(config.task)  # loads the data: fail before any directory is written
    check_available(config.loggers)  # a missing tensorboard/mlflow package, too
    ranks = RankRun.from_env()  # under torchrun: one process of several (None: the only one)
    try:
        store = _open_store(config, run_dir, resume, ranks)
    except BaseException:
        if ranks is not None:
            ranks.close()
        raise
    ended_well = False
    try:
        done = store.finished_runs() if resume else set()
        for spec in config.policies:
            for seed in config.seeds:
                if run_id_for(spec, seed) in done:
                    continue
                try:
                    _run_one(task, config, spec, seed, store, run_dir,
                             progress and not config.quiet and (ranks is None or ranks.writer), ranks)
                except AdaprecError:
                    raise
                except Exception as e:  # a user task's own code failing mid-run: name it, keep the cause
                    if ":" not in config.task:
                        raise
                    raise _user_task_error(config.task, f"run {run_id_for(spec, seed)}", e) from e
        ended_well = True
    finally:
        store.close()
        if ranks is not None:
            ranks.close(wait=ended_well)
    if report and (ranks is None or ranks.writer):  # one report, by rank 0
        from adaprec.experiments.report import write_report

        write_report(run_dir)
    return run_dir


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to restart that run from scratch"
        ) from None


def _run_one(
    task: Task, config: ExperimentConfig, spec: PolicySpec, seed: int, store: ResultStore, run_dir: Path, progress: bool,
    ranks: RankRun | None = None,
) -> None:
    import adaprec

    run_id = run_id_for(spec, seed)
    spe = task.steps_per_epoch
    total = config.total_steps(spe, task.default_steps)
    release_free_memory()  # this run's peak must not include the heap an earlier run in this process freed
    model = task.make_model(seed)
    opt = task.make_optimizer(model)
    writer = ranks is None or ranks.writer  # rank 0 evaluates and writes; every rank trains
    net = ranks.wrap(model) if ranks is not None else model  # DDP; model stays the unwrapped one
    ap = adaprec.AdaptivePrecision(
        net, opt, policy=spec.build_arg(), energy_profile=config.energy_profile,
        monitor_every=config.monitor_every, seed=seed, total_steps=total, steps_per_epoch=spe,
        guard=not _is_baseline(spec),  # the baseline is plain fp32 training: nothing to fall back to
        compile=config.compile,
    )
    x0, y0 = next(iter(task.train_loader(epoch_seed(seed, 0))))
    if ranks is not None:
        x0, y0 = ranks.shard(x0, y0)
    ap.prepare(x0)  # find every module that runs GEMMs, so the stored initial plan is the one step 0 runs
    initial_plan = ap.plan.to_dict()
    ckpt = run_dir / "checkpoints" / f"{_slug(run_id)}.pt"
    done, wall_before = 0, 0.0
    if ckpt.exists():
        state = _load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ap.load_state_dict(state["ap"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_as_tuple(state["py_rng"]))
        done, wall_before = int(state["step"]), float(state["wall_s"])
    else:
        torch.manual_seed(seed)
        random.seed(seed)
    store.delete_partial(run_id, done)
    run_config = {**config.model_dump(mode="json"), "policy": spec.model_dump(mode="json"), "seed": seed}
    store.start_run(
        run_id, task=task.name, policy=spec.label, seed=seed, metric=task.metric,
        higher_is_better=task.higher_is_better, total_steps=total, energy_profile=config.energy_profile,
        config=run_config, initial_plan=initial_plan,
    )
    logs = RunLoggers.open(  # TensorBoard / MLflow: fed each store commit, after it lands
        config.loggers if writer else (), run_dir=run_dir, run_id=run_id, dir_name=_slug(run_id), ap=ap, start_step=done,
        params={**run_config, "total_steps": total, "metric": task.metric},
        mlflow_tracking_uri=config.mlflow_tracking_uri,
    )
    eval_every = config.eval_every or max(1, total // 10)
    buffer: list[dict[str, Any]] = []
    flushed = done
    started = time.perf_counter()
    bar = _bar(run_id, total, done, progress, every=eval_every)
    # peak memory of the steady state: from the end of the first tenth of the steps (or from a resume)
    peak = PeakMemory(next((p.device for p in model.parameters()), None))
    steady_from = max(1, total // 10)
    if done >= steady_from:
        peak.reset()

    def flush() -> None:
        nonlocal flushed
        events = [e for e in ap.timeline.events if flushed <= e.step < done]
        energy = [r for r in ap.energy.steps() if flushed <= r["step"] < done]
        with store.transaction():
            store.add_steps(run_id, buffer)
            store.add_timeline(run_id, events)
            store.add_energy(run_id, energy)
        logs.committed(buffer, events, energy)
        buffer.clear()
        flushed = done

    try:
        while done < total:
            epoch = done // spe
            for i, (x, y) in enumerate(task.train_loader(epoch_seed(seed, epoch))):
                if i < done % spe:
                    continue  # replaying the epoch a checkpoint stopped in
                opt.zero_grad(set_to_none=True)
                if ranks is not None:
                    x, y = ranks.shard(x, y)  # this rank's slice of the step's batch
                with ap.autocast():
                    loss = task.loss_fn(net(x), y)
                ap.backward(loss)
                res = ap.step()
                done += 1
                if done == steady_from:
                    peak.reset()
                buffer.append({
                    "step": res.step, "loss": res.loss, "lr": opt.param_groups[0]["lr"],
                    "loss_scale": res.loss_scale, "plan_summary": ap.plan.summary(),
                    "stepped": res.stepped, "reason": res.reason,
                })
                if done % spe == 0:
                    ap.end_epoch()
                if done % eval_every == 0 and done < total and writer:
                    with ap.not_counted():  # an evaluation is no part of any training step's cost
                        values = task.evaluate(model)
                    store.add_evals(run_id, done, values)
                    logs.evaluated(done, values)
                if done % config.checkpoint_every == 0 or done == total:
                    flush()
                    if writer:
                        _save(ckpt, model, opt, ap, done, wall_before + time.perf_counter() - started)
                bar.update(1)
                if done % 10 == 0:
                    bar.set_postfix_str(f"loss {res.loss:.3f} | {ap.plan.summary()}")
                if done >= total:
                    break
            else:
                if done % spe:
                    raise TaskError(
                        f"task {task.name!r}: train_loader yielded {done % spe} batches in epoch {epoch} but "
                        f"steps_per_epoch is {spe}; make them agree"
                    )
    except TrainingUnstableError as e:
        flush()
        store.fail_run(run_id, reason=str(e), wall_time_s=wall_before + time.perf_counter() - started)
        logs.close("FAILED")
        return
    except BaseException:
        logs.close("KILLED")  # a resume continues the same logger run
        raise
    finally:
        bar.close()
        ap.close()
    if not writer:
        return
    memory = peak.read()
    final = task.evaluate(model)
    store.add_evals(run_id, total, final)
    summary = {**ap.energy.summary(), "final": final, "run_id": run_id, "policy": spec.label, "seed": seed,
               "peak_memory": memory.to_dict()}
    store.finish_run(
        run_id, final_metric=final[task.metric], wall_time_s=wall_before + time.perf_counter() - started,
        summary=summary,
    )
    logs.finish(total, final, summary)


def _save(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, ap: Any, step: int, wall_s: float) -> None:
    state = {
        "version": 1, "step": step, "wall_s": wall_s,
        "model": model.state_dict(), "optimizer": opt.state_dict(), "ap": ap.state_dict(),
        "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(),
    }
    _atomic(path, lambda tmp: torch.save(state, tmp))


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class _LineProgress:
    """Progress for a log, not a terminal: one plain line per evaluation (every ``every`` steps) and at the end.

    What a CI log, ``nohup`` or a captured notebook cell should get instead of
    a bar's carriage-return updates. Speaks the few tqdm calls the runner makes.
    A due line waits for the postfix the runner may set right after
    ``update`` (loss and plan), then shows the latest one.
    """

    def __init__(self, desc: str, total: int, initial: int, every: int, file: Any) -> None:
        self.desc, self.total, self.n, self.every, self.file = desc, total, initial, max(1, every), file
        self.postfix = ""
        self._start_n, self._t0 = initial, time.perf_counter()
        self._due: int | None = None
        self._printed = initial

    def update(self, n: int = 1) -> None:
        self._print_due()
        self.n += n
        if self.n % self.every == 0 or self.n >= self.total:
            self._due = self.n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s
        self._print_due()

    def close(self) -> None:
        self._print_due()
        if self._printed != self.n:
            self._due = self.n
            self._print_due()

    def _print_due(self) -> None:
        if self._due is None:
            return
        n, self._due = self._due, None
        elapsed = time.perf_counter() - self._t0
        rate = (n - self._start_n) / elapsed if elapsed > 0 else 0.0
        line = f"{self.desc}: step {n}/{self.total} ({100 * n / max(self.total, 1):.0f}%), {elapsed:.1f} s, {rate:.2f} steps/s"
        print(line + (f" | {self.postfix}" if self.postfix else ""), file=self.file, flush=True)
        self._printed = n


def _in_notebook() -> bool:
    """A Jupyter kernel is running us (tqdm.auto then draws a widget, not carriage returns)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _bar(run_id: str, total: int, initial: int, enabled: bool, every: int | None = None, file: Any = None) -> Any:
    """A live tqdm bar on a terminal (or a notebook widget); one line per evaluation on anything else.

    ``every``: steps between evaluations (default a tenth of the run);
    ``file``: where to write (default ``sys.stderr``, looked up now).
    """
    from tqdm import tqdm

    stream = sys.stderr if file is None else file
    if not enabled:
        return tqdm(total=total, initial=initial, disable=True)
    if file is None and _in_notebook():
        from tqdm.auto import tqdm as auto

        return auto(total=total, initial=initial, desc=run_id, leave=True)
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return tqdm(total=total, initial=initial, desc=run_id, leave=True, dynamic_ncols=True, file=stream)
    return _LineProgress(run_id, total, initial, every or max(1, total // 10), stream)
