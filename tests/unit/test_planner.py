"""The sampling planner: choices follow measured cost, plans round-trip and are cached."""

from __future__ import annotations

import json

import pytest
import torch

from tarflow.model import Guidance
from tarflow.sampling import (
    SEQUENTIAL,
    BlockRank,
    BlockSchedule,
    Plan,
    PlanCache,
    SamplingSchedule,
    gs_jacobi_block,
    plan_key,
    plan_schedule,
    ranking_moved,
    sample,
)
from tarflow.sampling.settings import parse_sampler
from tests.unit.conftest import make_model

# Block 1 is tough (share 70% >= 1.5 x 25%); block 3 prefers the zeros guess.
RANKING = [BlockRank(0, 1.0, 10.0, {"z": 1.0, "zeros": 2.0}),
           BlockRank(1, 7.0, 70.0, {"z": 1.0, "zeros": 2.0}),
           BlockRank(2, 1.0, 10.0, {"z": 1.0, "zeros": 2.0}),
           BlockRank(3, 1.0, 10.0, {"z": 2.0, "zeros": 1.0})]


def _model():
    return make_model(3, dtype=torch.float32, num_blocks=4)


class Costs:
    """An injected timer: a cost per segment count (SEQUENTIAL for the loop), or a list of
    costs taken in turn by a block's successive runs of it; Jacobi without freezing costs
    ``nofreeze`` times as much. Records calls."""

    def __init__(self, costs: dict[int, float | list[float]], nofreeze: float = 2.0) -> None:
        self.costs, self.nofreeze, self.calls = costs, nofreeze, []

    def __call__(self, block: int, cand: BlockSchedule, seconds: float) -> float:
        cost = self.costs[cand.segments]
        if isinstance(cost, list):
            cost = cost[self.calls.count((block, cand.segments))]
        if not cand.freeze:
            cost *= self.nofreeze
        self.calls.append((block, cand.segments) if cand.freeze else (block, "nofreeze"))
        return cost


def _plan(costs: dict[int, float], nofreeze: float = 2.0, **kw) -> tuple[Plan, Costs]:
    timer = Costs(costs, nofreeze)
    plan = plan_schedule(_model(), RANKING, batch_size=2, tol=1e-4, guidance=Guidance(1.0),
                         timer=timer, **kw)
    return plan, timer


def test_picks_the_sequential_loop_when_it_is_cheapest():
    plan, _ = _plan({SEQUENTIAL: 1.0, 1: 3.0, 2: 2.0, 4: 2.5, 8: 4.0, 16: 5.0})
    assert all(plan.schedule.for_block(b).is_sequential(16) for b in range(4))
    assert plan.predicted_seconds == pytest.approx(4.0)
    assert plan.sequential_seconds == pytest.approx(4.0) and plan.predicted_speedup == 1.0


def test_picks_gs_segments_for_the_tough_block_when_they_are_cheapest():
    plan, timer = _plan({SEQUENTIAL: 9.0, 1: 3.0, 2: 2.0, 4: 1.0, 8: 1.5, 16: 0.5})
    s = plan.schedule
    assert s.for_block(1).segments == 4  # the walk stopped at 8 (slower than 4) ...
    assert (1, 16) not in timer.calls  # ... so 16 segments were never tried
    assert all(s.for_block(b).segments == 1 for b in (0, 2, 3))  # no segments off the prior
    assert s.for_block(3).init == "zeros" and s.for_block(0).init == "z"  # the IGM's guess
    assert {c.label for c in plan.blocks[1].candidates} == {"S1", "seq", "S2", "S4", "S8"}
    assert "S1/zeros/nofreeze" in {c.label for c in plan.blocks[3].candidates}  # first planned
    assert plan.blocks[1].choice == "S4"
    assert plan.predicted_seconds == pytest.approx(1.0 + 3 * 3.0)
    assert plan.predicted_speedup == pytest.approx(36.0 / 10.0)


