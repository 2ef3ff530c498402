"""Loss terms for sampling speed: each equals a brute-force computation on a tiny block."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from tarflow.model import TarFlow, preset
from tarflow.model.permutation import permute
from tarflow.sampling.fixed_point import fixed_point_map
from tarflow.sampling.jacobi import gs_jacobi_block
from tarflow.sampling.schedule import BlockSchedule
from tarflow.sampling.speed_losses import (
    SpeedTerm,
    chain_penalty,
    parse_speed_terms,
    trajectory_penalty,
)
from tests.unit.conftest import make_model


def _block_io(model: TarFlow, b: int, batch: int = 2, seed: int = 0):
    """(block, xp, zp, cond): block b's permuted training input / output on random images."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    out = model(x)
    block = model.blocks[b]
    xin = model.patchify(x) if b == 0 else out.block_outputs[b - 1]
    return (block, permute(xin, block.flipped).detach(),
            permute(out.block_outputs[b], block.flipped).detach(), block.class_bias(None))


def _full_jacobian(block, xp, zp, cond, i: int) -> torch.Tensor:
    """(N*D, N*D) Jacobian of F at sample i, by autograd.functional (the brute force)."""
    N, D = xp.shape[1:]

    def F(flat):
        return fixed_point_map(block, flat.view(1, N, D), zp[i:i + 1], cond=cond).reshape(-1)

    return jacobian(F, xp[i].reshape(-1))


@pytest.mark.parametrize("b,k", [(0, 1), (1, 1), (1, 2), (0, 3)])
def test_chain_penalty_equals_brute_force(b, k):
    model = make_model(0, std=0.3)
    block, xp, zp, cond = _block_io(model, b)
    u = torch.randn(xp.shape, generator=torch.Generator().manual_seed(1), dtype=xp.dtype)
    expected = 0.0
    for i in range(xp.shape[0]):
        J = _full_jacobian(block, xp, zp, cond, i)
        expected += (u[i].reshape(1, -1) @ torch.linalg.matrix_power(J, k)).square().sum()
    value = chain_penalty(block, xp, zp, u, k=k, cond=cond)
    torch.testing.assert_close(value, expected / xp.numel(), rtol=1e-10, atol=1e-14)


def test_jacobian_is_strictly_block_lower_triangular_so_chains_die():
    """J_F couples position i only to positions < i: J^N = 0, and the chain penalty with it."""
    model = make_model(0, std=0.3)
    block, xp, zp, cond = _block_io(model, 1)
    N, D = xp.shape[1:]
    J = _full_jacobian(block, xp, zp, cond, 0).view(N, D, N, D)
    upper = torch.ones(N, N, dtype=torch.bool).triu()  # j >= i: no dependence allowed
    assert J.permute(0, 2, 1, 3)[upper].abs().max() == 0
    u = torch.randn_like(xp)
    assert chain_penalty(block, xp, zp, u, k=N, cond=cond) < 1e-25
    assert chain_penalty(block, xp, zp, u, k=1, cond=cond) > 1e-6


@pytest.mark.parametrize("init,k", [("z", 0), ("z", 2), ("zeros", 1)])
def test_trajectory_penalty_equals_the_samplers_iterate(init, k):
    """F(X^(k)) is the sampler's own Jacobi iterate k + 1 (gs_jacobi_block, tol 0)."""
    model = make_model(0, std=0.1)
    block, xp, zp, cond = _block_io(model, 1, batch=3)
    z = permute(zp, block.flipped)  # the sampler takes raster order
    x_k1, _ = gs_jacobi_block(block, z, None, BlockSchedule(1, k + 1, init, 0.0))
    x_k1 = permute(x_k1, block.flipped)
    expected = ((x_k1 - xp).square().sum((1, 2)) / xp.square().sum((1, 2))).mean()
    value = trajectory_penalty(block, xp, zp, k=k, init=init, cond=cond)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-14)
    assert value > 1e-6
    # Past N - 1 iterations Jacobi is exact: nothing left to penalise.
    assert trajectory_penalty(block, xp, zp, k=xp.shape[1], init=init, cond=cond) < 1e-20


def _terms(config, **extra):
    specs = {"jac": {"kind": "jacobian", "weight": 1.0, **extra},
             "chain": {"kind": "chain", "weight": 1.0, "k": 2, **extra},
             "traj": {"kind": "trajectory", "weight": 1.0, "k": 1, **extra}}
    return parse_speed_terms(specs, config)


