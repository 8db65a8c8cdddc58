"""Peak memory: measured with its method named, n/a with a reason where it cannot be, and in the store and table."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adaprec import memory
from adaprec.experiments import runner
from adaprec.experiments.config import parse_config
from adaprec.experiments.report import policy_table
from adaprec.experiments.store import ResultStore
from adaprec.memory import MemoryReading, PeakMemory

MIB = 2**20
LINUX = sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()


@pytest.mark.skipif(not LINUX, reason="VmHWM and clear_refs are Linux's")
def test_cpu_peak_sees_a_transient_tensor_and_a_reset_forgets_it() -> None:
    peak = PeakMemory()
    peak.reset()
    before = peak.read()
    assert before.measured and before.method == "process VmHWM since reset"
    big = torch.ones(200 * MIB // 4)  # 200 MiB, touched
    del big
    during = peak.read()
    assert during.peak_bytes >= before.peak_bytes + 190 * MIB
    peak.reset()
    after = peak.read()
    assert after.peak_bytes < during.peak_bytes - 150 * MIB
    assert "MiB (process VmHWM since reset)" in str(after)


def test_without_a_resettable_high_water_mark_the_reading_says_since_start(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")  # the write fails
    peak = PeakMemory()
    peak.reset()
    r = peak.read()
    if sys.platform.startswith(("linux", "darwin")):
        assert r.measured and "ru_maxrss since start" in r.method
    else:
        assert not r.measured


def test_an_os_without_a_counter_gets_na_with_the_reason(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(memory, "_STATUS", tmp_path / "no-status")
    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    monkeypatch.setattr(memory.sys, "platform", "plan9")
    peak = PeakMemory()
    peak.reset()  # never raises
    r = peak.read()
    assert r == MemoryReading(None, "none", "no peak-memory counter on plan9")
    assert str(r) == "n/a (no peak-memory counter on plan9)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only process gets")
def test_a_cuda_reading_without_cuda_is_na_not_an_error() -> None:
    peak = PeakMemory("cuda")
    peak.reset()
    r = peak.read()
    assert not r.measured and r.method == "cuda max_memory_allocated" and "CUDA is not available" in r.reason


def test_the_runner_stores_the_steady_peak_and_the_table_shows_it(tmp_path) -> None:
    config = parse_config({"task": "digits-cnn", "policies": ["bf16"], "seeds": 1, "steps": 12, "eval_every": 6,
                           "quiet": True})
    run_dir = runner.run_experiment(config, tmp_path / "run", progress=False, report=False)
    with ResultStore(run_dir) as store:
        summaries = {r["policy"]: store.summary(r["run_id"]) for r in store.runs()}
        rows, _ = policy_table(store)
    for policy in ("fp32", "bf16"):
        reading = summaries[policy]["peak_memory"]
        if LINUX:
            assert reading["method"] == "process VmHWM since reset" and reading["peak_bytes"] > 50 * MIB
    cells = {r["policy"]: r["peak memory (measured)"] for r in rows}
    if LINUX:
        for policy, cell in cells.items():
            mib = summaries[policy]["peak_memory"]["peak_bytes"] / MIB
            assert cell == f"{mib:,.0f} MiB (process VmHWM since reset)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux-only")
def test_release_free_memory_gives_freed_heap_back_to_the_os() -> None:
    """What runs sharing a process rely on: heap freed by an earlier run leaves the resident set."""
    script = textwrap.dedent("""
        import re
        from adaprec.memory import release_free_memory
        def rss():
            return int(re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
        blocks = [bytearray(64 * 1024) for _ in range(3000)]  # 192 MiB of heap chunks (under the mmap threshold)
        for b in blocks:
            b[::4096] = b"\\x01" * len(b[::4096])  # touch every page
        kept = blocks[::10]  # live chunks between the freed ones: glibc cannot just lower the heap's top
        del blocks
        before = rss()
        assert release_free_memory()
        print((before - rss()) / 2**20, len(kept))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    released_mib = float(out.stdout.split()[0])
    assert released_mib > 100  # of the ~173 MiB freed


def test_the_engines_own_buffers_are_counted_in_the_report():
    """Scratch for int8 GEMM temporaries and the stochastic-rounding noise table grow with the largest tensor
    and stay: adaprec's own memory, reported beside the optimizer state (issue 19: count every byte)."""
    from _train import train
    from adaprec.controller.report import memory_figures

    run = train("char-transformer", {"name": "error-budget", "warmup_steps": 2, "patience": 1}, steps=10,
                monitor_every=2)
    plan = run.ap.plan
    stochastic = [m for m, mp in plan.modules.items() if mp.grad_output.format == "int8" and mp.grad_output.rounding == "stochastic"]
    assert stochastic, "no int8 GEMM with stochastic rounding ran: nothing to count"
    buffers = run.ap.engine.buffer_nbytes()
    # the table holds at least the offset range (2^20 floats) plus the largest gradient rounded
    assert buffers["noise table"] >= 4 * (1 << 20) and buffers["scratch"] > 0, buffers
    assert memory_figures(run.ap)["engine_buffers_bytes"] == sum(buffers.values())
    line = next(line for line in run.ap.report().splitlines() if line.startswith("engine buffers:"))
    assert f"noise table {buffers['noise table'] / 2**20:.1f} MiB" in line


def test_the_noise_table_stays_bounded_and_reads_the_same_noise_eager_and_gathered():
    from adaprec.engine.quant import NoiseTable

    table = NoiseTable(seed=3)
    n = 3 * NoiseTable.SPAN + 11  # longer than one span: read span by span
    for offset in (0, 123, NoiseTable.MAX_OFFSET - 1, 10**9):
        y = torch.zeros(n)
        table.add_(y, offset)
        assert torch.equal(y, table.get(n, torch.tensor(offset), torch.device("cpu")))  # the compiled path's gather
        assert torch.equal(y, table.get(n, offset, torch.device("cpu")))
        spans = y[: 3 * NoiseTable.SPAN].view(3, -1)
        assert not torch.equal(spans[0], spans[1]) and not torch.equal(spans[1], spans[2])  # spans read apart
        assert 0.49 < float(y.mean()) < 0.51 and float(y.min()) >= 0.0 and float(y.max()) < 1.0
    assert table.nbytes() == 4 * (NoiseTable.SPAN + NoiseTable.MAX_OFFSET)  # 8 MiB, not 4 bytes per element rounded
    short = torch.zeros(1000)
    table.add_(short, 77)
    assert torch.equal(short, table.get(1000, 77, torch.device("cpu")))
