"""Each variant of bench/bench_native.py trains what it claims to (issue 23).

A variant whose optimizer does not hold the model's parameters never trains,
and the bench would report a loss that says nothing about it: torchao's
``quantize_`` applied after the optimizer was built did exactly that. Each
variant is built here as the bench builds it, on a tiny model, and one step
must move every trainable parameter the optimizer holds. The bench's own
check (``bench/_peers.py``) must catch the old wrong order.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_native as bn  # noqa: E402
from _peers import INT8_GEMM, SetupError, check_setup, count_ops  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]

TINY = bn.Size("tiny", layers=1, heads=2, width=32, block=16, batch=4, iters=40, lr=1e-3)
VOCAB = 40
EAGER = [v for v in bn.VARIANTS if not v.endswith("compiled")]
PLAIN = [v for v in EAGER if v not in bn.TORCHAO]



def _batches(size: bn.Size = TINY) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Windows of a random 31-character motif repeated: learnable (each character follows from the ones before)."""
    motif = torch.randint(0, VOCAB, (31,), generator=torch.Generator().manual_seed(0))
    return list(bn._batches(motif.repeat(130), size))


def _assert_trains(run: bn.Run) -> None:
    """The test's own reading, independent of _peers: the optimizer holds every trainable parameter, one step moves each."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    held = {id(p) for g in run.opt.param_groups for p in g["params"]}
    assert params and {id(p) for p in params} <= held
    before = [p.detach().clone() for p in params]
    x, y = _batches()[0]
    run.step(0, x, y)  # the bench's first step: its setup check, which raises if the setup is wrong
    assert run.check.startswith("ok"), run.check
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True)]
    assert all(changed), [n for (n, _), c in zip(run.model.named_parameters(), changed, strict=True) if not c]


@pytest.mark.parametrize("variant", PLAIN)
def test_variant_trains_its_parameters(variant: str) -> None:
    run = bn.Run(variant, TINY, VOCAB)
    _assert_trains(run)
    if run.ap is not None:
        run.ap.close()


def _torchao() -> None:
    pytest.importorskip("torchao.prototype.quantized_training")


@pytest.mark.parametrize("variant", list(bn.TORCHAO))
def test_torchao_variant_trains_its_parameters(variant: str) -> None:
    _torchao()
    run = bn.Run(variant, TINY, VOCAB)
    linears = [m for m in run.model.modules() if isinstance(m, torch.nn.Linear)]
    if bn.TORCHAO[variant]:
        assert all(type(m).__name__ == "Int8MixedPrecisionTrainingLinear" for m in linears)
    else:
        assert all(type(m.weight).__name__ == "Int8MixedPrecisionTrainingLinearWeight" for m in linears)
    _assert_trains(run)


def test_torchao_module_swap_runs_int8_gemms() -> None:
    """The module_swap path is the one that runs aten::_int_mm on CPU: three per Linear per step."""
    _torchao()
    run = bn.Run("torchao int8-mp module_swap", TINY, VOCAB)
    x, y = _batches()[0]
    n = count_ops(lambda: run._step(x, y))[INT8_GEMM]
    linears = sum(isinstance(m, torch.nn.Linear) for m in run.model.modules())
    assert n == 3 * linears  # forward, grad_input, grad_weight


def test_torchao_module_swap_loss_tracks_fp32() -> None:
    """Set up right, torchao's int8 training follows fp32's loss on the same batches (it was 29-44 % worse)."""
    _torchao()
    size = bn.Size("tiny, fast", layers=1, heads=2, width=32, block=16, batch=4, iters=40, lr=1e-2)
    losses = {}
    for variant in ("plain fp32", "torchao int8-mp module_swap"):
        run = bn.Run(variant, size, VOCAB)
        for it, (x, y) in enumerate(_batches(size)):
            run.step(it, x, y)
        batch = _batches(size)[-1]
        with torch.no_grad():
            logits = run.model(batch[0])
        losses[variant] = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[1].flatten()))
    start = float(torch.log(torch.tensor(float(VOCAB))))  # an untrained model's loss, about ln(vocab)
    fp32, ao = losses["plain fp32"], losses["torchao int8-mp module_swap"]
    assert fp32 < 0.5 * start  # fp32 learned the motif in part
    assert abs(ao - fp32) <= 0.05 * fp32, losses  # within a few per cent


def test_check_fails_on_the_old_wrong_order() -> None:
    """The bench's old order, optimizer then quantize_ (default path): the check must fail and say why."""
    _torchao()
    model = bn._model(TINY, VOCAB)
    opt = bn._optimizer(model, TINY)
    bn.apply_torchao(model, module_swap=False)  # replaces every Linear weight after the optimizer took them
    run = bn.Run("plain fp32", TINY, VOCAB)
    run.model, run.opt, run.net = model, opt, model
    x, y = _batches()[0]
    found = check_setup("torchao int8-mp (wrong order)", model, opt, lambda: run._step(x, y))
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert not found.ok
    assert set(found.missing) == linear_weights
    assert linear_weights <= set(found.unchanged)
    with pytest.raises(SetupError, match="quantize_ before creating the optimizer"):
        found.raise_if_failed()
    with pytest.raises(SetupError):  # and the bench's own step stops on it
        run.step(0, x, y)


def test_check_fails_without_torchao() -> None:
    """Without any peer: a parameter left out of the optimizer, and one that gets no gradient, both fail."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    unused = torch.nn.Linear(4, 4)
    model.add_module("unused", unused)  # trainable, in the optimizer, never in the forward
    opt = torch.optim.AdamW([*model[0].parameters(), *unused.parameters()], lr=1e-2, weight_decay=0.0)
    x = torch.randn(8, 4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model[1](model[0](x)).square().mean().backward()
        opt.step()

    found = check_setup("subset", model, opt, step)
    assert set(found.missing) == {"1.weight", "1.bias"}
    assert set(found.unchanged) == {"1.weight", "1.bias", "unused.weight", "unused.bias"}
    assert found.summary() == "FAILED: 4/6 trainable tensors in the optimizer, 2/6 changed by step 1"
    with pytest.raises(SetupError, match="Not in the optimizer: 1.weight, 1.bias"):
        found.raise_if_failed()