def test_terms_are_zero_at_initialisation():
    model = TarFlow(preset("tiny", num_classes=3)).double()  # zero proj_out: the identity
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2, -1])
    out = model(x, y)
    for term in _terms(model.config):
        values = term.block_values(model, model.patchify(x), out.block_outputs, y)
        assert set(values) == {0, 1}
        assert all(float(v.detach()) == 0.0 for v in values.values()), term.name


def test_terms_have_finite_gradients_on_every_block():
    model = make_model(3, std=0.2)
    model.train()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2, -1])
    for term in _terms(model.config, rows=3, probes=2):
        model.zero_grad()
        out = model(x, y)
        value = term.combine(term.block_values(model, model.patchify(x), out.block_outputs, y,
                                               generator=torch.Generator().manual_seed(0)))
        value.backward()
        for b, block in enumerate(model.blocks):
            g = block.proj_out.weight.grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, (term.name, b)
        # The input path gets gradient too (the map F moves through every parameter).
        assert model.blocks[0].pos_embed.grad.abs().sum() > 0


def test_balance_share_weights_the_dominant_block():
    term = SpeedTerm("t", "jacobian", 1.0, balance="share")
    v = {0: torch.tensor(1.0, requires_grad=True), 1: torch.tensor(3.0, requires_grad=True)}
    value = term.combine(v)
    value.backward()
    torch.testing.assert_close(value, torch.tensor(2 * (0.25 * 1 + 0.75 * 3)))
    assert v[1].grad > v[0].grad  # the tough block is pushed harder
    assert SpeedTerm("t", "jacobian", 1.0, balance="sum").combine(v) == 4.0
    assert SpeedTerm("t", "jacobian", 1.0, balance="max").combine(v) == 3.0
    assert term.combine({}) is None


def test_every_and_prob_schedule():
    every = SpeedTerm("t", "chain", 1.0, every=3)
    assert [s for s in range(10) if every.due(s)] == [0, 3, 6, 9]
    sometimes = SpeedTerm("t", "chain", 1.0, prob=0.25, seed=4)
    due = [sometimes.due(s) for s in range(4000)]
    assert 800 < sum(due) < 1200
    assert due == [SpeedTerm("t", "chain", 1.0, prob=0.25, seed=4).due(s) for s in range(4000)]


def test_crm_share_selects_the_tough_blocks():
    model = make_model(0, std=0.05)
    torch.nn.init.normal_(model.blocks[1].proj_out.weight, std=1.0)  # block 1 dominates CRM
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64) * 2 - 1
    (term,) = parse_speed_terms({"t": {"kind": "jacobian", "weight": 1, "blocks": "crm:60"}},
                                model.config)
    assert term.select(model, model.patchify(x), None) == [1]
    assert model.training is False  # the selection restores the mode it found


@pytest.mark.parametrize("spec,message", [
    ({"kind": "chain", "weight": -1}, "t.weight=-1.0 must be a finite number >= 0"),
    ({"kind": "chain", "weight": 1, "blocks": [0, 5]}, "unknown block id(s) [5]"),
    ({"kind": "chain", "weight": 1, "k": 0}, "t.k=0 must be an integer >= 1"),
    ({"kind": "chain", "weight": 1, "every": 0}, "t.every=0 must be an integer >= 1"),
    ({"kind": "chain", "weight": 1, "prob": 0}, "t.prob=0.0 must lie in (0, 1]"),
    ({"kind": "newton", "weight": 1}, "t.kind='newton' must be one of"),
    ({"kind": "chain", "weight": 1, "speed": 2}, "unknown option(s) ['speed']"),
    ({"kind": "jacobian", "weight": 1, "k": 2}, "use kind chain"),
    ({"kind": "chain", "weight": 1, "blocks": "crm:x"}, "expected crm:<percent>"),
])
def test_bad_settings_are_refused_with_the_key(spec, message):
    with pytest.raises(ValueError, match="module.speed_terms.t") as err:
        parse_speed_terms({"t": spec}, preset("tiny"))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_weight_zero_or_null_switches_a_term_off():
    specs = {"a": {"kind": "chain", "weight": 0}, "b": None,
             "c": {"kind": "trajectory", "weight": 0.5, "blocks": 1}}
    (term,) = parse_speed_terms(specs, preset("tiny"))
    assert (term.name, term.blocks, term.weight) == ("c", (1,), 0.5)
