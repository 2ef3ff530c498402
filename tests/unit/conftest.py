"""Shared fixtures for ring-1 tests: small TarFlows with non-trivial (random) output layers."""

from __future__ import annotations

import pytest
import torch

from tarflow.model import TarFlow, preset


def make_model(num_classes: int = 0, *, dtype=torch.float64, std: float = 0.02, seed: int = 0,
               name: str = "tiny", **overrides) -> TarFlow:
    """A tiny TarFlow with a random proj_out (a fresh one is the identity: it tests nothing);
    ``name="tiny_deep_shallow"`` gives a deep-shallow stack with an identity block."""
    torch.manual_seed(seed)
    model = TarFlow(preset(name, num_classes=num_classes, **overrides)).to(dtype).eval()
    for block in model.blocks:
        if block.is_identity:
            continue
        torch.nn.init.normal_(block.proj_out.weight, std=std)
        torch.nn.init.normal_(block.proj_out.bias, std=std)
    return model


@pytest.fixture
def uncond_model() -> TarFlow:
    return make_model(0)


@pytest.fixture
def cond_model() -> TarFlow:
    return make_model(3)
