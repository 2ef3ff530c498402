"""FID references in other formats: the official torchmetrics state dict and plain mu/sigma."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from tarflow.eval import (
    FeatureStats,
    frechet_distance,
    load_or_compute_reference,
    load_reference,
    stats_from_batches,
)
from tests.unit.test_fid import TinyExtractor, batched, make_images


def _torchmetrics_file(path, real: torch.Tensor) -> FrechetInceptionDistance:
    """A FrechetInceptionDistance over the tiny extractor, fed ``real``, saved as the official
    prepare_fid_stats.py saves it (its state dict, buffers made persistent)."""
    extractor = TinyExtractor()
    extractor.num_features = 32  # torchmetrics reads it instead of probing a 299x299 image
    fid = FrechetInceptionDistance(feature=extractor)
    for chunk in real.split(16):
        fid.update(chunk, real=True)
    fid.persistent(True)
    torch.save(fid.state_dict(), path)
    return fid


def test_official_stats_file_gives_torchmetrics_fid(tmp_path) -> None:
    real, fake = make_images(40, seed=1), make_images(30, seed=2, shift=0.3)
    path = tmp_path / "fake_16_fid_stats.pth"
    fid = _torchmetrics_file(path, real)
    for chunk in fake.split(16):
        fid.update(chunk, real=False)
    expected = float(fid.compute())

    reference = load_reference(path, expect={"img_size": 16})
    ours = stats_from_batches(batched(fake, 7), TinyExtractor()).mean_cov()
    assert frechet_distance(*ours, *reference.mean_cov()) == pytest.approx(expected, rel=1e-5)
    assert expected > 1e-3  # different image sets: a number that could be wrong
    # The moments are exactly ours over the same images, with the count and provenance.
    mu, sigma = stats_from_batches(batched(real, 9), TinyExtractor()).mean_cov()
    np.testing.assert_allclose(reference.mu, mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(reference.sigma, sigma, rtol=1e-9, atol=1e-12)
    assert reference.count == 40 and reference.external
    assert reference.meta["format"] == "torchmetrics-fid" and reference.meta["img_size"] == 16
    assert len(reference.meta["sha256"]) == 64 and reference.meta["num_samples"] == 40

    with pytest.raises(ValueError, match="for 16px images .* img_size=64"):
        load_reference(path, expect={"img_size": 64})


def test_plain_mu_sigma_npz(tmp_path) -> None:
    stats = stats_from_batches(batched(make_images(20, seed=3), 8), TinyExtractor())
    mu, sigma = stats.mean_cov()
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    reference = load_reference(tmp_path / "ref.npz")
    assert reference.count is None and reference.meta["format"] == "mu-sigma-npz"
    assert np.array_equal(reference.mu, mu) and np.array_equal(reference.sigma, sigma)
    np.savez(tmp_path / "counted.npz", mu=mu, sigma=sigma, n=np.int64(20))
    assert load_reference(tmp_path / "counted.npz").count == 20


def test_unknown_formats_are_refused_clearly(tmp_path) -> None:
    no_buffers = tmp_path / "stats.pth"  # saved without persistent(True): weights only
    torch.save({"inception.conv.weight": torch.zeros(1)}, no_buffers)
    with pytest.raises(ValueError, match="persistent\\(True\\)"):
        load_reference(no_buffers)
    pickled = tmp_path / "pickled.pth"
    torch.save({"real_features_sum": FeatureStats()}, pickled)  # an object: refused unread
    with pytest.raises(ValueError, match="weights_only=True"):
        load_reference(pickled)
    other = tmp_path / "other.npz"
    np.savez(other, images=np.zeros(3))
    with pytest.raises(ValueError, match="not a known FID reference"):
        load_reference(other)
    text = tmp_path / "notes.txt"
    text.write_text("mu sigma")
    with pytest.raises(ValueError, match="not a known FID reference"):
        load_reference(text)
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "missing.npz")


def test_external_references_are_used_and_never_overwritten(tmp_path) -> None:
    stats = stats_from_batches(batched(make_images(20, seed=4), 8), TinyExtractor())
    path = tmp_path / "ref.npz"
    np.savez(path, mu=stats.mean_cov()[0], sigma=stats.mean_cov()[1])
    before = path.read_bytes()

    def never():
        raise AssertionError("an external reference must not be recomputed")

    # Meta that a cache of ours would fail (other extractor, dataset): still used as given.
    reference = load_or_compute_reference(path, never, TinyExtractor(), {"dataset": "x"})
    assert reference.meta["format"] == "mu-sigma-npz" and path.read_bytes() == before
    with pytest.raises(FileNotFoundError, match="never computed"):
        load_or_compute_reference(tmp_path / "official_64_fid_stats.pth", never, TinyExtractor(),
                                  {})
