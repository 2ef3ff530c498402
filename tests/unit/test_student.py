"""A distilled student (tarflow.model.student), its pair set (tarflow.sampling.pairs,
tarflow.data.pairs) and the student as the exact sampler's initial guess."""

from __future__ import annotations

import pytest
import torch

from tarflow.data.pairs import PairSet, read_manifest
from tarflow.model.checkpoint import CheckpointError, describe_checkpoint
from tarflow.model.guidance import Guidance
from tarflow.model.loading import load_for_sampling
from tarflow.model.student import Student, StudentConfig
from tarflow.model.tarflow import TarFlow
from tarflow.sampling import SamplingSchedule, sample
from tarflow.sampling.pairs import missing_shards, write_pairs
from tarflow.sampling.sample_set import fixed_inputs
from tarflow.sampling.schedule import BlockSchedule, parse_schedule
from tarflow.sampling.student import guided_forward, student_guesses
from tests.unit.conftest import make_model


def make_student(teacher: TarFlow, seed: int = 0, std: float = 0.05) -> Student:
    torch.manual_seed(seed)
    s = Student(teacher.config, StudentConfig(channels=32, layers=1, head_dim=16, steps=2),
                {"path": "teacher.pt", "fingerprint": "x"})
    torch.nn.init.normal_(s.proj_out.weight, std=std)  # a fresh one returns its noise
    return s.to(next(teacher.parameters()).dtype).eval()


class _Killed(Exception):
    pass


def test_pairs_resume_after_a_kill_and_refuse_another_teacher(tmp_path):
    teacher = make_model(3, dtype=torch.float32)
    knobs = {"guidance": 0.5}
    kw = dict(count=10, shard_size=4, batch_size=3, seed=100, knobs=knobs)
    whole = tmp_path / "whole"
    write_pairs(teacher, whole, **kw)

    def kill(k, n):  # the run dies right after its first shard
        raise _Killed

    part = tmp_path / "part"
    with pytest.raises(_Killed):
        write_pairs(teacher, part, on_shard=kill, **kw)
    assert missing_shards(part, 10, 4) == [1, 2]
    # Two "ranks" finish it: each draws only the shards it owns and lacks.
    assert write_pairs(teacher, part, rank=0, world_size=2, **kw) == [2]
    assert write_pairs(teacher, part, rank=1, world_size=2, **kw) == [1]
    assert write_pairs(teacher, part, **kw) == []  # complete: nothing is drawn again
    a, b = PairSet(whole, 10), PairSet(part, 10)
    assert torch.equal(a.x, b.x) and torch.equal(a.z, b.z) and torch.equal(a.y, b.y)
    # z is the fixed set's noise of member i (seed + i); x the teacher's sample of it.
    noise, y = fixed_inputs(teacher, range(10), 100)
    assert torch.equal(a.z, noise) and torch.equal(a.y, y)
    x = teacher.patchify(sample(teacher, noise, y, None, **knobs)[0])
    torch.testing.assert_close(a.x, x)
    assert read_manifest(part)["sampler"]["guidance"] == 0.5
    other = make_model(3, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="another teacher") as err:
        write_pairs(other, part, **kw)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="denoise"):
        write_pairs(teacher, tmp_path / "d", count=2, knobs={"denoise": 1.0})
    with pytest.raises(ValueError, match="incomplete"):
        PairSet(part, 14)


