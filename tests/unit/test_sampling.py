"""Jacobi and GS-Jacobi equal the sequential loop; early exit, overflow guard, denoising."""

from __future__ import annotations

import pytest
import torch

from tarflow.model import Guidance
from tarflow.sampling import (
    BlockSchedule,
    SamplingSchedule,
    gs_jacobi_block,
    sample,
    sample_jacobi,
    sample_sequential,
    self_denoise,
)
from tests.unit.conftest import make_model

GUIDANCE = [dict(), dict(guidance=1.5, attn_temp=0.7), dict(guidance=2.0, annealed=True)]


def _noise(model, batch=4, seed=0):
    return model.sample_noise(batch, generator=torch.Generator().manual_seed(seed),
                              dtype=torch.float64)


@pytest.mark.parametrize("knobs", GUIDANCE)
@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("init", ["z", "zeros"])
def test_jacobi_to_convergence_equals_sequential(knobs, num_classes, init):
    if num_classes == 0 and knobs.get("attn_temp", 1.0) == 1.0 and knobs:
        knobs = {**knobs, "attn_temp": 0.5}  # uncond guidance needs a temperature
    model = make_model(num_classes)
    z = _noise(model)
    y = torch.tensor([0, 1, 2, -1]) if num_classes else None
    ref = sample_sequential(model, z, y, **knobs)
    N = model.config.num_patches
    out = sample_jacobi(model, z, y, max_iters=N - 1, init=init, tol=0.0, **knobs)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("segments", [2, 3, 5, 7, 16])
def test_gs_jacobi_any_segments_equals_sequential(segments):
    model = make_model(3)
    z, y = _noise(model), torch.tensor([2, 0, 1, 1])
    ref = sample_sequential(model, z, y, guidance=1.0)
    schedule = SamplingSchedule(default=BlockSchedule(segments, None, "zeros", 0.0))
    out, stats = sample(model, z, y, schedule, guidance=1.0)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    assert all(st.segments == segments for st in stats.blocks.values())


def test_gs_jacobi_with_one_segment_per_token_is_the_sequential_loop():
    model = make_model(3)
    z, y = _noise(model), torch.tensor([2, 0, 1, -1])
    g = Guidance(1.5, 0.8, annealed=True)
    N = model.config.num_patches
    for block in model.blocks:
        x_gs, stats = gs_jacobi_block(block, z, y, BlockSchedule(N), guidance=g)
        assert torch.equal(x_gs, block.reverse(z, y, guidance=g))
        assert stats.iters == [1] * (N - 1)  # one single-token step per position after the first


def test_iteration_caps_and_counts_are_reported():
    model = make_model(0)
    z = _noise(model)
    out, stats = sample(model, z, None, SamplingSchedule.jacobi(3))
    assert stats.iters == {0: 3, 1: 3}
    assert all(int(s.sample_iters.max()) == 3 for s in stats.blocks.values())
    _, seq = sample(model, z, None, None)
    assert seq.iters == {0: 15, 1: 15}
    assert seq.seconds > 0 and all(s.seconds > 0 for s in seq.blocks.values())


def test_early_exit_stops_updating_converged_samples():
    model = make_model(0, std=0.01)
    z = _noise(model, batch=6)
    # Make sample 0 trivially converged: a block input whose first Jacobi step is a fixed point
    # cannot be built directly, so instead trace which samples are still active per iteration.
    trace = []
    block = model.blocks[1]
    x, stats = gs_jacobi_block(block, z, None, BlockSchedule(1, None, "z", 1e-6),
                               callback=trace.append)
    active = [t["active"] for t in trace]
    assert active == sorted(active, reverse=True)  # the working batch only shrinks
    assert int(stats.sample_iters.min()) < int(stats.sample_iters.max()) or active[-1] == 6
    assert stats.total_iters == len(trace) < model.config.num_patches - 1
    assert float(stats.residual.max()) <= 1e-6
    # Each sample's result is exactly what its own last iteration produced: re-running only
    # that sample with its own iteration count gives the same tensor.
    for i in range(6):
        n = int(stats.sample_iters[i])
        xi, _ = gs_jacobi_block(block, z[i:i + 1], None, BlockSchedule(1, n, "z", 0.0))
        torch.testing.assert_close(xi, x[i:i + 1], atol=1e-12, rtol=0)


def test_tolerance_gives_close_result_with_fewer_iterations():
    model = make_model(3)
    z, y = _noise(model, batch=8), torch.arange(8) % 3
    ref = sample_sequential(model, z, y)
    out, stats = sample(model, z, y, SamplingSchedule.jacobi(tol=1e-8))
    assert (out - ref).abs().max() < 1e-3
    assert sum(stats.iters.values()) < 2 * 15


