"""Timeline: recording, plans at a step, JSON/CSV, state."""

import csv
import io

import pytest
import torch

from adaprec.errors import CheckpointError, PlanError
from adaprec.plan import PrecisionPlan, TensorRecipe
from adaprec.timeline import Timeline, TimelineEvent

P0 = PrecisionPlan.uniform(["a", "b"], "bf16")
P1 = P0.with_role("a", "weight", TensorRecipe("fp8_e4m3", scaling="block", block_size=16))
P2 = P1.with_role("b", "grad_output", TensorRecipe("fp8_e5m2", rounding="stochastic", scaling="tensor"))


def recorded():
    tl = Timeline()
    tl.record_plan_change(3, P0, P1, "error-budget", {("a", "weight"): "sqnr 31.0 dB >= 20.0 dB for 3 checks"})
    assert tl.record_plan_change(4, P1, P1, "error-budget", {}) == []
    tl.record_plan_change(9, P1, P2, "error-budget", {})
    return tl


def test_events_and_plans_at():
    tl = recorded()
    assert len(tl) == 2 and tl.initial == P0
    ev = tl.events[0]
    assert (ev.step, ev.module, ev.role, ev.old, ev.new) == (3, "a", "weight", "bf16", "fp8_e4m3/block")
    assert ev.reason.startswith("sqnr 31.0")
    assert tl.plans_at(0) == P0 and tl.plans_at(3) == P1 and tl.plans_at(8) == P1 and tl.plans_at(100) == P2
    assert tl.plans_at(3).get("a").weight.block_size == 16  # full recipe, not just the short string


def test_json_round_trip_string_and_file(tmp_path):
    tl = recorded()
    assert Timeline.from_json(tl.to_json()) == tl
    path = tmp_path / "tl.json"
    tl.to_json(path)
    assert Timeline.from_json(path) == tl and Timeline.from_json(str(path)) == tl
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_csv_rows(tmp_path):
    tl = recorded()
    rows = list(csv.DictReader(io.StringIO(tl.to_csv(tmp_path / "tl.csv"))))
    assert [r["step"] for r in rows] == ["3", "9"]
    assert rows[1]["new"] == "fp8_e5m2/sr/tensor" and rows[0]["policy"] == "error-budget"
    assert (tmp_path / "tl.csv").read_text() == tl.to_csv()


def test_state_dict_through_torch_save():
    tl = recorded()
    buf = io.BytesIO()
    torch.save(tl.state_dict(), buf)
    buf.seek(0)
    other = Timeline()
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other == tl and other.plans_at(9) == P2


def test_errors():
    with pytest.raises(CheckpointError, match="parse"):
        Timeline.from_json("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        Timeline.from_json("/nonexistent/timeline.json")
    with pytest.raises(CheckpointError, match="events"):
        Timeline.from_dict({"initial": None})
    with pytest.raises(PlanError, match="initial"):
        Timeline().plans_at(3)
    assert isinstance(recorded().events[0], TimelineEvent)
