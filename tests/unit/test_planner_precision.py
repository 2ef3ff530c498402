"""The planner's low-precision decision: bf16 considered by default, kept only where its passes
are faster and it moves the samples no more than the plan's tolerance does, and the plan says
why (issue 19 item 4)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import tarflow.sampling.planner as planner_module
from tarflow.model import Guidance
from tarflow.sampling import SEQUENTIAL, BlockSchedule, Plan, PlanCache, relative_residual, sample
from tarflow.sampling.sample_set import fixed_inputs
from tarflow.sampling.settings import parse_sampler
from tests.unit.conftest import make_model
from tests.unit.test_planner import RANKING

COSTS = {SEQUENTIAL: 9.0, 1: 3.0, 2: 2.0, 4: 1.0, 8: 1.5, 16: 0.5}


class LowCosts:
    """Injected candidate costs: ``COSTS`` per segment count, times ``low`` for a candidate with
    a low-precision network, times 2 without freezing. Records the candidates timed."""

    def __init__(self, low: float) -> None:
        self.low, self.seen = low, []

    def __call__(self, block: int, cand: BlockSchedule, seconds: float) -> float:
        self.seen.append(cand)
        return (COSTS[cand.segments] * (self.low if cand.net_dtype else 1.0)
                * (1.0 if cand.freeze else 2.0))


@pytest.fixture
def pass_ratio(monkeypatch):
    """Set the pass probe's bf16 / full-precision ratio (the real probe times this CPU)."""
    ratio = {"value": 1.0, "calls": []}

    def fake(model, nets, noise, y, guidance):
        ratio["calls"].append(sorted(nets))
        out = {(None, f): 1e-3 for f in ("long", "short", "one")}
        out |= {(d, f): 1e-3 * ratio["value"] for d in nets for f in ("long", "short", "one")}
        return out

    monkeypatch.setattr(planner_module, "pass_seconds", fake)
    return ratio


def _model():
    return make_model(3, dtype=torch.float32, num_blocks=4)


def _plan(config: dict, low: float = 0.5, model=None) -> tuple[Plan, LowCosts]:
    timer = LowCosts(low)
    settings = parse_sampler({"schedule": "auto", "guidance": 1.0, **config})
    plan = settings.schedule_for(model or _model(), RANKING, 2, timer=timer)[1]
    return plan, timer


def _low_blocks(plan: Plan) -> list[int]:
    return [b for b in range(4) if plan.schedule.for_block(b).net_dtype == "bfloat16"
            and not plan.schedule.for_block(b).is_sequential(16)]


def test_default_auto_considers_bf16_and_keeps_it_where_faster_and_accurate(pass_ratio):
    pass_ratio["value"] = 0.6
    plan, timer = _plan({"tol": 1e-2})  # no net_dtype key: the default
    note = plan.precision
    assert pass_ratio["calls"] == [["bfloat16"]]  # the probe timed a bf16 copy
    assert note.considered and note.kept and note.gate and note.dtypes == ["bfloat16"]
    assert note.pass_ratio["bfloat16"]["long"] == pytest.approx(0.6)
    assert _low_blocks(plan) == sorted(note.blocks) and note.blocks  # what the plan runs
    # The recorded errors are the tolerance metric, on the first probe noise, between this plan
    # and it in full precision, and between that and the sequential loop (the bound).
    model = _model()
    noise, y = fixed_inputs(model, range(2), 0)  # the planner's probe: members 0, 1 of the set
    low = sample(model, noise, y, plan.schedule, guidance=1.0)[0]
    full = sample(model, noise, y, plan.schedule.with_settings(net_dtype=None), guidance=1.0)[0]
    exact = sample(model, noise, y, guidance=1.0)[0]
    assert note.error == pytest.approx(float(relative_residual(full, low).max()), rel=1e-3)
    assert note.full_error == pytest.approx(float(relative_residual(exact, full).max()),
                                            rel=1e-3)
    assert note.bound == max(1e-2, note.full_error) and 0 < note.error <= note.bound
    line = plan.table().splitlines()[1]
    assert line.startswith("bf16: considered, kept in block(s)") and "0.60x" in line
    assert f"{note.error:.1e}" in line and f"{note.full_error:.1e}" in line


def test_a_bf16_pass_that_is_not_faster_is_never_timed_and_the_plan_says_so(pass_ratio):
    pass_ratio["value"] = 1.1
    plan, timer = _plan({"tol": 1e-2, "net_dtype": "auto"})
    note = plan.precision
    assert note.considered and not note.kept and note.error is None and not note.blocks
    assert all(c.net_dtype is None for c in timer.seen) and not _low_blocks(plan)
    assert "not faster on this device" in note.reason
    assert "1.10x" in plan.table().splitlines()[1]


def test_an_inaccurate_bf16_plan_is_dropped_and_planned_again_in_full_precision(pass_ratio):
    pass_ratio["value"] = 0.6
    # At tol = 0 the full-precision plan is exact (to rounding); bf16 rounding is not.
    plan, timer = _plan({"tol": 0.0})
    note = plan.precision
    assert note.considered and not note.kept and note.blocks and note.full_error < 1e-9
    assert note.error > 1e-6 and note.bound == note.full_error
    assert "too inaccurate" in note.reason and f"{note.error:.1e}" in note.reason
    assert not _low_blocks(plan)  # the final schedule runs no bf16 network ...
    assert all(c.label.find("bf16") < 0 for bp in plan.blocks for c in bp.candidates)
    assert any(c.net_dtype for c in timer.seen)  # ... though bf16 was timed first


