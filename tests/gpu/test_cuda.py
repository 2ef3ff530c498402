"""The maths on a CUDA device: what the CPU suite proves, checked where users sample.

Run by ``scripts/gpu_check.py`` (and ``pytest -m gpu``); skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from tarflow.sampling import sample_jacobi, sample_sequential
from tarflow.sampling.precision import network_copy
from tarflow.sampling.sample_set import fixed_inputs
from tests.unit.conftest import make_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def _model(num_classes: int = 3, dtype=torch.float32):
    return make_model(num_classes, dtype=dtype).to(CUDA)


def test_forward_matches_cpu_and_reverse_inverts() -> None:
    cpu = make_model(3, dtype=torch.float64)
    gpu = make_model(3, dtype=torch.float64).to(CUDA)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    out_cpu, out_gpu = cpu(x, y), gpu(x.to(CUDA), y.to(CUDA))
    torch.testing.assert_close(out_gpu.z.cpu(), out_cpu.z, atol=1e-10, rtol=0)
    torch.testing.assert_close(out_gpu.logdet.cpu(), out_cpu.logdet, atol=1e-10, rtol=0)
    torch.testing.assert_close(gpu.reverse(out_gpu.z, y.to(CUDA)).cpu(), x, atol=1e-10, rtol=0)


def test_jacobi_to_convergence_equals_sequential_on_cuda() -> None:
    model = _model(dtype=torch.float64)
    z = model.sample_noise(4, generator=torch.Generator(CUDA).manual_seed(0))
    y = torch.tensor([0, 1, 2, -1], device=CUDA)
    ref = sample_sequential(model, z, y, guidance=1.5, attn_temp=0.7)
    N = model.config.num_patches
    out = sample_jacobi(model, z, y, max_iters=N - 1, tol=0.0, guidance=1.5, attn_temp=0.7)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=0)


def test_fixed_sample_set_is_the_same_on_cpu_and_cuda() -> None:
    cpu, gpu = make_model(3, dtype=torch.float32), _model(3)
    noise_cpu, y_cpu = fixed_inputs(cpu, [0, 5, 7], seed=11)
    noise_gpu, y_gpu = fixed_inputs(gpu, [0, 5, 7], seed=11)
    assert noise_gpu.device.type == "cuda"
    torch.testing.assert_close(noise_gpu.cpu(), noise_cpu, atol=0, rtol=0)
    assert torch.equal(y_gpu.cpu(), y_cpu)


def test_bf16_network_jacobi_stays_close_to_float32() -> None:
    model = _model(0)
    z = model.sample_noise(8, generator=torch.Generator(CUDA).manual_seed(1))
    ref = sample_sequential(model, z, None)
    net = network_copy(model, torch.bfloat16)
    assert next(net.parameters()).dtype == torch.bfloat16
    out = sample_jacobi(model, z, None, max_iters=model.config.num_patches - 1, tol=1e-4,
                        net_dtype=torch.bfloat16)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert out.dtype == torch.float32 and rel < 2e-2, rel


def test_bf16_autocast_training_step_is_finite() -> None:
    model = make_model(3, dtype=torch.float32).to(CUDA).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(8, 1, 8, 8, device=CUDA) * 2 - 1
    y = torch.randint(3, (8,), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.nll(x, y).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
