"""Every byte a step moves: the op-level count against an independent count, by hand, and in the ledger."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from adaprec.energy import EnergyLedger, MacCounter, StepCost, load_profile, price_step
from adaprec.energy.counting import OP_CLASSES, CountingError
from adaprec.energy.op_rules import classify, dtype_label
from adaprec.energy.traffic import OPTIMIZER, OUTSIDE, StepTraffic, TrafficCounter
from adaprec.energy.traffic_book import TrafficBook, input_signature
from adaprec.engine import Capabilities, PrecisionEngine
from adaprec.errors import AdaprecError, CheckpointError
from adaprec.plan import PrecisionPlan

pytestmark = pytest.mark.usefixtures("one_thread")


class NaiveBytes(TorchDispatchMode):
    """The oracle: a deliberately simple count of the bytes aten ops read and write, by another mechanism.

    No schema, no op tables: an op whose name ends in ``_`` is in place and
    writes its first operand; ``out=`` tensors are written; an output that
    shares storage with an input is a view (no bytes), any other output is
    written; every tensor input is read in full (``nbytes``), unless the op
    wrote nothing (a view or a metadata op).
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)

        def flat(xs):
            return [t for x in xs for t in (x if isinstance(x, (list, tuple)) else [x]) if isinstance(t, torch.Tensor)]

        name = func.overloadpacket.__name__
        ins = flat([*args, *(v for k, v in kwargs.items() if k != "out")])
        storages = {t.untyped_storage().data_ptr() for t in ins}
        written = flat([kwargs.get("out")]) + [t for t in flat([out]) if t.untyped_storage().data_ptr() not in storages]
        if name.endswith("_") and not name.startswith("__"):
            written += flat([args[0]])
        if written:
            self.total += sum(t.nbytes for t in ins) + sum(t.nbytes for t in written)
        return out


# --- two real training steps: a character LM on Shakespeare, a CNN on digits ------------------------------------
def _char_lm():
    from adaprec.experiments.tasks.char_transformer import CharGPT, encode, lm_loss, load_text

    ids, vocab = encode(load_text()[:20000])
    torch.manual_seed(0)
    model = CharGPT(vocab, d=64, heads=4, layers=2, block=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)

    def batch():
        i = torch.randint(0, len(ids) - 33, (8,), generator=gen)
        return torch.stack([ids[j:j + 32] for j in i]), torch.stack([ids[j + 1:j + 33] for j in i])

    return model, opt, batch, lm_loss


def _digits_cnn():
    from adaprec.experiments.tasks.digits import DigitsCNN, load

    x, y = load()
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)

    def batch():
        i = torch.randint(0, len(x), (32,), generator=gen)
        return x[i], y[i]

    return model, opt, batch, F.cross_entropy


def _step(model, opt, loss_fn, x, y) -> None:
    loss_fn(model(x), y).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("make", [_char_lm, _digits_cnn], ids=["char-lm", "digits-cnn"])
def test_ledger_bytes_equal_an_independent_count_of_a_real_training_step(make) -> None:
    model, opt, batch, loss_fn = make()
    _step(model, opt, loss_fn, *batch())  # the optimizer's state exists from here on
    book, ledger, mac = TrafficBook(model), EnergyLedger("7nm"), MacCounter(model)
    plan = PrecisionPlan()
    oracle_totals, rows = [], []
    for step in range(3):  # counted until two counts agree, then replayed
        x, y = batch()
        oracle = NaiveBytes()
        with oracle, mac, book.measure(input_signature(x, y), step) as m:
            _step(model, opt, loss_fn, x, y)
        cost = m.traffic.apply_to(mac.pop_step_cost(), m.source)
        rows.append(ledger.record(step, plan, cost))
        oracle_totals.append(oracle.total)
    assert [r["bytes_source"] for r in rows] == ["counted", "counted", "replayed"]
    for row, truth in zip(rows, oracle_totals, strict=True):
        assert row["bytes_moved"] == pytest.approx(truth, rel=0.02)
    assert rows[2]["bytes_moved"] == rows[1]["bytes_moved"] == rows[0]["bytes_moved"]
    s = ledger.summary()
    assert s["bytes"] == pytest.approx(sum(oracle_totals), rel=0.02)
    assert s["byte_coverage"] == 1.0 and s["bytes_steps"] == {"counted": 2, "replayed": 1, "modeled": 0}
    assert sum(s["bytes_by_format"].values()) == pytest.approx(s["bytes"])
    assert sum(s["bytes_by_class"].values()) == pytest.approx(s["bytes"])
    # far more than the GEMM operands: elementwise ops, norms, the optimizer are all there
    assert {"gemm", "elementwise", "optimizer"} <= set(s["bytes_by_class"])
    assert s["bytes_by_class"]["gemm"] < 0.6 * s["bytes"]
    assert s["coverage"] == 1.0  # the MAC side is as before
    assert s["saving_vs_fp32"] == pytest.approx(0.0, abs=1e-12)  # an fp32 run: its own fp32 counterfactual


