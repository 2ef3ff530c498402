"""IS, KID, precision/recall and FID from per-rank features (tarflow.eval.metrics): ranks merge
to the one-process figures, and the figures equal torch-fidelity's own ``calculate_metrics`` on
the same images through the same Inception network (He-normal random weights with a random
classifier: no download; a default-initialised Inception collapses every image together)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tarflow.eval import FeatureStats, InceptionFeatures
from tarflow.eval.inception import _fidelity_skeleton, has_classifier
from tarflow.eval.metrics import (
    SampleFeatures,
    extract,
    inception_score_unavailable,
    sample_metrics,
)


class TinyClassifier(nn.Module):
    """A seeded He-normal conv pooled to 32 features, plus a 10-way linear classifier, so the
    Inception Score path runs without Inception (the eval CLI tests use it too)."""

    name = "tiny-classifier"
    has_classifier = True

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(32, 10, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(16, 3, 3, 3, generator=gen) * math.sqrt(2 / 27))
            self.fc.weight.copy_(torch.randn(10, 32, generator=gen) * 3.0)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.conv(images.float().expand(-1, 3, -1, -1)))
        feats = torch.cat([h.mean((2, 3)), h.std((2, 3))], dim=1)
        return feats, self.fc(feats)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


def he_normal_inception(path, seed: int = 0, classifier: bool = True):
    """torch-fidelity's Inception state dict with He-normal convs, identity BatchNorm and (with
    ``classifier``) a random fc: a usable, non-collapsing test network."""
    state = _fidelity_skeleton().state_dict()
    gen = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=gen) * math.sqrt(2.0 / fan_in)
        elif key.endswith("bn.weight") or key.endswith("running_var"):
            state[key] = torch.ones_like(value)
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            state[key] = torch.zeros_like(value)
        elif key == "fc.weight":
            state[key] = (torch.randn(value.shape, generator=gen) * 30 / math.sqrt(value.shape[1])
                          if classifier else torch.zeros_like(value))
        elif key == "fc.bias":
            state[key] = torch.zeros_like(value)
    torch.save(state, path)
    return path


def uint8_images(n: int, seed: int, side: int = 32) -> torch.Tensor:
    """(n, 3, side, side) uint8: smooth random colour fields plus noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen)
    images = nn.functional.interpolate(coarse, size=side, mode="bilinear", align_corners=False)
    images = images + 0.15 * torch.randn(n, 3, side, side, generator=gen)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def as_model_images(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0  # images_to_uint8 maps these back to u8 exactly


def per_rank(extractor, images: torch.Tensor, world: int, keep: bool = True):
    """What each of ``world`` ranks keeps when rank r draws members r, r + world, ..."""
    ranks = []
    for rank in range(world):
        idx = list(range(rank, len(images), world))
        acc = SampleFeatures(keep=keep)
        for chunk in [idx[i:i + 3] for i in range(0, len(idx), 3)]:
            feats, logits = extract(extractor, images[chunk])
            acc.update(feats, logits, indices=chunk)
        ranks.append(acc)
    return ranks


def merged(ranks: list[SampleFeatures]) -> SampleFeatures:
    """The app's reduction done by hand: sums added in float64, rows gathered."""
    state = {k: sum(r.stats.state[k] for r in ranks) for k in ("count", "sum", "sum_outer")}
    out = SampleFeatures(stats=FeatureStats.from_state(state))
    return out.merge([r.payload() for r in ranks])


def test_ranks_merge_to_the_one_process_figures() -> None:
    extractor = TinyClassifier()
    gen_images = as_model_images(uint8_images(23, seed=1))
    ref = torch.cat([extract(extractor, as_model_images(uint8_images(20, seed=2)))[0]])
    ref_stats = FeatureStats().update(ref)
    one = per_rank(extractor, gen_images, 1)[0]
    three = merged(per_rank(extractor, gen_images, 3))
    assert three.indices == list(range(23)) == one.indices
    torch.testing.assert_close(three.all_features(), one.all_features())
    torch.testing.assert_close(three.all_logits(), one.all_logits())
    kwargs = dict(isc_splits=3, kid_subsets=4, kid_subset_size=12)
    a = sample_metrics(one, ref_stats.mean_cov(), ref.float(), **kwargs)
    b = sample_metrics(three, ref_stats.mean_cov(), ref.float(), **kwargs)
    assert set(a) >= {"fid", "inception_score", "kid", "precision", "recall"}
    assert a.keys() == b.keys()
    for key in a:  # the same rows up to float rounding of other batch compositions
        assert b[key] == pytest.approx(a[key], rel=1e-6), key
    assert a["inception_score"] > 1.0 and 0.0 <= a["precision"] <= 1.0


def test_merge_refuses_a_member_drawn_twice() -> None:
    extractor = TinyClassifier()
    images = as_model_images(uint8_images(4, seed=3))
    a = SampleFeatures().update(*extract(extractor, images[:2]), indices=[0, 1])
    b = SampleFeatures().update(*extract(extractor, images[2:]), indices=[1, 2])
    with pytest.raises(ValueError, match="same set member"):
        SampleFeatures().merge([a.payload(), b.payload()])


def test_stats_only_keeps_no_rows_and_no_logits_means_no_is() -> None:
    images = as_model_images(uint8_images(6, seed=4))
    acc = per_rank(TinyClassifier(), images, 1, keep=False)[0]
    assert acc.count == 6 and acc.features == [] and acc.all_logits() is None
    # A features-only extractor (FID's default contract) gives no logits and says why.
    from tests.integration.test_sampling_callback import TinyExtractor

    assert extract(TinyExtractor(), images)[1] is None
    assert "custom extractor" in inception_score_unavailable(TinyExtractor())


def test_is_kid_prc_fid_equal_torch_fidelity(tmp_path) -> None:
    """Same images, same weights: our per-rank pipeline equals torch-fidelity's own run."""
    from torch_fidelity import calculate_metrics

    weights = he_normal_inception(tmp_path / "inception.pth")
    assert has_classifier(weights)
    gen_u8, ref_u8 = uint8_images(10, seed=5), uint8_images(10, seed=6)

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    kwargs = dict(isc_splits=2, kid_subsets=5, kid_subset_size=8)
    theirs = calculate_metrics(
        input1=Images(gen_u8), input2=Images(ref_u8), isc=True, fid=True, kid=True, prc=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
        cache=False, verbose=False, batch_size=10, cuda=False, save_cpu_ram=True, **kwargs)
    extractor = InceptionFeatures(weights, batch_size=10)
    assert extractor.has_classifier
    ours_gen = merged(per_rank(extractor, as_model_images(gen_u8), 2))
    ref_feats = extractor(as_model_images(ref_u8))
    ours = sample_metrics(ours_gen, FeatureStats().update(ref_feats).mean_cov(),
                          ref_feats.float(), **kwargs)
    assert ours["inception_score"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert ours["inception_score_std"] == pytest.approx(theirs["inception_score_std"],
                                                        rel=1e-4, abs=1e-7)
    assert ours["precision"] == theirs["precision"] and ours["recall"] == theirs["recall"]
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4,
                                        abs=1e-7)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours["inception_score"] > 1.01  # not the constant 1 of a missing classifier
    assert 0 < ours["recall"] < 1 or 0 < ours["precision"] < 1  # a comparison that can fail


def test_weights_without_classifier_give_no_inception_score(tmp_path) -> None:
    weights = he_normal_inception(tmp_path / "pool3.pth", classifier=False)
    assert not has_classifier(weights)
    extractor = InceptionFeatures(weights, batch_size=2)
    feats, logits = extractor.features_and_logits(as_model_images(uint8_images(1, seed=7)))
    assert feats.shape == (1, 2048) and logits is None
    reason = inception_score_unavailable(extractor)
    assert "no classifier layer (fc)" in reason and str(weights) in reason
    assert np.isfinite(feats.numpy()).all()