def test_jacobi_without_freezing_is_tried_on_the_first_block_and_kept_where_it_won():
    plan, timer = _plan({SEQUENTIAL: 9.0, 1: 3.0, 2: 4.0, 4: 5.0, 8: 6.0, 16: 7.0},
                        nofreeze=0.5)
    assert all(plan.schedule.for_block(b) == BlockSchedule(1, None, "zeros" if b == 3 else "z",
                                                           1e-4, freeze=False)
               for b in range(4))
    # Only the first sampled block (3) timed Jacobi with freezing; the others went straight
    # to the variant that won there.
    assert [b for b, kind in timer.calls if kind == 1] == [3]


def test_without_a_ranking_every_block_may_get_segments():
    timer = Costs({SEQUENTIAL: 9.0, 1: 3.0, 2: 1.0, 4: 2.0, 8: 4.0, 16: 5.0})
    plan = plan_schedule(_model(), None, batch_size=1, tol=1e-4, timer=timer)
    assert all(plan.schedule.for_block(b).segments == 2 for b in range(4))


def test_close_calls_are_re_timed_on_other_noise_and_clear_ones_are_not():
    # S1 and seq within 1.5x: re-timed; two rounds agree, so no third round.
    plan, _ = _plan({SEQUENTIAL: 1.2, 1: 1.0, 2: 2.0, 4: 3.0, 8: 4.0, 16: 5.0})
    for bp in plan.blocks:
        rounds = {c.label: len(c.seconds) for c in bp.candidates}
        assert rounds["seq"] == 2 and rounds[bp.choice] == 2 and bp.choice.startswith("S1")
        assert all(n == 1 for label, n in rounds.items() if label not in ("seq", bp.choice))
    plan, _ = _plan({SEQUENTIAL: 2.0, 1: 1.0, 2: 2.0, 4: 3.0, 8: 4.0, 16: 5.0})
    assert all(len(c.seconds) == 1 for bp in plan.blocks for c in bp.candidates)


def test_a_one_off_stall_is_outvoted_by_a_third_round():
    # Round 0: the loop stalls (1.6) and Jacobi wins; round 1 disagrees; round 2 decides, and
    # the medians (seq 1.0 vs S1 1.2) ignore the stall.
    plan, _ = _plan({SEQUENTIAL: [1.6, 1.0, 1.0], 1: [1.2, 1.2, 1.2], 2: 9.0, 4: 9.0, 8: 9.0,
                     16: 9.0})
    for bp in plan.blocks:
        assert bp.choice == "seq" and len(bp.candidate("seq").seconds) == 3


def test_test_interval_follows_the_cost_of_a_pass():
    cheap, _ = _plan({SEQUENTIAL: 1.0, 1: 1e-9, 2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0})
    assert {cheap.schedule.for_block(b).check_every for b in range(4)} == {4}  # max_check_every
    dear, _ = _plan({SEQUENTIAL: 1e4, 1: 1e3, 2: 1e4, 4: 1e4, 8: 1e4, 16: 1e4})
    assert {dear.schedule.for_block(b).check_every for b in range(4)} == {1}


