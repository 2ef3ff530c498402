"""``module.compile``: torch.compile'd flow blocks train to the same loss as eager ones."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn

from tarflow.cli.train import train
from tarflow.lit.module import TarFlowLitModule
from tests.integration.conftest import TINY, compose_train

MODEL = dict(img_size=8, in_channels=1, patch_size=2, channels=32, num_blocks=2,
             layers_per_block=1, num_classes=3, head_dim=16, noise_std=0.05)


def _pair(compile_options) -> tuple[TarFlowLitModule, TarFlowLitModule]:
    """The same module twice: eager, and with its blocks compiled."""
    torch.manual_seed(0)
    eager = TarFlowLitModule(MODEL)
    for block in eager.net.blocks:  # a fresh TarFlow is the identity: give z some structure
        nn.init.normal_(block.proj_out.weight, std=0.05)
    compiled = copy.deepcopy(eager)
    compiled.compile_options = compile_options
    compiled.setup("fit")
    return eager, compiled


def _loss_and_grads(module: TarFlowLitModule) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.tensor([0, 1, 2, -1, 0, 2])  # -1: a dropped label (the mean class embedding)
    module.zero_grad()
    loss = module.net.nll(x, y).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters()]


def _assert_same(eager, compiled, *, rtol: float) -> None:
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    loss_e, grads_e = _loss_and_grads(eager)
    loss_c, grads_c = _loss_and_grads(compiled)
    # Dynamo really captured the blocks (an uncompiled run would trivially agree).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=1e-7)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=rtol, atol=1e-6)
    # In-place compilation keeps the official state-dict keys (no "_orig_mod." prefix).
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_compiled_blocks_give_the_same_loss_and_gradients_aot_eager() -> None:
    # aot_eager traces the blocks with dynamo and AOT autograd (forward and backward graphs)
    # without inductor's code generation, which takes minutes on 2 CPU cores: the slow test.
    eager, compiled = _pair({"backend": "aot_eager", "mode": None, "fullgraph": True,
                             "dynamic": None})
    _assert_same(eager, compiled, rtol=1e-5)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_gradients_inductor() -> None:
    eager, compiled = _pair({"backend": "inductor", "mode": None, "fullgraph": True,
                             "dynamic": None})
    _assert_same(eager, compiled, rtol=1e-4)


def test_module_compile_switch_trains(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [*TINY, "module.compile={backend: aot_eager}",
                                   "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                                   "logger=csv"])
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    result = train(cfg)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
    ckpt = torch.load(result["last_ckpt"], weights_only=True)
    assert ckpt["hyper_parameters"]["compile"]["backend"] == "aot_eager"
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])


def test_bad_compile_options_are_refused_at_start(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [*TINY, "module.compile={mode: fast, backnd: x}"])
    with pytest.raises(ValueError, match="unknown module.compile option"):
        train(cfg)
    assert not (tmp_path / "run").exists()