def test_the_book_counts_a_key_until_two_counts_agree_then_replays_and_recounts() -> None:
    model, opt, batch, loss_fn = _digits_cnn()
    book = TrafficBook(model, recount_every=3)
    ledger = EnergyLedger("7nm")
    x, y = batch()
    key = input_signature(x, y)
    sources = []
    for step in range(8):
        with book.measure(key, step) as m:
            _step(model, opt, loss_fn, x, y)
        sources.append(m.source)
        ledger.record(step, PrecisionPlan(), m.traffic.apply_to(StepCost(), m.source))
    # step 0 also creates Adam's state: its count differs from step 1's, so step 2 is counted to confirm
    assert sources == ["counted"] * 3 + ["replayed"] * 3 + ["counted", "replayed"]
    assert book.summary()["counted_steps"] == [0, 1, 2, 6]
    assert book.summary()["drifts"] == []  # the recount at step 6 found the confirmed bytes
    rows = ledger.steps()
    assert rows[0]["bytes_moved"] > rows[1]["bytes_moved"]
    assert len({r["bytes_moved"] for r in rows[1:]}) == 1  # replayed steps price exactly like counted ones
    assert [r["bytes_source"] for r in rows] == sources
    # another input shape is another key: counted at once
    x2, y2 = x[:8], y[:8]
    with book.measure(input_signature(x2, y2), 8) as m:
        _step(model, opt, loss_fn, x2, y2)
    assert m.source == "counted" and m.traffic.bytes < rows[1]["bytes_moved"]
    assert len(book.keys()) == 2


def test_a_recount_that_differs_is_logged_as_drift_and_replaces_the_count() -> None:
    model, opt, batch, loss_fn = _digits_cnn()
    _step(model, opt, loss_fn, *batch())
    book = TrafficBook(model, recount_every=1)
    x, y = batch()
    sources = []
    for step in range(5):
        n = 4 if step >= 3 else len(x)  # the key lies from step 3 on: the batch is smaller
        with book.measure("same key", step) as m:
            _step(model, opt, loss_fn, x[:n], y[:n])
        sources.append(m.source)
    assert sources == ["counted", "counted", "replayed", "counted", "counted"]
    (drift,) = book.summary()["drifts"]
    assert drift["step"] == 3 and drift["bytes_after"] < drift["bytes_before"]
    assert book.replay("same key").bytes == drift["bytes_after"]
    assert not book.must_count("same key")  # steps 3 and 4 agree: confirmed again


def test_start_and_stop_span_a_step_made_of_separate_calls_and_a_failed_step_leaves_no_trace() -> None:
    model, opt, batch, loss_fn = _digits_cnn()
    _step(model, opt, loss_fn, *batch())
    book = TrafficBook(model)
    x, y = batch()
    with book.measure("k", 0) as ref:
        _step(model, opt, loss_fn, x, y)
    m = book.start("k", 1)  # e.g. in autocast()
    loss = loss_fn(model(x), y)
    loss.backward()  # in backward()
    opt.step()
    opt.zero_grad()
    assert book.stop(m) is m.traffic  # in step(), before the ledger records the step
    assert m.source == "counted" and m.traffic.to_dict() == ref.traffic.to_dict()
    with pytest.raises(CountingError, match="not the open one"):
        book.stop(m)
    m = book.start("k", 2)
    with pytest.raises(CountingError, match="still being measured"):
        book.start("k", 3)
    book.abort(m)
    with pytest.raises(RuntimeError, match="boom"), book.measure("other", 3):
        model(x)
        raise RuntimeError("boom")
    assert book.summary()["counted"] == 2 and book.keys() == ["k"]
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    assert _get_current_dispatch_mode() is None  # no counter left active


