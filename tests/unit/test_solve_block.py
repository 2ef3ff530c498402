"""The per-block seam (``solve_block``): the sampler and the planner's timing both run it; a
caller's initial guess enters through it; the sampler's knobs come from one list."""

from __future__ import annotations

import importlib

import pytest
import torch

from tarflow.model import Guidance
from tarflow.sampling import (
    SEQUENTIAL,
    BlockSchedule,
    SamplingSchedule,
    plan_key,
    plan_schedule,
    sample,
    sample_sequential,
)
from tarflow.sampling.fixed_point import INPUT_INITS, initial_guess
from tarflow.sampling.knobs import DEFAULTS, KNOBS, guidance_of, knobs_of, parse_knobs
from tarflow.sampling.schedule import format_block
from tarflow.sampling.settings import KNOWN_KEYS, parse_sampler
from tarflow.sampling.solve import solve_block
from tests.unit.conftest import make_model


def _noise(model, batch=3, seed=0):
    return model.sample_noise(batch, generator=torch.Generator().manual_seed(seed),
                              dtype=torch.float64)


def _true_inputs(model, images, y):
    """Per forward block, the solution of its inverse: its input in the forward pass."""
    out = model(images, y)
    return {b: model.patchify(images) if b == 0 else out.block_outputs[b - 1]
            for b in range(model.config.num_blocks)}


def test_a_guess_at_the_solution_is_solved_in_one_iteration():
    """A learned guess enters per block through ``sample(guesses=...)``: at the exact solution
    (the forward pass of the sequential samples) every block stops after its first test, and
    the images equal the sequential loop's."""
    model = make_model(3)
    z, y = _noise(model), torch.tensor([0, 2, 1])
    ref = sample_sequential(model, z, y)
    guesses = _true_inputs(model, ref, y)
    schedule = SamplingSchedule.jacobi(tol=1e-20).with_settings(check_every=1)
    out, stats = sample(model, z, y, schedule, guesses=guesses)
    assert stats.iters == {0: 1, 1: 1}
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    # The schedule's own guess needs more iterations, for the same images.
    for init in INPUT_INITS:  # the guesses made from the block's input alone
        out_init, stats_init = sample(model, z, y, SamplingSchedule.jacobi(init=init, tol=1e-20))
        assert all(n > 1 for n in stats_init.iters.values())
        torch.testing.assert_close(out_init, ref, atol=1e-10, rtol=0)


def test_any_guess_still_solves_exactly_and_sequential_blocks_ignore_it():
    """Exactness does not depend on the guess: N - 1 iterations solve a block from anywhere."""
    model = make_model(0)
    z = _noise(model)
    ref = sample_sequential(model, z)
    junk = {b: torch.randn_like(z) for b in range(model.config.num_blocks)}
    out, _ = sample(model, z, None, SamplingSchedule.jacobi(tol=0.0), guesses=junk)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    seq, _ = sample(model, z, None, None, guesses=junk)
    assert torch.equal(seq, ref)


def test_bad_guesses_are_refused():
    model = make_model(0)
    z = _noise(model)
    with pytest.raises(ValueError, match="unknown block"):
        sample(model, z, None, SamplingSchedule.jacobi(), guesses={5: z})
    with pytest.raises(ValueError, match="supplied initial guess"):
        sample(model, z, None, SamplingSchedule.jacobi(), guesses={1: z[:, :3]})
    with pytest.raises(ValueError, match="init="):
        initial_guess(z, "nearest")
    with pytest.raises(ValueError, match="needs the student's guess"):
        initial_guess(z, "student")


def test_solve_block_dispatches_by_schedule():
    model = make_model(0)
    z = _noise(model)
    block = model.blocks[-1]
    N = model.config.num_patches
    g = Guidance()
    seq, st = solve_block(block, z, None, BlockSchedule(SEQUENTIAL), guidance=g)
    assert torch.equal(seq, block.reverse(z, None)) and st.iters == [N - 1]
    jac, st = solve_block(block, z, None, BlockSchedule(2, None, "zeros", 0.0), guidance=g)
    torch.testing.assert_close(jac, seq, atol=1e-10, rtol=0)
    assert st.segments == 2 and st.total_iters <= N - 1
    with pytest.raises(ValueError, match="pass nets"):
        solve_block(block, z, None, BlockSchedule(1, net_dtype="bfloat16"), guidance=g)


def test_the_planner_and_the_sampler_run_the_same_seam(monkeypatch):
    """Every candidate the planner times and every block the sampler solves is one call of
    ``solve_block``: what the plan measures is what sampling runs."""
    model = make_model(0)
    calls = {"timing": [], "sample": []}
    real = solve_block

    def recorder(where):
        def run(block, x, y, settings, **kw):
            calls[where].append((block.index, settings))
            return real(block, x, y, settings, **kw)
        return run

    # (``tarflow.sampling.sample`` the attribute is the function; the module by name.)
    for where in calls:
        module = importlib.import_module(f"tarflow.sampling.{where}")
        monkeypatch.setattr(module, "solve_block", recorder(where))
    plan = plan_schedule(model, None, batch_size=2, tol=1e-6,
                         timer=lambda b, cand, seconds: 1.0 + cand.segments)
    timed = {(bp.block, c.label): len(c.seconds) for bp in plan.blocks for c in bp.candidates
             if c.label != "identity"}
    ran = [(b, format_block(s, 1e-6)) for b, s in calls["timing"]]
    assert len(timed) > 2 and {key: ran.count(key) for key in set(ran)} == timed
    sample(model, _noise(model, 2), None, plan.schedule)
    assert calls["sample"] == [(b, plan.schedule.for_block(b))
                               for b in reversed(range(model.config.num_blocks))]


def test_knobs_come_from_one_list():
    assert set(KNOBS) <= KNOWN_KEYS
    assert parse_knobs({}) == DEFAULTS
    cfg = {"guidance": 2, "attn_temp": 0.5, "annealed": True, "guidance_rule": "starflow",
           "denoise": 1}
    knobs = parse_knobs(cfg)
    assert knobs == {k: type(DEFAULTS[k])(v) for k, v in cfg.items()}
    assert parse_sampler(cfg).knobs == knobs
    g = guidance_of(knobs)
    assert g == Guidance(2.0, 0.5, True, "starflow")
    assert knobs_of(g) == {k: knobs[k] for k in KNOBS if k != "denoise"}


def test_the_plan_key_holds_every_guidance_knob_and_planner_option():
    model = make_model(0)
    base = dict(batch_size=2, tol=1e-3)
    linear = plan_key(model, guidance=Guidance(1.0, 0.5), **base)
    assert plan_key(model, guidance=Guidance(1, 0.5), **base) == linear  # int or float alike
    assert plan_key(model, guidance=Guidance(1.0, 0.5, rule="starflow"), **base) != linear
    # A sampler that writes the planner's defaults out keys as one that leaves them unset.
    written = parse_sampler({"schedule": "auto", "planner": {"rounds": 3, "keep": 1.5,
                                                             "segments": [2, 4, 8, 16]}})
    unset = parse_sampler({"schedule": "auto"})
    assert written.plan_key(model, 2) == unset.plan_key(model, 2)
    assert parse_sampler({"schedule": "auto", "planner": {"rounds": 2}}).plan_key(
        model, 2) != unset.plan_key(model, 2)