def test_student_checkpoint_round_trip_and_sampling(tmp_path):
    teacher = make_model(3, dtype=torch.float32)
    student = make_student(teacher)
    path = student.save_checkpoint(tmp_path / "student.pt")
    summary = describe_checkpoint(path)
    assert summary.kind == "student" and summary.config == teacher.config
    loaded = load_for_sampling(path, device="cpu")
    assert isinstance(loaded.net, Student)
    for a, b in zip(student.state_dict().values(), loaded.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    noise, y = fixed_inputs(teacher, range(4), 0)
    images, stats = sample(loaded.net, noise, y, steps=3)
    assert images.shape == (4, 1, 8, 8) and stats.schedule == "student K=3"
    manual = student.unpatchify(student.generate(noise, y, steps=3))
    torch.testing.assert_close(images, manual)
    with pytest.raises(ValueError, match="no likelihood"):
        sample(loaded.net, noise, y, denoise=1.0)
    with pytest.raises(ValueError, match="student's setting"):
        sample(teacher, noise, y, steps=2)
    with pytest.raises(CheckpointError, match="distilled student"):
        TarFlow.from_checkpoint(path)


def test_guided_forward_inverts_the_guided_reverse():
    teacher = make_model(3)
    noise, y = fixed_inputs(teacher, range(3), 0)
    g = Guidance(1.5)
    for block in teacher.blocks:
        x = block.reverse(noise, y, guidance=block.guided(g))
        torch.testing.assert_close(guided_forward(block, x, y, g), noise)


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_student_initialized_jacobi_is_exact(guidance):
    teacher = make_model(3)  # float64
    student = make_student(teacher)
    noise, y = fixed_inputs(teacher, range(5), 3)
    knobs = {"guidance": guidance}
    exact = sample(teacher, noise, y, None, **knobs)[0]
    init_s = parse_schedule("{else:S1/student} tol=1e-14")
    assert init_s.default == BlockSchedule(1, None, "student", 1e-14)
    ours, stats = sample(teacher, noise, y, init_s, student=student, **knobs)
    # Within tolerance of the sequential loop (tol bounds each block's squared relative step).
    torch.testing.assert_close(ours, exact, atol=1e-5, rtol=0)
    assert all(n < teacher.config.num_patches - 1 for n in stats.iters.values())
    # Run to convergence (tol 0: N - 1 passes), both guesses reach one and the same fixed point.
    full_s = sample(teacher, noise, y, init_s.with_settings(tol=0.0), student=student,
                    **knobs)[0]
    init_z = SamplingSchedule(default=BlockSchedule(1, None, "zeros", 0.0))
    full_z = sample(teacher, noise, y, init_z, **knobs)[0]
    torch.testing.assert_close(full_s, full_z, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="no student"):
        sample(teacher, noise, y, init_s, **knobs)


def test_a_perfect_student_guess_needs_one_pass():
    """The guess of a student that reproduces the teacher is every block's solution: each
    block's first Jacobi pass changes nothing, and the solve stops there."""
    teacher = make_model(0)
    noise, _ = fixed_inputs(teacher, range(2), 0)
    exact = teacher.patchify(sample(teacher, noise, None)[0])

    class Perfect(Student):
        def generate(self, noise, y=None, *, steps=None):
            return exact

    perfect = Perfect(teacher.config, StudentConfig(channels=32, head_dim=16)).double()
    guesses = student_guesses(teacher, perfect, noise, None, Guidance())
    last = teacher.config.num_blocks - 1
    torch.testing.assert_close(guided_forward(teacher.blocks[last], guesses[last], None,
                                              Guidance()), noise)
    init_s = SamplingSchedule(default=BlockSchedule(1, None, "student", 1e-12))
    out, stats = sample(teacher, noise, None, init_s, student=perfect)
    torch.testing.assert_close(out, teacher.unpatchify(exact))
    assert all(n == 1 for n in stats.iters.values())


def test_a_student_set_counts_no_block_iterations():
    """A student solves no blocks: its sample set tallies no per-block iterations, so the
    validation callback logs no all-zero ``sampling/iters/<b>`` and draws no empty chart."""
    from tarflow.eval.fid_at_n import draw_set
    from tarflow.lit.callbacks.rounds import round_metrics

    teacher = make_model(3, dtype=torch.float32)
    run = draw_set(make_student(teacher), range(4), seed=0, batch_size=2)
    assert run.tally.images == 4 and run.tally.iters == [] and run.tally.mean_iters() == {}
    metrics = round_metrics(None, run.tally, 0.1, [0.0, 0.0, 0.0], 0.0)
    assert not any(k.startswith("sampling/iters") for k in metrics)
    assert metrics["sampling/images"] == 4.0
    teacher_run = draw_set(teacher, range(2), seed=0, batch_size=2)
    assert len(teacher_run.tally.iters) == teacher.config.num_blocks


def test_the_sample_and_eval_start_up_check_accepts_a_student(tmp_path):
    """tarflow-sample / tarflow-eval check a checkpoint's shapes against the TarFlow its config
    implies; a student's tensors are its own network's and must pass to its loader (they were
    refused as "does not match a TarFlow")."""
    from omegaconf import OmegaConf

    from tarflow.app.checks.sample import _checkpoint

    teacher = make_model(3, dtype=torch.float32)
    path = make_student(teacher).save_checkpoint(tmp_path / "student.pt")
    summary = _checkpoint(OmegaConf.create({"ckpt_path": str(path)}))
    assert summary.kind == "student"
    other = make_model(3, dtype=torch.float32).save_checkpoint(tmp_path / "teacher.pt")
    assert _checkpoint(OmegaConf.create({"ckpt_path": str(other)})).kind == "tarflow"