def test_overflow_falls_back_to_sequential_with_warning():
    model = make_model(0, std=0.02)
    with torch.no_grad():  # a block whose Jacobi iterates explode from the zero guess
        model.blocks[1].proj_out.weight.mul_(400.0)
    z = _noise(model, batch=3)
    ref = sample_sequential(model, z)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        out, stats = sample(model, z, None, SamplingSchedule.jacobi(init="zeros"))
    assert stats.fallback > 0
    finite = torch.isfinite(ref).flatten(1).all(1)
    torch.testing.assert_close(out[finite], ref[finite], atol=1e-8, rtol=1e-8)


def test_self_denoise_is_a_score_step():
    model = make_model(0, std=0.05)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    assert torch.equal(self_denoise(model, x, noise_std=0.0), x)
    sigma = 0.1
    out = self_denoise(model, x, noise_std=sigma, multiplier=0.5)
    xg = x.clone().requires_grad_(True)
    log_p = -(model.nll(xg).sum() * x[0].numel())
    (score,) = torch.autograd.grad(log_p, xg)
    torch.testing.assert_close(out, x + 0.5 * sigma**2 * score)


def test_sample_checks_inputs():
    model = make_model(0)
    with pytest.raises(ValueError, match="noise must be"):
        sample(model, torch.zeros(1, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="block"):
        sample(model, _noise(model), None, SamplingSchedule({5: BlockSchedule()}))
    with pytest.raises(ValueError, match="attn_temp"):
        sample(model, _noise(model), None, guidance=1.0)


def test_concat_cache_baseline_gives_the_same_images():
    from tarflow.eval.baseline import sample_sequential_concat

    model = make_model(3)
    z, y = _noise(model), torch.tensor([0, 1, 2, -1])
    for knobs in GUIDANCE:
        assert torch.equal(sample_sequential_concat(model, z, y, **knobs),
                           sample_sequential(model, z, y, **knobs))


@pytest.mark.parametrize("check_every", [1, 3])
def test_freezing_is_exact_at_tol_zero_and_saves_nothing_it_should_not(check_every):
    model = make_model(3)
    z, y = _noise(model), torch.tensor([0, 1, 2, -1])
    ref = sample_sequential(model, z, y, guidance=1.0)
    for freeze in (True, False):
        schedule = SamplingSchedule(default=BlockSchedule(2, None, "z", 0.0, freeze=freeze))
        out, _ = sample(model, z, y, schedule, guidance=1.0, check_every=check_every)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_freezing_feeds_fewer_tokens_at_a_tolerance(monkeypatch):
    model = make_model(0, std=0.07, img_size=16)  # N = 64: convergence is uneven along it
    z = _noise(model, batch=2)
    fed, outs = {}, {}
    for freeze in (True, False):
        counts = []
        for block in model.blocks:
            original = type(block).predict

            def counting(xp, *args, _orig=original, _block=block, _counts=counts, **kw):
                _counts.append(xp.shape[1])
                return _orig(_block, xp, *args, **kw)

            monkeypatch.setattr(block, "predict", counting)
        schedule = SamplingSchedule(default=BlockSchedule(1, None, "z", 1e-6, freeze=freeze))
        outs[freeze], _ = sample(model, z, None, schedule)
        fed[freeze] = sum(counts)
    assert fed[True] < fed[False]
    assert (outs[True] - outs[False]).abs().max() < 1e-2


def test_unfrozen_single_segment_runs_without_a_cache_and_stays_exact(monkeypatch):
    model = make_model(3)
    z, y = _noise(model), torch.tensor([0, 1, 2, -1])
    ref = sample_sequential(model, z, y, guidance=1.0)

    def no_cache(*args, **kwargs):
        raise AssertionError("a K/V cache was allocated")

    for block in model.blocks:
        monkeypatch.setattr(block, "new_cache", no_cache)
    N = model.config.num_patches
    for schedule in (BlockSchedule(1, None, "z", 0.0, freeze=False),  # asked for
                     BlockSchedule(1, 3, "z", 0.0)):  # tol 0, short cap: nothing could freeze
        out, _ = sample(model, z, y, SamplingSchedule(default=schedule), guidance=1.0)
        if schedule.max_iters is None:
            torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    # A long cap at tol 0 still uses the frontier (and its cache).
    with pytest.raises(AssertionError, match="cache was allocated"):
        sample(model, z, y, SamplingSchedule(default=BlockSchedule(1, N - 1, "z", 0.0)),
               guidance=1.0)


@pytest.mark.parametrize(("L", "front", "window"), [
    (63, 0, (0, 64)),  # the first segment: the last token rounds 63 up to 64
    (63, 10, (7, 63)),  # three frozen tokens round 53 up to 56
    (63, 5, (5, 63)),  # 58 -> 64 would cost 6 tokens, more than a sixteenth: unpadded
    (8, 3, (3, 8)),  # short windows stay as they are
    (63, 62, (62, 63)),
])
def test_fed_window_is_padded_to_whole_tiles_only_when_cheap(L, front, window):
    from tarflow.sampling.jacobi import _window

    j0, j1 = _window(L, front)
    assert (j0, j1) == window and j0 <= front and j1 >= L
