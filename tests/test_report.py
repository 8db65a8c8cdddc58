"""Report: table, figures, Markdown and a self-contained HTML page, from a store filled by real training."""

from __future__ import annotations

import base64
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch

from adaprec.errors import ConfigError
from adaprec.experiments.plots import bits_of, plan_matrix
from adaprec.experiments.report import policy_table, write_report
from adaprec.experiments.store import ResultStore
from adaprec.experiments.tasks import get_task

STEPS = 25
PJ_PER_MAC = {"fp32": 4.6, "bf16": 1.1}  # energy model of this test only: computed, not measured
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _macs_per_sample(model: torch.nn.Module) -> int:
    """Multiply-accumulates of one forward pass of DigitsCNN on an 8x8 image."""
    return 16 * 9 * 64 + 32 * 16 * 9 * 64 + 512 * 10


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two policies x two seeds of real digits training, written to a store as the runner would."""
    d = tmp_path_factory.mktemp("run")
    task = get_task("digits-cnn")
    plan = {"modules": {m: {r: {"format": "fp32"} for r in ("weight", "activation", "grad_output", "grad_weight")}
                        for m in ("conv1", "conv2", "fc")}, "pinned": []}
    step_ms: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with ResultStore(d) as store:
        for policy in ("fp32", "bf16"):
            for seed in (0, 1):
                run_id = f"{policy}-seed{seed}"
                store.start_run(run_id, task=task.name, policy=policy, seed=seed, metric=task.metric,
                                higher_is_better=True, total_steps=STEPS, energy_profile="test-profile",
                                config={}, initial_plan=plan)
                model, t0 = task.make_model(seed), time.perf_counter()
                opt = task.make_optimizer(model)
                steps, energy, wall = [], [], []
                for s, (x, y) in enumerate(task.train_loader(seed)):
                    if s == STEPS:
                        break
                    t_step = time.perf_counter()
                    opt.zero_grad()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=policy == "bf16"):
                        loss = task.loss_fn(model(x), y)
                    loss.backward()
                    opt.step()
                    wall.append(time.perf_counter() - t_step)
                    macs = 3 * _macs_per_sample(model) * len(x)  # forward + two backward GEMMs
                    steps.append({"step": s, "loss": loss.item(), "lr": 3e-3, "loss_scale": 1.0,
                                  "plan_summary": f"{policy}:3", "stepped": True, "reason": "ok"})
                    energy.append({"step": s, "macs": macs, "bitops": macs * 16, "bytes": 0.0,
                                   "modeled_j": macs * PJ_PER_MAC[policy] * 1e-12,
                                   "fp32_modeled_j": macs * PJ_PER_MAC["fp32"] * 1e-12,
                                   "bf16_modeled_j": macs * PJ_PER_MAC["bf16"] * 1e-12, "measured_j": None,
                                   "measured_reason": "no meter in this test (a stub)",
                                   "macs_by_format": {policy: macs}})
                store.add_steps(run_id, steps)
                store.add_energy(run_id, energy)
                if policy == "bf16":
                    store.add_timeline(run_id, [
                        {"step": 0, "module": m, "role": r, "old": "fp32", "new": "bf16", "policy": "bf16", "reason": "static"}
                        for m in ("conv1", "conv2", "fc") for r in ("weight", "activation", "grad_output", "grad_weight")
                    ] + [{"step": 10, "module": "fc", "role": "grad_output", "old": "bf16", "new": "fp32",
                          "policy": "guard", "reason": "guard at step 10: overflow"}])
                final = task.evaluate(model)
                store.add_evals(run_id, STEPS, final)
                totals = {k: sum(e[k] for e in energy) for k in ("modeled_j", "fp32_modeled_j", "bf16_modeled_j")}
                store.finish_run(run_id, final_metric=final["accuracy"], wall_time_s=time.perf_counter() - t0,
                                 summary={**totals, "measured_j": None, "measured_reason": "no meter in this test (a stub)",
                                          "macs_by_format": {policy: sum(e["macs"] for e in energy)},
                                          "wall_s": sum(wall), "timed_steps": len(wall), "coverage": 1.0})
                step_ms[policy].append(1e3 * sum(wall) / len(wall))
    (d / "step_ms.json").write_text(json.dumps(step_ms))  # what the table must show, from the timings above
    return d


def test_table_rows_match_the_store(run_dir: Path) -> None:
    with ResultStore(run_dir) as store:
        rows, facts = policy_table(store)
        finals = {r["run_id"]: r["final_metric"] for r in store.runs()}
    assert [r["policy"] for r in rows] == ["fp32", "bf16"]
    fp32, bf16 = rows
    accs = [finals["bf16-seed0"], finals["bf16-seed1"]]
    assert bf16["quality"] == f"{statistics.fmean(accs):.4f} ± {statistics.stdev(accs):.4f}"
    base = statistics.fmean([finals["fp32-seed0"], finals["fp32-seed1"]])
    assert bf16["vs fp32"] == f"{statistics.fmean(accs) - base:+.4f}"
    assert bf16["saving vs fp32 (modeled)"] == f"{100 * (1 - PJ_PER_MAC['bf16'] / PJ_PER_MAC['fp32']):.1f} %"
    ms = json.loads((run_dir / "step_ms.json").read_text())
    mean = {p: statistics.fmean(v) for p, v in ms.items()}
    assert bf16["step time (measured)"] == f"{mean['bf16']:.2f} ms" and fp32["step time (measured)"] == f"{mean['fp32']:.2f} ms"
    assert bf16["time saving vs fp32 (measured)"] == f"{100 * (1 - mean['bf16'] / mean['fp32']):.1f} %"
    assert fp32["time saving vs fp32 (measured)"] == "baseline" and bf16["coverage"] == "100 %"
    assert bf16["energy measured"] == "n/a: no meter in this test"
    assert bf16["MACs by format"] == "bf16 100%" and fp32["MACs by format"] == "fp32 100%"
    assert (bf16["guard fallbacks"], fp32["guard fallbacks"]) == ("2", "0")  # one per seed, summed
    assert facts["profile"] == "test-profile" and fp32["vs fp32"] == "baseline"
    assert min(accs) > 0.5  # 25 real steps learn something


def test_plan_matrix_applies_events_after_their_step() -> None:
    plan = {"modules": {"fc": {r: {"format": "fp32"} for r in ("weight", "activation", "grad_output", "grad_weight")}}}
    events = [{"step": 2, "module": "fc", "role": "weight", "new": "fp8_e4m3/sr/tensor"}]
    rows, mat = plan_matrix(plan, events, 5)
    assert rows[0] == "fc.weight" and mat.shape == (4, 5)
    assert mat[0].tolist() == [32, 32, 32, 8, 8] and (mat[1:] == 32).all()
    assert bits_of("bf16") == 16 and bits_of("nonsense") != bits_of("nonsense")  # nan


def test_report_files_are_self_contained(run_dir: Path) -> None:
    paths = write_report(run_dir)
    page = paths["html"].read_text()
    assert page.count('<tr class="policy">') == 1 and page.count('<tr class="baseline">') == 1
    assert "energy, modeled (profile test-profile, what executed)" in page and "step time (measured)" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    imgs = page.split('src="data:image/png;base64,')[1:]
    assert len(imgs) == 4
    for chunk in imgs:
        assert base64.b64decode(chunk.split('"')[0]).startswith(b"\x89PNG")
    md = paths["markdown"].read_text()
    assert "| bf16 | 2 |" in md and "(plots/loss_curves.png)" in md
    for name in ("quality_vs_energy", "precision_timeline", "loss_curves", "energy_per_step"):
        assert paths[name].stat().st_size > 5000
    assert not list(run_dir.glob(".*tmp*")), "no temporary files left behind"


def test_report_of_a_directory_without_store(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no runs.sqlite"):
        write_report(tmp_path)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    page = write_report(run_dir)["html"]
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={tmp_path / 'prof'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "<td>bf16</td>" in dom and "<td>fp32</td>" in dom
    assert dom.count('<img alt="') == 4 and 'src="data:image/png;base64,' in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 50_000