def test_counting_can_start_in_the_models_own_forward_pre_hook_and_an_atypical_step_is_not_kept() -> None:
    """The controller sees a step's inputs first in the root module's forward pre-hook: it starts there."""
    model, opt, batch, loss_fn = _digits_cnn()
    _step(model, opt, loss_fn, *batch())
    x, y = batch()
    ref_counter = TrafficCounter(model)
    with ref_counter:
        _step(model, opt, loss_fn, x, y)
    ref = ref_counter.pop()
    book, open_ = TrafficBook(model), {}

    def pre_hook(module, args, kwargs):
        open_["m"] = book.start(input_signature(args, kwargs), 0, running=module)

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    _step(model, opt, loss_fn, x, y)
    handle.remove()
    t = book.stop(open_["m"], keep=False)  # e.g. a step whose update the guard skipped
    assert t.to_dict() == ref.to_dict()  # the root's own ops (flatten, relu) are the root's, as from outside
    assert "" in t.bytes_by("module")
    assert book.keys() == [] and book.summary()["counted_steps"] == [0]
    with pytest.raises(CountingError, match="enter it first"):
        TrafficCounter(model).running(model)


def test_book_state_round_trips_through_a_weights_only_checkpoint() -> None:
    model, opt, batch, loss_fn = _digits_cnn()
    book = TrafficBook(model, recount_every=5)
    x, y = batch()
    _step(model, opt, loss_fn, x, y)
    for step in range(3):
        with book.measure("k", step):
            _step(model, opt, loss_fn, x, y)
    buf = io.BytesIO()
    torch.save(book.state_dict(), buf)
    buf.seek(0)
    other = TrafficBook(model)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.summary() == book.summary()
    assert other.replay("k").to_dict() == book.replay("k").to_dict()
    with other.measure("k", 3) as m:  # resumed: replays where the original would
        _step(model, opt, loss_fn, x, y)
    assert m.source == "replayed"
    with pytest.raises(CheckpointError, match="missing keys"):
        other.load_state_dict({"entries": []})
    with pytest.raises(CountingError, match="malformed"):
        other.load_state_dict({"version": 1, "entries": [["k", {"traffic": {"counts": [[1]]}, "counted_at": 0,
                                                                    "replays": 0}]], "counted": 0, "replayed": 0})
    assert other.replay("k") is not None  # a bad state changed nothing


def test_user_mistakes_raise_clear_errors() -> None:
    model = nn.Linear(2, 2)
    book = TrafficBook(model)
    with pytest.raises(AdaprecError, match="must be a string"), book.measure(("plan", 3), 0):
        pass
    with pytest.raises(AdaprecError, match="recount_every"):
        TrafficBook(model, recount_every=-1)
    with pytest.raises(AdaprecError, match="nn.Module"):
        TrafficCounter("model")
    with pytest.raises(AdaprecError, match="unknown phases"):
        StepTraffic().without("update")
    with pytest.raises(AdaprecError, match="bytes_by"):
        StepTraffic().bytes_by("bits")
    with pytest.raises(AdaprecError, match="bytes source"):
        StepTraffic().apply_to(StepCost(), "guessed")
    counter = TrafficCounter(model)
    with pytest.raises(AdaprecError, match="nest"), counter, counter:
        pass
    with counter:  # usable again after the error
        model(torch.randn(1, 2))
    assert counter.pop().bytes > 0
    cost = StepTraffic().apply_to(StepCost(), "counted")
    with pytest.raises(AdaprecError, match="once"):
        StepTraffic().apply_to(cost, "counted")


def test_a_plain_training_loop_with_the_book_and_the_ledger() -> None:
    """How the controller wires it: count some steps, replay the rest, price every step's bytes."""
    model, opt, batch, loss_fn = _char_lm()
    book, ledger, macs = TrafficBook(model, recount_every=2), EnergyLedger("7nm"), MacCounter(model)
    plan = PrecisionPlan()
    for step in range(4):
        x, y = batch()
        key = f"{plan.summary()}|{input_signature(x, y)}"
        with macs, book.measure(key, step) as m:
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        ledger.record(step, plan, m.traffic.apply_to(macs.pop_step_cost(), m.source))
    s = ledger.summary()
    # steps 0 (Adam's state created) and 1 disagree; 2 confirms 1; 3 is replayed
    assert s["bytes_steps"] == {"counted": 3, "replayed": 1, "modeled": 0}
    assert s["byte_coverage"] == 1.0
    assert s["memory_j"] == pytest.approx(s["bytes"] * load_profile("7nm").pj_per_byte * 1e-12)
    assert "op-level count" in s["kind"]["bytes"]
    assert any("op-level count" in a for a in s["assumptions"])
    # every module of the model that moved data is in the ledger, with its bytes
    assert {"tok", "blocks.0.ln1", "blocks.0.attn", "blocks.1.fc2", "head", OUTSIDE} <= set(s["modules"])


