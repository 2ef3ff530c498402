"""Issue 22 item 5: FID reference statistics are named by the images they hold, with a warning
when fewer images exist than were asked for, and refused below the floor (2 images)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from tarflow.eval import FeatureStats, load_reference
from tarflow.eval.fid_reference import MIN_REFERENCE_IMAGES, reference_stats, stats_file_name
from tarflow.lit.callbacks.reference import logged_reference_stats
from tests.integration.test_sampling_callback import TinyExtractor


def images(n: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1
    return TensorDataset(x, torch.zeros(n, dtype=torch.long))


def test_a_reference_is_named_by_the_images_it_holds(tmp_path: Path, monkeypatch) -> None:
    asked = tmp_path / stats_file_name("fake", 8, 1, "train", 300)
    said: list[str] = []
    monkeypatch.setattr("tarflow.lit.callbacks.reference.rank_zero_info", said.append)
    with pytest.warns(UserWarning, match="300 train images asked for, but the dataset holds "
                                         "only 48") as caught:
        reference = logged_reference_stats(asked, images(48), TinyExtractor(), [],
                                           split="train", count=300, batch_size=16)
    assert len([w for w in caught if "asked for" in str(w.message)]) == 1
    held = tmp_path / "fake_8px_c1_train48.npz"
    assert not asked.exists() and held.is_file()
    assert reference.count == 48 and Path(reference.meta["path"]) == held.resolve()
    assert FeatureStats.load(held).count == 48
    assert said[0] == f"FID reference statistics: computing {held} from 48 train images"
    # The next run finds the file by the same rule and reads it (no recomputation).
    before = held.stat().st_mtime_ns
    with pytest.warns(UserWarning, match="asked for"):
        again = reference_stats(asked, images(48), TinyExtractor(), split="train", count=300)
    assert held.stat().st_mtime_ns == before and again.count == 48


def test_enough_images_keep_the_asked_name_and_say_nothing(tmp_path: Path) -> None:
    asked = tmp_path / stats_file_name("fake", 8, 1, "train", 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference = reference_stats(asked, images(48), TinyExtractor(), split="train", count=16)
    assert asked.is_file() and reference.count == 16


def test_a_name_of_the_users_own_is_kept(tmp_path: Path) -> None:
    mine = tmp_path / "my_reference.npz"
    with pytest.warns(UserWarning, match="holds only 5"):
        reference_stats(mine, images(5), TinyExtractor(), split="train", count=300)
    assert mine.is_file() and load_reference(mine).count == 5


def test_too_few_images_are_refused(tmp_path: Path) -> None:
    assert MIN_REFERENCE_IMAGES == 2
    asked = tmp_path / stats_file_name("fake", 8, 1, "val", 300)
    with pytest.raises(ValueError, match="holds 1 image"):
        reference_stats(asked, images(1), TinyExtractor(), split="val", count=300)
    assert not list(tmp_path.iterdir())
