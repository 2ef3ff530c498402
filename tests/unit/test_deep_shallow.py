"""STARFlow-style stacks: per-block depth and width, identity blocks, softplus scale, the
deep-only condition, STARFlow's guidance rule; exact like TarFlow everywhere."""

from __future__ import annotations

import pytest
import torch

from tarflow.model import Guidance, TarFlow, TarFlowConfig, preset
from tarflow.model.flow import IdentityBlock
from tarflow.model.guidance import starflow_rule
from tarflow.sampling import (
    BlockSchedule,
    SamplingSchedule,
    plan_schedule,
    rank_blocks,
    sample,
    sample_sequential,
)
from tests.unit.conftest import make_model

# tiny_deep_shallow: T = 3 forward blocks of 1, 0 and 2 layers; the deep block is 48 wide.
OPTIONS = [dict(), dict(scale="softplus"), dict(cond_deep_only=True)]


def _model(num_classes=3, std=0.1, **overrides):
    return make_model(num_classes, std=std, name="tiny_deep_shallow", **overrides)


def test_each_block_gets_its_own_depth_width_and_condition():
    model = _model(cond_deep_only=True)
    first, identity, deep = model.blocks
    assert len(first.attn_blocks) == 1 and len(deep.attn_blocks) == 2
    assert isinstance(identity, IdentityBlock) and not list(identity.parameters())
    assert deep.proj_in.weight.shape == (48, 4) and first.proj_in.weight.shape == (32, 4)
    assert deep.attn_blocks[0].attention.num_heads == 3  # 48 / head_dim 16
    assert deep.class_embed is not None and first.class_embed is None
    assert model.config.tag == "P2-Ch32-T3-K1.0.2-D48"
    assert not model.config.uniform and preset("demo").uniform


@pytest.mark.parametrize("bad, match", [
    (dict(layers_per_block=[1, 2]), "2 depths for num_blocks=3"),
    (dict(layers_per_block=[1, 1, 0]), "deep one.*at least one layer"),
    (dict(layers_per_block=[1, -1, 2]), "integers >= 0"),
    (dict(deep_channels=40), "multiple of head_dim=16"),
    (dict(scale="tanh"), "scale='tanh'"),
    (dict(cond_deep_only=True, num_classes=0), "needs a class-conditional"),
])
def test_bad_deep_shallow_configs_fail_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        preset("tiny_deep_shallow", **bad)
    with pytest.raises(ValueError, match="guidance rule 'cfg' does not exist.*linear, starflow"):
        Guidance(1.0, rule="cfg")


def test_an_even_list_is_the_plain_tarflow():
    config = TarFlowConfig(8, 1, 2, 32, 2, [2, 2], 0, head_dim=16, noise_std=0.05)
    assert config == preset("tiny") and config.layers_per_block == 2
    assert TarFlowConfig(**preset("tiny_deep_shallow").to_dict()) == preset("tiny_deep_shallow")


@pytest.mark.parametrize("options", OPTIONS)
def test_invertible_with_exact_logdet(options):
    model = _model(**options)
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([1])
    out = model(x, y)
    assert torch.equal(out.block_outputs[1], out.block_outputs[0])  # the identity block
    torch.testing.assert_close(model.reverse(out.z, y), x, atol=1e-12, rtol=0)

    def flat_forward(v):
        return model(v.view(1, 1, 8, 8), y).z.reshape(-1)

    sign, logabsdet = torch.linalg.slogdet(
        torch.autograd.functional.jacobian(flat_forward, x.reshape(-1)))
    assert sign != 0
    torch.testing.assert_close(out.logdet[0] * x.numel(), logabsdet, atol=1e-9, rtol=1e-9)


def test_softplus_scale_keeps_a_fresh_model_the_identity():
    model = TarFlow(preset("tiny_deep_shallow", scale="softplus")).double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    out = model(x)
    torch.testing.assert_close(out.z, model.patchify(x), atol=1e-15, rtol=0)
    torch.testing.assert_close(out.logdet, torch.zeros(2, dtype=torch.float64), atol=1e-15,
                               rtol=0)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("rule", ["linear", "starflow"])