# --- the definition, by hand ------------------------------------------------------------------------------------
def _count(fn, *tensors) -> StepTraffic:
    holder = nn.Module()
    counter = TrafficCounter(holder)
    with counter:
        fn(*tensors)
    return counter.pop()


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.int32, torch.int64,
          torch.uint8]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_costs_its_width(dtype) -> None:
    x = torch.ones(5, 7, dtype=dtype)
    t = _count(lambda a: a.clone(), x)
    assert t.bytes == 2 * 35 * x.element_size()
    assert set(t.bytes_by("dtype")) == {dtype_label(dtype)}


def test_a_bf16_tensor_costs_half_the_bytes_of_fp32() -> None:
    x32, y32 = torch.randn(64, 33), torch.randn(64, 33)
    b32 = _count(lambda a, b: F.gelu(a * b + a).sum(), x32, y32).bytes
    b16 = _count(lambda a, b: F.gelu(a * b + a).sum(), x32.bfloat16(), y32.bfloat16()).bytes
    assert b16 * 2 == b32
    assert dtype_label(torch.bfloat16) == "bf16" and dtype_label(torch.float32) == "fp32"


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 9), n=st.integers(1, 9), k=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_elementwise_and_matmul_bytes_are_inputs_plus_outputs(m, n, k, dtype) -> None:
    a, b, c = torch.ones(m, k, dtype=dtype), torch.ones(k, n, dtype=dtype), torch.ones(m, n, dtype=dtype)
    e = a.element_size()
    t = _count(lambda a, b, c: (a @ b) * c, a, b, c)
    assert t.bytes == e * ((m * k + k * n + m * n) + (m * n + m * n + m * n))
    assert t.bytes_by("op_class") == {"gemm": e * (m * k + k * n + m * n), "elementwise": 3 * e * m * n}
    assert t.bytes_by("direction") == {"read": e * (m * k + k * n + 2 * m * n), "write": 2 * e * m * n}


VIEWS = {
    "view": lambda x: x.view(6, 4), "reshape": lambda x: x.reshape(2, 12), "t": lambda x: x.t(),
    "transpose": lambda x: x.transpose(0, 1), "permute": lambda x: x.permute(1, 0), "expand": lambda x: x[:1].expand(5, 8),
    "narrow": lambda x: x.narrow(0, 1, 2), "slice": lambda x: x[1:, ::2], "select": lambda x: x[2],
    "unsqueeze": lambda x: x.unsqueeze(0), "squeeze": lambda x: x.unsqueeze(0).squeeze(0), "detach": lambda x: x.detach(),
    "as_strided": lambda x: x.as_strided((2, 2), (1, 2)), "split": lambda x: x.split(1), "chunk": lambda x: x.chunk(3),
    "unbind": lambda x: x.unbind(0), "diagonal": lambda x: x.diagonal(), "flatten": lambda x: x.flatten(),
    "view_as_bf16_reinterpret": lambda x: x.view(torch.int32), "unflatten": lambda x: x.unflatten(1, (2, 4)),
}


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_views_and_metadata_cost_nothing(name) -> None:
    x = torch.randn(6, 4) if name in ("view", "reshape") else torch.randn(3, 8)
    t = _count(VIEWS[name], x)
    assert t.bytes == 0
    assert t.calls.get("view", 0) >= 1


