"""adaprec under torch.compile: a fixed plan is one graph, a plan change recompiles once, every GEMM is counted.

Real data (scikit-learn's digits), a real optimizer, the controller's protocol.
The backend is ``aot_eager`` (dynamo and AOTAutograd, forward and backward
graphs, without inductor's seconds of code generation); one test runs
inductor to show the ledger's in-graph tally survives it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaprec
from _train import FAST_INT8_BF16
from adaprec.plan import ModulePrecision, TensorRecipe
from adaprec.policies import SchedulePolicy, StaticPolicy

torch._dynamo.config.cache_size_limit = 16  # the tests count compiles themselves

def _int8(rounding: str = "nearest") -> ModulePrecision:
    return ModulePrecision(
        weight=TensorRecipe("int8", scaling="tensor"),
        activation=TensorRecipe("int8", scaling="tensor"),
        grad_output=TensorRecipe("int8", scaling="tensor", rounding=rounding),
    )


INT8 = _int8()


def _digits(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target[:n])


def _setup(policy, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    ap = adaprec.AdaptivePrecision(model, opt, policy, hardware=FAST_INT8_BF16, guard=False,
                                   monitor_every=10**9)
    return model, opt, ap


def _train(ap, eager, net, steps: int, batch: int = 64, on_step=None) -> list[float]:
    x, y = _digits()
    losses = []
    for i in range(steps):
        xb, yb = x[(i * batch) % 256:][:batch], y[(i * batch) % 256:][:batch]
        use = eager if ap.sampling_next else net  # sampled steps run Python observers: eager
        with ap.autocast():
            loss = nn.functional.cross_entropy(use(xb), yb)
        ap.backward(loss)
        ap.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(i)
    return losses


def _ledger(ap) -> dict:
    s = ap.energy.summary()
    return {k: s[k] for k in ("macs", "covered_macs", "macs_by_format")}


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fixed_int8_plan_is_one_graph_matches_eager_and_counts_every_gemm(rounding):
    """Stochastic rounding reads its per-step noise offset from a tensor: one graph serves every step."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, _, ap = _setup(StaticPolicy(_int8(rounding)))
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)  # any graph break raises
    got = _train(ap, model, compiled, 8)
    assert cnt.frame_count == 1  # one graph for the 7 compiled steps (step 0 samples: eager)
    compiled_ledger = _ledger(ap)
    ap.close()

    model, _, ap = _setup(StaticPolicy(_int8(rounding)))
    want = _train(ap, model, model, 8)
    eager_ledger = _ledger(ap)
    ap.close()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)  # the same int8 GEMMs, traced
    assert compiled_ledger == eager_ledger  # every GEMM of the graph counted, in the format it ran
    assert set(compiled_ledger["macs_by_format"]) == {"int8"}
    # 3 layers x (forward, input-grad, weight-grad) less the first layer's input grad, per step
    per_step = 64 * (64 * 96 + 96 * 96 + 96 * 10) * 3 - 64 * 64 * 96
    assert compiled_ledger["macs"] == 8 * per_step


def test_explain_reports_no_graph_break_under_a_fixed_plan():
    torch._dynamo.reset()
    model, _, ap = _setup(StaticPolicy(INT8))
    x, y = _digits(64)
    _train(ap, model, model, 1)  # step 0 (sampled)
    assert not ap.sampling_next
    ap.engine.begin_step(ap.step_count, False)
    with ap.engine.activate():
        e = torch._dynamo.explain(model)(x)
    assert e.graph_break_count == 0 and e.graph_count == 1, [str(b.reason)[:200] for b in e.break_reasons]
    ap.close()


def test_a_plan_change_recompiles_once():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, _, ap = _setup(SchedulePolicy([{"until_step": 4, "plan": "bf16"}, {"plan": INT8.to_dict()}]))
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    frames: list[int] = []
    _train(ap, model, compiled, 9, on_step=lambda i: frames.append(cnt.frame_count))
    # steps 1-3 bf16: one graph; step 4 the plan turns int8: one recompile; then nothing new
    assert frames == [0, 1, 1, 1, 2, 2, 2, 2, 2]
    fmts = ap.energy.summary()["macs_by_format"]
    assert set(fmts) == {"bf16", "int8"} and fmts["int8"] > fmts["bf16"]
    ap.close()


@pytest.mark.parametrize("plan", ["bf16", "int8"])
def test_inductor_graph_keeps_the_ledger_tally_and_counts_nothing_twice(plan):
    """Inductor's generated code calls ``torch.addmm(..., out=buf)`` for bf16 GEMMs: not counted again."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, _, ap = _setup(StaticPolicy(INT8 if plan == "int8" else "bf16"))
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    _train(ap, model, compiled, 3)
    assert cnt.frame_count == 1
    per_step = 64 * (64 * 96 + 96 * 96 + 96 * 10) * 3 - 64 * 64 * 96
    s = ap.energy.summary()
    assert s["macs"] == 3 * per_step and set(s["macs_by_format"]) == {plan}
    assert s["coverage"] == 1.0 and not ap.engine.uncovered
    ap.close()


def test_inductor_char_gpt_counts_every_gemm_once():
    """A GPT block on Shakespeare under inductor: the 3-D linears become ``torch.addmm(..., out=buf)`` calls in
    the generated code, which the engine's mode sees again at run time; the ledger equals the eager one."""
    from adaprec.experiments.tasks.char_transformer import CharGPT, load_text

    text = load_text()[:20_000]
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    starts = torch.arange(0, 8 * 97, 97).unsqueeze(1) + torch.arange(32)
    x, y = data[starts], data[starts + 1]

    def run(compiled: bool) -> dict:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = CharGPT(len(chars), d=32, heads=2, layers=1, block=32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ap = adaprec.AdaptivePrecision(model, opt, "bf16", hardware=FAST_INT8_BF16, guard=False, monitor_every=10**9)
        net = torch.compile(model) if compiled else model
        for _ in range(3):
            with ap.autocast():
                loss = nn.functional.cross_entropy((model if ap.sampling_next else net)(x).flatten(0, 1), y.flatten())
            ap.backward(loss)
            ap.step()
        out = {**_ledger(ap), "coverage": ap.energy.summary()["coverage"], "uncovered": dict(ap.engine.uncovered)}
        ap.close()
        return out

    got, want = run(True), run(False)
    assert got == want and got["coverage"] == 1.0
