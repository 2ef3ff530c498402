"""The TarFlow model: invertibility, exact log-determinant, likelihood, presets."""

from __future__ import annotations

import math

import pytest
import torch

from tarflow.model import PRESETS, TarFlow, TarFlowConfig, preset
from tests.unit.conftest import make_model


@pytest.mark.parametrize("num_classes", [0, 3])
def test_forward_then_reverse_reconstructs(num_classes):
    model = make_model(num_classes, std=0.1)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 2, -1, 1]) if num_classes else None
    out = model(x, y)
    assert out.z.shape == (4, 16, 4) and out.logdet.shape == (4,)
    assert len(out.block_outputs) == 2 and out.block_outputs[-1] is out.z
    assert not torch.allclose(out.z, model.patchify(x))  # the flow is not the identity
    torch.testing.assert_close(model.reverse(out.z, y), x, atol=1e-12, rtol=0)


def test_fresh_model_is_identity():
    model = TarFlow(preset("tiny", num_classes=3)).double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    out = model(x, torch.tensor([0, 1]))
    assert torch.equal(out.z, model.patchify(x))
    assert torch.equal(out.logdet, torch.zeros(2, dtype=torch.float64))


def test_patchify_roundtrip_and_layout():
    model = TarFlow(preset("tiny", in_channels=3))
    x = torch.randn(2, 3, 8, 8)
    tokens = model.patchify(x)
    assert tokens.shape == (2, 16, 12)
    # Token 1 is the patch in row 0, column 1 (raster order), channels outermost (unfold order).
    torch.testing.assert_close(tokens[:, 1], x[:, :, 0:2, 2:4].reshape(2, 12))
    assert torch.equal(model.unpatchify(tokens), x)


def test_logdet_equals_autograd_slogdet():
    model = make_model(0, std=0.1)
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1
    dims = x.numel()

    def flat_forward(v):
        return model(v.view(1, 1, 8, 8)).z.reshape(-1)

    jac = torch.autograd.functional.jacobian(flat_forward, x.reshape(-1))  # (dims, dims)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    # Each block's logdet is a per-dimension mean: the total is their sum times the dimension.
    torch.testing.assert_close(model(x).logdet[0] * dims, logabsdet, atol=1e-9, rtol=1e-9)


def test_nll_and_bits_per_dim_match_direct_computation():
    model = make_model(3, std=0.1)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2])
    out = model(x, y)
    direct = 0.5 * out.z.pow(2).mean(dim=(1, 2)) - sum(out.block_logdets)
    torch.testing.assert_close(model.nll(x, y), direct)
    bpd = (direct + 0.5 * math.log(2 * math.pi) + math.log(128)) / math.log(2)
    torch.testing.assert_close(model.bits_per_dim(x, y), bpd)
    # Identity model on uniform data: bpd of a standard normal density at ~[-1, 1] + bin width.
    fresh = TarFlow(preset("tiny")).double()
    expect = (0.5 * x.pow(2).mean(dim=(1, 2, 3)) + 0.5 * math.log(2 * math.pi)
              + math.log(128)) / math.log(2)
    torch.testing.assert_close(fresh.bits_per_dim(x), expect)


def test_null_class_is_mean_embedding():
    model = make_model(3)
    block = model.blocks[0]
    emb = block.class_bias(torch.tensor([-1, 2]))
    torch.testing.assert_close(emb[0], block.class_embed.mean(0))
    torch.testing.assert_close(emb[1], block.class_embed[2])
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x, torch.tensor([-1, -1])).z, model(x, None).z)


def test_labels_are_checked():
    with pytest.raises(ValueError, match="unconditional"):
        make_model(0)(torch.zeros(1, 1, 8, 8, dtype=torch.float64), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels must lie"):
        make_model(3)(torch.zeros(1, 1, 8, 8, dtype=torch.float64), torch.tensor([3]))


def test_guided_reverse_differs_and_unguided_matches():
    model = make_model(3, std=0.05)
    z = model.sample_noise(2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1])
    plain = model.reverse(z, y)
    assert not torch.allclose(model.reverse(z, y, guidance=2.0), plain)
    assert torch.equal(model.reverse(z, y, guidance=0.0, attn_temp=0.5), plain)
    with pytest.raises(ValueError, match="attn_temp"):
        make_model(0).reverse(z, guidance=1.0)


def test_presets_in_paper_form():
    assert PRESETS["img64_uncond"].tag == "P2-Ch768-T8-K8"
    assert PRESETS["img64_cond"].tag == "P4-Ch1024-T8-K8"
    assert PRESETS["img128_cond"].tag == "P4-Ch1024-T8-K8"
    assert PRESETS["afhq256_cond"].tag == "P8-Ch768-T8-K8"
    assert PRESETS["afhq256_cond"].num_classes == 3 and PRESETS["img128_cond"].noise_std == 0.15
    cfg = preset("P4-Ch256-T2-K1", img_size=32)
    assert (cfg.patch_size, cfg.channels, cfg.num_blocks, cfg.layers_per_block) == (4, 256, 2, 1)
    with pytest.raises(ValueError, match="known presets"):
        preset("img65_uncond")


@pytest.mark.parametrize("bad, match", [
    (dict(img_size=30, patch_size=4), "not divisible by patch_size"),
    (dict(channels=100, head_dim=64), "not divisible by head_dim"),
    (dict(num_classes=-1), "num_classes"),
])
def test_bad_config_fails_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        TarFlowConfig(**bad)


def test_all_buffers_are_floating_point():
    # EMA averages buffers with lerp, which exists only for floating-point tensors; a bool or
    # int buffer would break every training run with EMA on.
    model = TarFlow(preset("tiny", num_classes=3))
    assert all(b.is_floating_point() for b in model.buffers())
    assert set(dict(model.named_buffers())) == {"var", "blocks.0.attn_mask", "blocks.1.attn_mask"}