def test_a_measured_plan_meets_its_tolerance_and_is_never_worse_than_its_candidates():
    model = make_model(3, num_blocks=4)  # float64
    plan = plan_schedule(model, RANKING, batch_size=3, tol=1e-9, guidance=Guidance(1.0))
    labels = {c.label for bp in plan.blocks for c in bp.candidates}
    assert "seq" in labels and labels & {"S1", "S1/nofreeze"}
    for bp in plan.blocks:
        done = [c for c in bp.candidates if c.complete]
        assert bp.choice.split("/c")[0] in {c.label for c in done}
    noise = model.sample_noise(3, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    out, stats = sample(model, noise, y, plan.schedule, guidance=1.0)
    ref = sample(model, noise, y, guidance=1.0)[0]
    assert (out - ref).abs().max() < 1e-3
    assert all(float(st.residual.max()) <= 1e-9 for st in stats.blocks.values())


def test_plan_round_trips_through_json():
    plan, _ = _plan({SEQUENTIAL: 9.0, 1: 3.0, 2: 2.0, 4: 1.0, 8: 1.5, 16: 0.5})
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.schedule == plan.schedule and again.source == "cache"
    assert again.blocks == plan.blocks and again.shares == plan.shares
    assert again.predicted_seconds == plan.predicted_seconds
    with pytest.raises(ValueError, match="version"):
        Plan.from_dict({**plan.to_dict(), "version": 0})


def test_cache_hit_miss_and_ranking_drift(tmp_path):
    model = _model()
    cache = PlanCache(tmp_path / "plans.json")
    settings = parse_sampler({"schedule": "auto", "tol": 1e-4, "guidance": 1.0})
    timer = Costs({SEQUENTIAL: 9.0, 1: 3.0, 2: 2.0, 4: 1.0, 8: 1.5, 16: 0.5})
    first = settings.schedule_for(model, RANKING, 2, cache=cache, weights=False, timer=timer)[1]
    assert first.source == "planned" and (tmp_path / "plans.json").is_file()
    calls = len(timer.calls)
    hit = settings.schedule_for(model, RANKING, 2, cache=cache, weights=False, timer=timer)[1]
    assert hit.source == "cache" and hit.schedule == first.schedule
    assert len(timer.calls) == calls  # nothing measured
    # Another batch size is another key; so are other weights with a weights key.
    assert cache.get(settings.plan_key(model, 3, weights=False)) is None
    assert cache.get(settings.plan_key(model, 2)) is None
    other = parse_sampler({"schedule": "auto", "tol": 1e-4, "guidance": 1.0,
                           "planner": {"margin": 1.5}})  # other knobs may choose otherwise
    assert cache.get(other.plan_key(model, 2, weights=False)) is None
    # Shares that moved by > 10 points re-plan, and the new plan replaces the old one.
    moved = [BlockRank(r.block, r.crm, s, r.igm)
             for r, s in zip(RANKING, [30, 50, 10, 10], strict=True)]
    again = settings.schedule_for(model, moved, 2, cache=cache, weights=False, timer=timer)[1]
    assert again.source == "planned" and again.shares == {0: 30, 1: 50, 2: 10, 3: 10}
    assert len(json.loads((tmp_path / "plans.json").read_text())["plans"]) == 1


def test_ranking_moved_and_a_damaged_cache():
    then = {0: 10.0, 1: 70.0, 2: 10.0, 3: 10.0}
    assert not ranking_moved(then, {0: 12.0, 1: 66.0, 2: 11.0, 3: 11.0})  # drift of a round
    assert ranking_moved(then, {0: 20.0, 1: 55.0, 2: 15.0, 3: 10.0})  # 15 points
    assert ranking_moved(then, {0: 19.0, 1: 62.0, 2: 9.0, 3: 10.0}, threshold=10.0) is False
    assert ranking_moved({0: 30.0, 1: 40.0, 2: 15.0, 3: 15.0},
                         {0: 36.0, 1: 36.0, 2: 14.0, 3: 14.0}, tough_factor=1.5)  # 0 now tough
    assert not ranking_moved(None, then)


def test_damaged_cache_file_is_a_miss(tmp_path):
    path = tmp_path / "plans.json"
    path.write_text("{not json")
    key = plan_key(_model(), batch_size=1, tol=0.0, guidance=Guidance())
    assert PlanCache(path).get(key) is None
    assert PlanCache(None).get(key) is None  # memory-only cache


def test_tol_zero_tests_only_the_last_iteration_and_a_check_interval_is_kept():
    model = make_model(3)
    z = model.sample_noise(2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1])
    for tol, every, tested in ((0.0, 1, [6]), (1e-30, 3, [3, 6]), (1e-30, 1, list(range(1, 7)))):
        seen = []
        gs_jacobi_block(model.blocks[1], z, y, BlockSchedule(1, 6, "z", tol, freeze=False,
                                                             check_every=every),
                        callback=lambda info, _s=seen: _s.append(
                            (info["iteration"], info["residual"] is not None)))
        assert [it for it, tested_now in seen if tested_now] == tested, (tol, every)


def test_schedule_sugar_sets_every_block():
    s = SamplingSchedule.jacobi(4, tol=1e-3)
    assert s.with_settings(tol=1e-4).name == "jacobi:4"  # names never carry tol
    changed = s.with_settings(check_every=2, net_dtype="bfloat16")
    assert changed.name == "" and changed.default.check_every == 2
    assert changed.describe() == "{else:S1xJ4/c2/bf16} tol=0.001"