def test_in_place_out_and_overwrite_ops_by_hand() -> None:
    x, y, z = torch.randn(10), torch.randn(10), torch.empty(10)
    n4 = 40
    assert _count(lambda a, b: a.add_(b), x, y).bytes == 3 * n4  # reads x, y; writes x
    assert _count(lambda a: a.mul_(2), x).bytes == 2 * n4
    assert _count(lambda a, b, c: torch.add(a, b, out=c), x, y, z).bytes == 3 * n4  # out= is written, not read
    assert _count(lambda a, b: a.copy_(b), x, y).bytes == 2 * n4  # copy_ overwrites: x is not read
    assert _count(lambda a: a.fill_(1.0), x).bytes == n4
    assert _count(lambda a: a.zero_(), x).bytes == n4
    assert _count(lambda: torch.empty(1000)).bytes == 0  # allocation is no traffic
    assert _count(lambda: torch.zeros(1000)).bytes == 4000
    assert _count(lambda a: torch.zeros_like(a), x).bytes == n4  # the template is not read
    t = _count(lambda a: a.to(torch.bfloat16), x)
    assert t.bytes == n4 + 20 and t.bytes_by("op_class") == {"cast": 60}
    assert _count(lambda a: a.to(torch.float32, copy=True), x).bytes_by("op_class") == {"copy": 80}
    ps = [torch.randn(3), torch.randn(5)]
    assert _count(lambda a: torch._foreach_mul_(a, 0.5), ps).bytes == 2 * 8 * 4  # foreach in place: read + write


def test_a_gather_reads_the_rows_it_gathers_and_a_broadcast_is_read_once() -> None:
    table, idx = torch.randn(1000, 16), torch.tensor([3, 5, 5, 7])
    t = _count(F.embedding, idx, table)
    assert t.bytes == 4 * 16 * 4 + 4 * 8 + 4 * 16 * 4  # rows read, indices read, rows written
    assert t.bytes_by("op_class") == {"gather": t.bytes}
    x, b = torch.randn(50, 16), torch.randn(16)
    assert _count(lambda a, c: a + c, x, b).bytes == (800 + 16 + 800) * 4
    assert _count(lambda a, c: a + c.expand(50, 16), x, b).bytes == (800 + 16 + 800) * 4
    assert _count(lambda a: a.sum(), x.expand(3, 50, 16)).bytes == 800 * 4 + 4


CLASSES = {
    "gemm": lambda: torch.randn(3, 4) @ torch.randn(4, 5),
    "normalization": lambda: F.layer_norm(torch.randn(3, 4), (4,)),
    "softmax": lambda: torch.randn(3, 4).softmax(-1),
    "reduction": lambda: torch.randn(3, 4).amax(-1),
    "loss": lambda: F.nll_loss(torch.randn(3, 4), torch.tensor([0, 1, 2])),
    "elementwise": lambda: torch.randn(3, 4).exp(),
    "copy": lambda: torch.cat([torch.randn(3), torch.randn(2)]),
    "cast": lambda: torch.randn(3).half(),
    "gather": lambda: torch.randn(5, 2).index_select(0, torch.tensor([1, 3])),
    "scatter": lambda: torch.zeros(5).index_add_(0, torch.tensor([1, 3]), torch.ones(2)),
    "attention": lambda: F.scaled_dot_product_attention(*torch.randn(3, 1, 2, 4, 8)),
    "gemm ": lambda: F.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)),
}


@pytest.mark.parametrize("want", sorted(CLASSES))
def test_ops_are_classified(want) -> None:
    holder = nn.Module()
    counter = TrafficCounter(holder)
    x = CLASSES[want]
    with counter:
        x()
    by = counter.pop().bytes_by("op_class")
    assert want.strip() in by
    assert set(by) <= set(OP_CLASSES)


def test_classify_uses_names_then_tags() -> None:
    aten = torch.ops.aten
    assert classify(aten.gelu_backward.default) == "elementwise"
    assert classify(aten.native_layer_norm_backward.default) == "normalization"
    assert classify(aten._unsafe_view.default) == "view"
    assert classify(aten.embedding_dense_backward.default) == "scatter"
    assert classify(aten.convolution_backward.default) == "gemm"
    assert classify(aten._int_mm.default) == "gemm"
    assert classify(aten._amp_foreach_non_finite_check_and_unscale_.default) == "elementwise"
    assert classify(torch.ops.profiler._record_function_exit._RecordFunction) == "view"  # a profiler marker moves nothing


# --- attribution --------------------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))


