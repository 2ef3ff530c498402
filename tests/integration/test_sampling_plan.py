"""The planner inside validation: cached across rounds, logged, and the same on every DDP rank."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tarflow.lit.callbacks.sampling import SamplingCallback
from tarflow.sampling import SEQUENTIAL, BlockSchedule
from tests.integration.test_sampling_callback import (
    SAMPLER,
    tiny_callback,
    tiny_data,
    tiny_module,
    trainer,
)


class KeepsPlans(SamplingCallback):
    """Never drops a plan for its measured speed-up: that check compares two wall-clock
    timings, which another job on the machine can set apart (its own test: SlowPlan below).
    What is tested here is reuse while the ranking holds still."""

    def _check_plan(self, trainer, plan, measured) -> None:
        return None


def test_rounds_reuse_the_cached_plan_and_log_it(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    cache = tmp_path / "run" / "sampling_plans.json"
    cb = tiny_callback(tmp_path, KeepsPlans, fid_stats_path=None, plan_cache=str(cache))
    logger = CSVLogger(str(tmp_path / "csv"), name="", version="run")
    trainer(tmp_path, [cb], max_epochs=3, num_sanity_val_steps=0, logger=logger).fit(
        tiny_module(), tiny_data())
    rows = list(csv.DictReader(open(tmp_path / "csv" / "run" / "metrics.csv")))
    reused = [float(r["sampling/plan_reused"]) for r in rows if r.get("sampling/plan_reused")]
    planned = [float(r["sampling/plan_seconds"]) for r in rows if r.get("sampling/plan_seconds")]
    # Three rounds of a barely trained model: its ranking hardly moves, so one plan serves all.
    assert reused == [0.0, 1.0, 1.0] and planned[0] > 0 and planned[1:] == [0.0, 0.0]
    plans = json.loads(cache.read_text())["plans"]
    assert len(plans) == 1
    (key, plan), = plans.items()
    assert json.loads(key)["model"].startswith("config:")  # training keys the architecture
    assert json.loads(key)["batch"] == cb.batch_size and plan["shares"]


class BiasedCost:
    """Costs that differ by rank: rank 0 finds the sequential loop cheapest, rank 1 Jacobi."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, block: int, cand: BlockSchedule, seconds: float) -> float:
        cheap = cand.segments == SEQUENTIAL if self.rank == 0 else cand.segments == 1
        return 1.0 if cheap else 5.0


class RankBiased(SamplingCallback):
    def _planner_timer(self, trainer):
        return BiasedCost(trainer.global_rank)


def test_ddp_ranks_sample_with_rank_zeros_plan(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    cb = tiny_callback(tmp_path, RankBiased, num_samples=6, batch_size=3, samples_dir=str(out),
                       compare_sequential=0, fid_stats_path=None)
    assert cb.settings.schedule == SAMPLER["schedule"] == "auto"
    trainer(tmp_path, [cb], devices=2, strategy="ddp_spawn").validate(tiny_module(), tiny_data(),
                                                                      verbose=False)
    schedules = {str(np.load(p)["schedule"]) for p in out.glob("*.npz")}
    assert len(list(out.glob("*.npz"))) == 2
    assert schedules == {"{else:seq} tol=1e-05"}  # rank 0's plan, although rank 1 would differ


def test_a_sequential_plan_is_compared_as_the_same_computation(tmp_path: Path) -> None:
    """A plan that is the sequential loop everywhere: speed-up exactly 1 and error 0, not the
    noise between two runs of one computation; any other schedule is really timed."""
    from tarflow.sampling import SamplingSchedule, parse_schedule

    cb = tiny_callback(tmp_path, compare_sequential=3)
    net = tiny_module().net.eval()
    fast, exact, count, err = cb._compare(net, parse_schedule("{else:seq}"), [0, 1, 2, 3])
    assert fast == exact > 0 and count == 3 and err == 0.0
    fast, exact, count, err = cb._compare(net, SamplingSchedule.jacobi(2), [0, 1, 2, 3])
    assert fast != exact and err > 0


class SlowPlan(SamplingCallback):
    """Reports every planned schedule as 10x slower than the sequential loop."""

    def _compare(self, net, schedule, shard):
        out = super()._compare(net, schedule, shard)
        return [10.0 * out[1], out[1], out[2], out[3]]


def test_a_plan_measured_far_slower_than_predicted_is_planned_again(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    cb = tiny_callback(tmp_path, SlowPlan, fid_stats_path=None)
    logger = CSVLogger(str(tmp_path / "csv"), name="", version="run")
    with pytest.warns(UserWarning, match="planned again at the next round"):
        trainer(tmp_path, [cb], max_epochs=2, num_sanity_val_steps=0, logger=logger).fit(
            tiny_module(), tiny_data())
    rows = list(csv.DictReader(open(tmp_path / "csv" / "run" / "metrics.csv")))
    reused = [float(r["sampling/plan_reused"]) for r in rows if r.get("sampling/plan_reused")]
    assert reused == [0.0, 0.0]  # the second round did not trust the first round's plan


def test_plan_cache_drop(tmp_path: Path) -> None:
    from tarflow.sampling import PlanCache

    cache = PlanCache(tmp_path / "plans.json")
    cache.drop({"model": "nothing"})  # nothing to drop: no file written
    assert not (tmp_path / "plans.json").exists()
