"""The CPU allocator is set for memory as soon as, and only once, the plan keeps something narrow.

glibc's mallopt is process-wide and set once, so each case runs in its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import adaprec
    from adaprec.engine.allocator import allocator_tuned
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hardware = None
    if len(sys.argv) > 2:  # a device whose int8 and bf16 GEMMs are native and fast (fixed, not probed)
        sys.path.insert(0, sys.argv[2])
        from _train import FAST_INT8_BF16 as hardware
    ap = adaprec.AdaptivePrecision(model, opt, policy=json.loads(sys.argv[1]), hardware=hardware)
    before = (allocator_tuned(), ap.allocator)
    first_forward = []  # whether tuned while the first forward runs (before its activations are all allocated)
    model[2].register_forward_hook(lambda *_: first_forward.append(allocator_tuned()))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    for _ in range(2):
        opt.zero_grad()
        with ap.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        ap.backward(loss)
        ap.step()
    kept = sorted({mp.optimizer_state for mp in ap.plan.modules.values()} | {mp.saved for mp in ap.plan.modules.values()})
    print(json.dumps({"before": before, "after": [allocator_tuned(), ap.allocator], "kept": kept,
                      "first_forward": first_forward[0]}))
""")


ROLES = ("weight", "activation", "grad_output", "grad_weight")


def _run(policy: object, fast_int8: bool = False) -> dict:
    tests = [str(Path(__file__).parent)] if fast_int8 else []
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(policy), *tests], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_fp32_plan_leaves_the_allocator_alone_and_narrow_storage_tunes_it_for_memory():
    plain = _run("fp32")
    assert plain["kept"] == ["fp32"]
    assert plain["before"][0] is False and plain["after"][0] is False  # nothing narrow kept: glibc's defaults
    assert plain["first_forward"] is False
    assert "nothing narrow" in plain["after"][1]
    # no fast bf16 on this (reported) device: error-budget keeps storage fp32 by default, so nothing is tuned
    auto = _run("error-budget")
    assert auto["kept"] == ["fp32"] and auto["after"][0] is False
    narrow = _run({"name": "error-budget", "storage": "narrow"})
    assert any(k != "fp32" for k in narrow["kept"]), narrow  # int8 moments and bf16 saved tensors from the start
    assert narrow["before"][0] is False  # not before the plan is known
    # but once the first module's plan is known, inside the first forward: a first step under glibc's defaults
    # leaves a heap of freed blocks behind that every later step touches again
    assert narrow["first_forward"] is True
    assert narrow["after"][0] is True and "mmap threshold 1 MiB" in narrow["after"][1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_a_cpu_tuned_for_speed_is_balanced_once_the_plan_keeps_something_narrow():
    # fast int8 GEMMs: tuned for speed at once (their page faults dominate); kept so, the freed heap stayed resident
    # and the RSS rose above plain fp32's (measured 1.16x), so narrow storage moves it to balanced in the first forward
    fp32 = _run("fp32", fast_int8=True)
    assert "for speed" in fp32["before"][1] and "for speed" in fp32["after"][1]
    narrow = _run({"name": "error-budget", "storage": "narrow"}, fast_int8=True)
    assert "for speed" in narrow["before"][1]
    assert "mmap threshold 4 MiB" in narrow["after"][1], narrow
    # 8-bit saved codes: packed in 1 MiB pieces, which only the memory setting puts on pages of their own
    int8_saved = {"name": "static", "plan": {"saved": "int8/block256", **{r: {"format": "fp32"} for r in ROLES}}}
    byte_codes = _run(int8_saved, fast_int8=True)
    assert byte_codes["kept"] == ["fp32", "int8/block256"], byte_codes
    assert "for speed" in byte_codes["before"][1] and "mmap threshold 1 MiB" in byte_codes["after"][1], byte_codes



MODES = textwrap.dedent("""
    import json, sys, torch
    from adaprec.engine.allocator import allocator_mode, tune_cpu_allocator

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    def kept_after_free(mib):
        # whether a tensor of `mib` MiB, written and freed, stays resident
        before = rss()
        t = torch.empty(mib << 18, dtype=torch.float32).fill_(1.0)
        del t
        return rss() - before > (mib << 20) // 2

    in_force = []
    for mode in sys.argv[1].split(","):
        tune_cpu_allocator(mode)
        in_force.append(allocator_mode())
    print(json.dumps([in_force, kept_after_free(2), kept_after_free(8)]))
""")


def _modes(sequence: str) -> list:
    out = subprocess.run([sys.executable, "-c", MODES, sequence], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_modes_move_only_towards_keeping_less_and_each_keeps_what_it_says():
    # [modes in force after each request, a freed 2 MiB tensor stays resident, a freed 8 MiB one does]
    assert _modes("speed") == [["speed"], True, True]  # everything reused from the heap
    assert _modes("balanced") == [["balanced"], True, False]  # 4 MiB and more on pages of their own
    assert _modes("memory") == [["memory"], False, False]  # 1 MiB and more on pages of their own
    # never back towards keeping more
    assert _modes("speed,balanced,speed,memory,balanced")[0] == ["speed", "balanced", "balanced", "memory", "memory"]