@pytest.mark.parametrize("foreach", [False, True])
def test_backward_and_optimizer_ops_go_to_the_module_that_owns_them(foreach) -> None:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=foreach)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    _step(model, opt, F.mse_loss, x, y)
    counter = TrafficCounter(model)
    with counter:
        _step(model, opt, F.mse_loss, x, y)
    t = counter.pop()
    fwd = {m: b for (m, ph, *_), b in _by(t, "module", "phase").items() if ph == "forward"}
    bwd = {m: b for (m, ph, *_), b in _by(t, "module", "phase").items() if ph == "backward"}
    assert {"0", "1", "2", "3", OUTSIDE} <= set(fwd)
    assert {"0", "1", "2", "3", OUTSIDE} <= set(bwd)  # the loss's backward goes where the loss ran
    classes = {(k[0], k[1], k[2]) for k in t.counts}
    assert ("1", "backward", "normalization") in classes and ("2", "backward", "elementwise") in classes
    assert ("0", "backward", "gemm") in classes and ("3", "backward", "gemm") in classes
    # the optimizer moves the same bytes per parameter in every module
    opt_bytes = {k[0]: 0 for k in t.counts if k[1] == "optimizer"}
    for k, n in t.counts.items():
        if k[1] == "optimizer":
            opt_bytes[k[0]] += n * k[4] // 8
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    shared = opt_bytes.pop(OPTIMIZER, 0)  # foreach: the constant 1 added to every step counter, once
    assert shared <= 4
    per_param = {m: opt_bytes[m] / params[m] for m in opt_bytes}
    assert set(per_param) == {"0", "1", "3"}
    if not foreach:  # the single-tensor loop runs the same ops for each parameter
        assert max(per_param.values()) == pytest.approx(min(per_param.values()), rel=0.05)
    assert all(k[2] == "optimizer" for k in t.counts if k[1] == "optimizer")


def _by(t: StepTraffic, *fields: str) -> dict[tuple, int]:
    names = ("module", "phase", "op_class", "dtype", "bits", "direction")
    out: dict[tuple, int] = {}
    for k, n in t.counts.items():
        key = tuple(k[names.index(f)] for f in fields)
        out[key] = out.get(key, 0) + n * k[4] // 8
    return out


def test_counting_changes_no_number_and_leaves_no_hook_behind() -> None:
    model = _mlp()
    x = torch.randn(4, 8)
    ref = model(x)
    ref.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    counter = TrafficCounter(model)
    with counter:
        out = model(x)
        out.sum().backward()
    assert torch.equal(out, ref)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    from torch.nn.modules import module as module_mod

    assert not module_mod._global_forward_hooks and not module_mod._global_forward_pre_hooks
    assert counter.pop().bytes > 0 and counter.pop().bytes == 0


def test_a_region_names_the_ops_of_the_training_loop_itself() -> None:
    model = _mlp()
    counter = TrafficCounter(model)
    with counter:
        model(torch.randn(4, 8)).sum().backward()
        with counter.region("(adaprec: unscale)"):
            for p in model.parameters():
                p.grad.mul_(0.5)
    t = counter.pop()
    n = sum(p.numel() for p in model.parameters())
    assert t.bytes_by("module")["(adaprec: unscale)"] == 2 * 4 * n


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(
    st.tuples(st.sampled_from(["a", "b.c", OUTSIDE]), st.sampled_from(["forward", "backward", "optimizer"]),
              st.sampled_from(["gemm", "elementwise", "cast"]), st.sampled_from([("fp32", 32), ("bf16", 16), ("int8", 8)]),
              st.sampled_from(["read", "write"])),
    st.integers(0, 10**9), max_size=12))
def test_step_traffic_totals_agree_and_round_trip(entries) -> None:
    t = StepTraffic({(m, ph, c, d, b, di): n for (m, ph, c, (d, b), di), n in entries.items()})
    for f in ("module", "phase", "op_class", "dtype", "direction"):
        assert sum(t.bytes_by(f).values()) == t.bytes
    assert StepTraffic.from_dict(t.to_dict()) == t
    assert t.without("optimizer").bytes == t.bytes - t.bytes_by("phase").get("optimizer", 0)
    cost = t.apply_to(StepCost(), "replayed")
    assert cost.op_bytes == t.bytes
    assert price_step(cost, load_profile("7nm")).total("bytes_moved") == t.bytes


def test_skipped_optimizer_update_drops_its_phase() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    counter = TrafficCounter(model)
    with counter:
        _step(model, opt, F.mse_loss, torch.randn(4, 8), torch.randn(4, 4))
    t = counter.pop()
    rest = t.without("optimizer")
    assert 0 < rest.bytes < t.bytes
    assert rest.bytes == t.bytes - t.bytes_by("phase")["optimizer"]