@pytest.mark.parametrize(("errors", "kept"), [((0.5, 0.1), False), ((0.05, 0.1), True),
                                              ((0.05, 0.0), False), ((0.03, 0.0), True)])
def test_the_bound_is_tol_or_the_full_precision_plans_own_error(pass_ratio, monkeypatch,
                                                                 errors, kept):
    pass_ratio["value"] = 0.6
    monkeypatch.setattr(planner_module, "precision_errors", lambda *a, **kw: errors)
    note = _plan({"tol": 0.04})[0].precision
    assert note.kept == kept and note.bound == max(0.04, errors[1])


def test_net_dtype_float32_never_considers_bf16(pass_ratio):
    pass_ratio["value"] = 0.1  # however fast it would be
    plan, timer = _plan({"tol": 1e-2, "net_dtype": "float32"})
    assert pass_ratio["calls"] == [[]] and all(c.net_dtype is None for c in timer.seen)
    assert not plan.precision.considered and not _low_blocks(plan)
    assert plan.table().splitlines()[1] == "low precision: not considered (not allowed by " \
                                           "net_dtype)"


def test_net_dtype_bfloat16_forces_it_without_the_accuracy_check(pass_ratio):
    pass_ratio["value"] = 0.6
    plan, _ = _plan({"tol": 0.0, "net_dtype": "bf16"})
    note = plan.precision
    assert note.kept and not note.gate and _low_blocks(plan) and note.error > note.bound
    assert "forced by net_dtype" in note.reason and "ABOVE the bound" in note.reason


def test_a_model_already_in_bf16_does_not_consider_it(pass_ratio):
    plan, _ = _plan({"tol": 1e-2}, model=_model().to(torch.bfloat16))
    assert not plan.precision.considered and "already runs in bfloat16" in plan.precision.reason


def test_bad_net_dtype_is_refused_in_one_line():
    for bad in ("bf61", "int8", 3):
        with pytest.raises(ValueError, match="unknown net_dtype") as err:
            parse_sampler({"schedule": "auto", "net_dtype": bad})
        assert "\n" not in str(err.value) and "auto" in str(err.value)
    assert parse_sampler({"schedule": "auto", "net_dtype": None}).net_dtype == "auto"
    assert parse_sampler({"schedule": "auto", "net_dtype": "fp32"}).net_dtype == "float32"
    # Fixed schedules: auto means the model's own precision, a dtype is applied to every block.
    assert parse_sampler({"schedule": "jacobi"}).schedule.default.net_dtype is None
    assert parse_sampler({"schedule": "jacobi", "net_dtype": "bf16"}).schedule.default.net_dtype \
        == "bfloat16"


def test_plan_keys_separate_the_precision_modes_and_older_plans_are_not_reused(tmp_path,
                                                                               pass_ratio):
    model = _model()
    keys = [parse_sampler({"schedule": "auto", "net_dtype": d}).plan_key(model, 2)
            for d in ("auto", "float32", "bfloat16")]
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == 3
    assert keys[0]["net_dtypes"] == ["bfloat16"] and keys[0]["precision_gate"] is True
    assert keys[2]["precision_gate"] is False and keys[1]["net_dtypes"] == []
    # A plan stored before this change (version 1, no precision record) under today's key is a
    # miss, so it is planned again rather than reused with other semantics.
    pass_ratio["value"] = 0.6
    plan, _ = _plan({"tol": 1e-2})
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.precision == plan.precision  # the record round-trips
    old = plan.to_dict()
    old["version"] = 1
    del old["precision"]
    path = tmp_path / "plans.json"
    path.write_text(json.dumps({"version": 1, "plans": {json.dumps(keys[0], sort_keys=True):
                                                        old}}))
    assert PlanCache(path).get(keys[0]) is None


def test_plan_schedule_direct_callers_keep_full_precision_unless_they_ask():
    from tarflow.sampling import plan_schedule

    plan = plan_schedule(_model(), RANKING, batch_size=2, tol=1e-4, guidance=Guidance(1.0),
                         timer=LowCosts(0.5))
    assert not plan.precision.considered and not _low_blocks(plan)


def test_bench_auto_prints_whether_bf16_was_considered_and_why(tmp_path, capsys):
    from tarflow.cli import bench

    args = ["--preset", "tiny", "--batch", "2", "--tol", "1e-4", "--repeats", "1",
            "--warmup", "0", "--probe", "8", "--plan-cache", "", "--json",
            str(tmp_path / "rows.json")]
    bench.main([*args, "--methods", "auto", "auto@fp32"])
    out = capsys.readouterr().out
    auto = out[out.index("auto at batch 2:"):out.index("auto@float32 at batch 2:")]
    # This CPU decides kept or dropped; either way the plan names the verdict and the ratio.
    assert re.search(r"^bf16: considered, (kept in block\(s\) [\d, ]+|dropped): .+ \(bf16 pass "
                     r"/ full-precision pass: Jacobi \d+\.\d\dx, GS \d+\.\d\dx", auto, re.M)
    assert "low precision: not considered (not allowed by net_dtype)" in out.split(
        "auto@float32 at batch 2:")[1]
