"""The CPU allocator is set for memory as soon as, and only once, the plan keeps something narrow.

glibc's mallopt is process-wide and set once, so each case runs in its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import adaprec
    from adaprec.engine.allocator import allocator_tuned
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ap = adaprec.AdaptivePrecision(model, opt, policy=json.loads(sys.argv[1]), hardware=None)
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


def _run(policy: object) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(policy)], capture_output=True, text=True,
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