# --- formats as they ran, in the ledger ------------------------------------------------------------------------------
def _engine_step(plan: str, caps: Capabilities | None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 16)
    eng = PrecisionEngine(model, backend="auto" if caps else "emulate", capabilities=caps)
    eng.discover(x)
    eng.set_plan(PrecisionPlan.uniform(eng.kinds, plan))
    eng.begin_step(0, False)
    counter = TrafficCounter(model)
    with counter:
        with eng.activate():
            y = model(x)
        y.square().mean().backward()
        eng.commit_backward()
        opt.step()
    return counter.pop().apply_to(eng.pop_step_cost(), "counted"), eng.plan


def test_native_bf16_gemms_are_priced_as_bf16_bytes_and_emulated_formats_as_fp32() -> None:
    bf16_fast = Capabilities(native={"gemm": frozenset({"bf16"})}, fast={"gemm": frozenset({"bf16"})})
    native, plan = _engine_step("bf16", bf16_fast)
    p = load_profile("7nm")
    priced = price_step(native, p)
    by_fmt = priced.bytes_by_format()
    assert by_fmt.get("bf16", 0) > 0  # operands and results of the bf16 GEMMs, in 2 bytes
    assert priced.bytes_by_class().get("cast", 0) > 0  # the casts into bf16 are traffic too
    # the fp32 counterfactual: no casts, every bf16 element at 4 bytes
    bf16_elsewhere = sum(n * 2 for m in native.modules.values() for k, n in m.ops.items()
                         if k[2] == "bf16" and k[1] != "cast")
    want = priced.total("bytes_moved") - priced.bytes_by_class()["cast"] + bf16_elsewhere
    assert price_step(native, p, "fp32").total("bytes_moved") == want
    # emulated: the GEMMs ran on fp32 tensors and are priced so; the rounding passes are the ops they were
    emulated, _ = _engine_step("fp8", None)
    gemm_dtypes = {k[2] for m in emulated.modules.values() for k in m.ops if k[1] == "gemm"}
    assert gemm_dtypes == {"fp32"}
    ledger = EnergyLedger("7nm")
    ledger.record(0, plan, native)
    s = ledger.summary()
    assert s["bytes_by_format"]["bf16"] == by_fmt["bf16"]
    assert s["byte_coverage"] == 1.0


def test_counterfactuals_reprice_op_bytes_by_hand() -> None:
    cost = StepCost()
    cost.add_op_traffic("m", "forward", "elementwise", "bf16", 16, "read", 100)
    cost.add_op_traffic("m", "forward", "gemm", "int8", 8, "read", 10)
    cost.add_op_traffic("m", "forward", "cast", "fp32", 32, "read", 7)
    cost.add_op_traffic("m", "forward", "gather", "int64", 64, "read", 3)
    cost.bytes_source = "counted"
    p = load_profile("7nm")
    assert price_step(cost, p).total("bytes_moved") == 200 + 10 + 28 + 24
    assert price_step(cost, p, "fp32").total("bytes_moved") == 400 + 40 + 0 + 24  # casts dropped, ints kept
    assert price_step(cost, p, "bf16").total("bytes_moved") == 400 + 20 + 0 + 24
    with pytest.raises(CountingError, match="op class"):
        cost.add_op_traffic("m", "forward", "magic", "fp32", 32, "read", 1)
    assert StepCost.from_dict(cost.to_dict()).signature() == cost.signature()
    assert StepCost.from_dict(cost.to_dict()).bytes_source == "counted"


def test_without_an_op_count_the_ledger_says_its_bytes_are_gemm_operands_only() -> None:
    model = _mlp()
    with MacCounter(model) as c:
        model(torch.randn(4, 8)).sum().backward()
    ledger = EnergyLedger("7nm")
    ledger.record(0, PrecisionPlan(), c.pop_step_cost())
    s = ledger.summary()
    assert s["byte_coverage"] == 0.0 and s["bytes"] > 0
    assert s["bytes_steps"] == {"counted": 0, "replayed": 0, "modeled": 1}
    assert "GEMM operands only" in s["kind"]["bytes"]
    state = ledger.state_dict()
    other = EnergyLedger("7nm")
    other.load_state_dict(state)
    assert other.summary()["bytes_by_class"] == s["bytes_by_class"]
