"""The planner offered a distilled student: its guess is a per-block candidate, timed like any
other, and kept only where the blocks that use it save more than computing it costs."""

from __future__ import annotations

import json

import torch

from tarflow.model import Guidance
from tarflow.sampling import SEQUENTIAL, BlockSchedule, Plan, plan_key, plan_schedule, sample
from tarflow.sampling.sample_set import fixed_inputs
from tarflow.sampling.settings import parse_sampler
from tests.unit.test_planner import RANKING, _model
from tests.unit.test_student import make_student


class InitCosts:
    """Injected costs by kind: the sequential loop, Jacobi / GS from the input-made guesses,
    and from the student's guess (``student`` seconds, or ``z`` minus ``saving``)."""

    def __init__(self, seq: float, z: float, student: float) -> None:
        self.seq, self.z, self.student, self.calls = seq, z, student, []

    def __call__(self, block: int, cand: BlockSchedule, seconds: float) -> float:
        self.calls.append((block, cand.init, cand.segments))
        if cand.segments == SEQUENTIAL:
            return self.seq
        cost = self.student if cand.init == "student" else self.z
        return cost * (1.0 if cand.freeze else 2.0) * (1.0 + 0.1 * (cand.segments - 1))


def _plan(timer: InitCosts, student) -> Plan:
    return plan_schedule(_model(), RANKING, batch_size=2, tol=1e-6, guidance=Guidance(1.0),
                         timer=timer, student=student)


def test_the_student_guess_is_a_candidate_and_kept_where_it_pays():
    model = _model()
    student = make_student(model)
    timer = InitCosts(seq=9.0, z=3.0, student=0.5)  # seconds: the guess's ms are negligible
    plan = _plan(timer, student)
    # Every block was offered Jacobi from the student's guess, and every block took it.
    assert {b for b, init, _ in timer.calls if init == "student"} == {0, 1, 2, 3}
    assert all(plan.schedule.for_block(b).init == "student" for b in range(4))
    assert 0 < plan.guess_seconds == plan.guess_timed
    assert abs(plan.predicted_seconds - (4 * 0.5 + plan.guess_seconds)) < 1e-9
    assert "student's guess" in plan.summary() and "included" in plan.summary()
    # The plan samples within tolerance of the sequential loop (the fixed point is the
    # teacher's own sample), the student passed as sample() needs it.
    noise, y = fixed_inputs(model, range(2), 0)
    ours = sample(model, noise, y, plan.schedule, guidance=1.0, student=student)[0]
    exact = sample(model, noise, y, None, guidance=1.0)[0]
    torch.testing.assert_close(ours, exact, atol=1e-3, rtol=0)
    # The guess is recorded through the plan cache's JSON form.
    back = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back.guess_seconds == plan.guess_seconds and back.schedule == plan.schedule


def test_the_guess_is_dropped_when_its_cost_exceeds_the_saving():
    student = make_student(_model())
    # Saving 1 ns per block cannot pay for a student call and a forward pass.
    plan = _plan(InitCosts(seq=9.0, z=3.0, student=3.0 - 1e-9), student)
    assert all(plan.schedule.for_block(b).init != "student" for b in range(4))
    assert plan.guess_seconds == 0.0 and plan.guess_timed > 0
    assert "not worth it" in plan.summary()
    assert abs(plan.predicted_seconds - sum(
        min(c.cost for c in bp.candidates if "student" not in c.label)
        for bp in plan.blocks)) < 1e-9


def test_without_a_student_nothing_changes_and_the_key_names_the_student(tmp_path):
    model = _model()
    timer = InitCosts(seq=9.0, z=3.0, student=0.5)
    plan = _plan(timer, None)
    assert all(init != "student" for _, init, _ in timer.calls)
    assert plan.guess_timed is None and "student" not in plan.summary()
    settings = parse_sampler({"schedule": "auto", "tol": 1e-6})
    bare = settings.plan_key(model, 2)
    assert "student" not in bare  # plans made without a student keep their keys
    student = make_student(model)
    keyed = settings.plan_key(model, 2, student=student)
    assert keyed != bare and keyed["student"]["steps"] is None
    other = plan_key(model, batch_size=2, tol=1e-6, guidance=Guidance(),
                     options=settings.planner_options, net_dtypes=("bfloat16",),
                     student=make_student(model, seed=1))
    assert other["student"] != keyed["student"]
    # sampler.student names a checkpoint: the settings load it and offer it to the planner.
    path = student.save_checkpoint(tmp_path / "student.pt")
    named = parse_sampler({"schedule": "auto", "tol": 1e-6, "student": str(path)})
    assert named.plan_key(model, 2)["student"] == keyed["student"]
    schedule, plan = named.schedule_for(model, RANKING, 2, timer=timer)
    assert plan.guess_timed is not None and schedule.for_block(1).init == "student"