def test_jacobi_and_gs_jacobi_equal_the_sequential_loop(options, rule):
    model = _model(std=0.03, **options)
    z = model.sample_noise(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 2, -1])
    knobs = dict(guidance=1.5, guidance_rule=rule)
    ref = sample_sequential(model, z, y, **knobs)
    for schedule in (SamplingSchedule.jacobi(tol=0.0),
                     SamplingSchedule(default=BlockSchedule(3, None, "zeros", 0.0)),
                     SamplingSchedule(default=BlockSchedule(1, None, "z", 0.0, freeze=False))):
        out, stats = sample(model, z, y, schedule, **knobs)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
        assert stats.iters[1] == 0  # the identity block costs nothing


def test_starflow_rule_is_the_clipped_precision_weighted_gaussian():
    torch.manual_seed(0)
    D, w = 3, 1.7
    a = torch.randn(2, 5, 2 * D, dtype=torch.float64)  # rows: [cond, uncond]
    sigma, mu = starflow_rule(a, w, torch.exp)
    sc, su = a[0, :, :D].exp(), a[1, :, :D].exp()
    mc, mu_u = a[0, :, D:], a[1, :, D:]
    # p_c^(1+w) p_u^(-w): precision (1 + w)/sc^2 - w/su^2, where that is positive (sc <= su);
    # the variance ratio is clipped at 1 otherwise, i.e. su is taken as sc.
    su_clipped = torch.maximum(su, sc)
    precision = (1 + w) / sc**2 - w / su_clipped**2
    mean = ((1 + w) * mc / sc**2 - w * mu_u / su_clipped**2) / precision
    torch.testing.assert_close(sigma[0], precision.rsqrt())
    torch.testing.assert_close(mu[0], mean)
    assert bool(((sc > su) & (sigma[0] == sc)).any())  # some clipped positions keep sigma_c
    # w = 0 is the conditional model.
    sigma0, mu0 = starflow_rule(a, 0.0, torch.exp)
    torch.testing.assert_close(sigma0[0], sc)
    torch.testing.assert_close(mu0[0], mc)


def test_starflow_guidance_changes_samples_and_w0_is_conditional():
    model = _model(std=0.03)
    z = model.sample_noise(2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 1])
    plain = model.reverse(z, y)
    star = model.reverse(z, y, guidance=2.0, guidance_rule="starflow")
    linear = model.reverse(z, y, guidance=2.0)
    assert not torch.allclose(star, plain) and not torch.allclose(star, linear)
    assert torch.equal(model.reverse(z, y, guidance=0.0, guidance_rule="starflow"), plain)


def test_guidance_skips_unconditional_shallow_blocks():
    model = _model(cond_deep_only=True)
    g = Guidance(2.0)
    first, deep = model.blocks[0], model.blocks[2]
    assert not first.guided(g).active and deep.guided(g).active
    assert first.guided(Guidance(2.0, attn_temp=0.5)).active  # the temperature still acts


def test_ranking_and_planner_on_a_deep_shallow_stack():
    model = _model(std=0.03, dtype=torch.float32)
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    ranking = rank_blocks(model, images)
    assert ranking[1].crm == 0.0 and ranking[1].share == 0.0  # identity: nothing to solve
    assert abs(sum(r.share for r in ranking) - 100.0) < 1e-6
    plan = plan_schedule(model, ranking, batch_size=2, tol=1e-4, guidance=Guidance(1.0))
    labels = {bp.block: [c.label for c in bp.candidates] for bp in plan.blocks}
    assert labels[1] == ["identity"]
    assert "seq" in labels[0] and "seq" in labels[2]
    z = model.sample_noise(2, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1])
    out = sample(model, z, y, plan.schedule, guidance=1.0)[0]
    ref = sample(model, z, y, guidance=1.0)[0]
    assert (out - ref).abs().max() < 1e-2


def test_deep_shallow_checkpoints_round_trip(tmp_path):
    model = _model(cond_deep_only=True, scale="softplus", dtype=torch.float32)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    y = torch.tensor([1, 2])
    path = model.save_checkpoint(tmp_path / "ds.pt")
    back = TarFlow.from_checkpoint(path)
    assert back.config == model.config
    torch.testing.assert_close(back(x, y).z, model(x, y).z)
    # A plain state dict: depths, the deep width and the deep-only condition read off the
    # tensors; the scale is not in any shape, so it is given (as head_dim would be).
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    plain = TarFlow.from_checkpoint(tmp_path / "plain.pth", head_dim=16, scale="softplus",
                                    in_channels=1)
    assert plain.config.depths == (1, 0, 2) and plain.config.deep_channels == 48
    assert plain.config.cond_deep_only
    torch.testing.assert_close(plain(x, y).z, model(x, y).z)
