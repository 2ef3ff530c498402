"""Low-precision network for Jacobi iterations: only the network's precision changes."""

from __future__ import annotations

import pytest
import torch

from tarflow.sampling import SamplingSchedule, sample
from tarflow.sampling.precision import network_copy, parse_dtype
from tests.unit.conftest import make_model


def _inputs(model, batch=3):
    z = model.sample_noise(batch, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return z, torch.tensor([0, 2, -1][:batch])


@pytest.mark.parametrize(("net_dtype", "atol"), [(torch.float32, 1e-5), ("bf16", 5e-2)])
def test_low_precision_network_keeps_iterates_and_lands_near_the_exact_solution(net_dtype, atol):
    model = make_model(3)
    z, y = _inputs(model)
    ref = sample(model, z, y, guidance=1.0)[0]
    exact = SamplingSchedule.jacobi(model.config.num_patches - 1, tol=0.0)
    out, stats = sample(model, z, y, exact, guidance=1.0, net_dtype=net_dtype)
    assert out.dtype == torch.float64  # iterates stay in the noise dtype
    err = (out - ref).abs().max().item()
    assert 0 < err < atol  # the network really ran in lower precision, and only that changed
    assert {torch.float32: "/fp32", "bf16": "/bf16"}[net_dtype] in stats.schedule


def test_sequential_blocks_ignore_net_dtype():
    model = make_model(3)
    z, y = _inputs(model)
    a = sample(model, z, y, guidance=1.0)[0]
    b = sample(model, z, y, guidance=1.0, net_dtype="bfloat16")[0]
    assert torch.equal(a, b)


def test_network_copy_is_cached_until_the_weights_change():
    model = make_model(3)
    first = network_copy(model, torch.bfloat16)
    assert network_copy(model, torch.bfloat16) is first
    assert all(p.dtype == torch.bfloat16 for p in first.parameters())
    with torch.no_grad():
        model.blocks[0].proj_out.bias.add_(1.0)  # an in-place update, as EMA or Adam do
    second = network_copy(model, torch.bfloat16)
    assert second is not first
    torch.testing.assert_close(second.blocks[0].proj_out.bias.double(),
                               model.blocks[0].proj_out.bias, atol=1e-2, rtol=1e-2)


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float16") is torch.float16
    assert parse_dtype(None) is None and parse_dtype("none") is None
    with pytest.raises(ValueError, match="unknown net_dtype"):
        parse_dtype("int8")


def test_sampler_config_net_dtype_is_validated_and_lands_on_the_schedule():
    from tarflow.sampling.settings import parse_sampler

    settings = parse_sampler({"schedule": "jacobi", "net_dtype": "bf16", "check_every": 2})
    assert settings.net_dtype == "bfloat16"  # a plain string: the config stays serialisable
    assert settings.schedule.default.net_dtype == "bfloat16"
    assert settings.schedule.default.check_every == 2
    assert "net_dtype" not in settings.knobs and "check_every" not in settings.knobs
    assert parse_sampler({"schedule": "jacobi"}).schedule.default.net_dtype is None
    auto = parse_sampler({"schedule": "auto", "net_dtype": "bf16"})
    assert auto.is_planned and auto.net_dtype == "bfloat16"  # allowed, not imposed
    with pytest.raises(ValueError, match="unknown net_dtype"):
        parse_sampler({"schedule": "jacobi", "net_dtype": "bf61"})


def test_retired_tune_segments_key_says_what_replaced_it():
    from tarflow.sampling.settings import parse_sampler

    with pytest.raises(ValueError, match="planner: use schedule: auto"):
        parse_sampler({"schedule": "[1-4-8-10]", "tune_segments": True})
