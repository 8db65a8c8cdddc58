"""Real training on real offline data, under emulated narrow plans and adaptive policies."""

from __future__ import annotations

import statistics

import pytest
import torch

from _train import train
from adaprec.formats import get

pytestmark = pytest.mark.slow


def test_digits_cnn_fp8_hybrid_reaches_95_percent():
    run = train("digits-cnn", "fp8-hybrid", steps=300, backend="emulate")
    assert run.ap.plan.get(next(iter(run.ap.plan))).weight.format == "fp8_e4m3"
    assert run.metrics["accuracy"] >= 0.95, run.metrics


def test_char_transformer_bf16_and_fp8_within_2_percent_of_fp32():
    steps = 150
    val = {p: train("char-transformer", p, steps=steps, backend="emulate").metrics["val_loss"]
           for p in ("fp32", "bf16", "fp8")}
    for p in ("bf16", "fp8"):
        assert val[p] <= val["fp32"] * 1.02, val
    # and the model learned something real: far below uniform guessing over the vocabulary
    assert val["fp32"] < 0.8 * torch.log(torch.tensor(65.0)).item()


def _low_bit_share(ap) -> float:
    macs = ap.energy.summary()["macs_by_format"]
    total = sum(macs.values())
    low = sum(v for f, v in macs.items() if get(f.removesuffix(" (emulated)")).bits <= 8)
    return low / total


def test_error_budget_moves_most_work_to_8_bits_at_fp32_accuracy():
    acc_fp32, acc_eb, shares = [], [], []
    for seed in range(3):
        acc_fp32.append(train("digits-cnn", "fp32", steps=300, seed=seed).metrics["accuracy"])
        run = train("digits-cnn", "error-budget", steps=300, seed=seed, backend="emulate")
        acc_eb.append(run.metrics["accuracy"])
        shares.append(_low_bit_share(run.ap))
    assert statistics.mean(shares) >= 0.5, shares
    assert statistics.mean(acc_eb) >= statistics.mean(acc_fp32) - 0.01, (acc_fp32, acc_eb)


def test_guard_catches_injected_inf_restores_state_and_finishes():
    fault_step = 40
    victim = {}

    def inject(step, model):
        if step == fault_step:
            # the next backward puts inf into the gradient of the last Linear layer
            last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
            victim["module"] = last
            victim["before"] = [p.detach().clone() for p in model.parameters()]
            handle = last.weight.register_hook(lambda g: g * float("inf"))
            victim["handle"] = handle
        elif step == fault_step + 2:  # inf in that gradient on two steps in a row: evidence against its precision
            victim["handle"].remove()
            victim["after"] = [p.detach().clone() for p in model.parameters()]

    run = train("digits-cnn", "fp8-hybrid", steps=300, before_step=inject, backend="emulate")
    names = {m: n for n, m in run.model.named_modules()}
    bad = names[victim["module"]]
    for res in run.results[fault_step:fault_step + 2]:
        assert not res.stepped and bad in res.overflowed and "inf/NaN" in res.reason
    # the pre-step state is intact: the faulty steps changed nothing
    assert all(torch.equal(a, b) for a, b in zip(victim["before"], victim["after"], strict=True))
    # the first failure only skipped the step (as GradScaler would); the repeat raised exactly that module
    assert not [e for e in run.ap.timeline.events if e.step == fault_step]
    events = [e for e in run.ap.timeline.events if e.step == fault_step + 1]
    assert events and {e.module for e in events} == {bad}
    assert all(get(e.new.split("/")[0]).bits > get(e.old.split("/")[0]).bits for e in events)
    assert run.metrics["accuracy"] >= 0.95


def test_same_seed_same_timeline_and_replay_reproduces_plans_and_weights(tmp_path):
    a = train("digits-cnn", "error-budget", steps=120, seed=3, backend="emulate")
    b = train("digits-cnn", "error-budget", steps=120, seed=3, backend="emulate")
    assert [e.__dict__ for e in a.ap.timeline.events] == [e.__dict__ for e in b.ap.timeline.events]
    assert a.ap.timeline.events, "error-budget changed no precision in 120 steps"
    path = tmp_path / "timeline.json"
    a.ap.timeline.to_json(path)
    c = train("digits-cnn", f"replay:{path}", steps=120, seed=3, backend="emulate", guard=False)
    assert c.ap.plan == a.ap.plan
    for p, q in zip(a.model.parameters(), c.model.parameters(), strict=True):
        assert torch.equal(p, q)
