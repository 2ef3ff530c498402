"""The shard bookkeeping of a resumable sample set (tarflow/app/sample_shards.py): which members
are missing, how shards are dealt to ranks, what a half-written shard looks like to a reader,
and which identity key a refused resume names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tarflow.app.sample_shards import (
    SampleFolder,
    deal,
    differing_keys,
    missing_shards,
    save_adm_npz,
)


def test_a_fresh_set_is_cut_at_multiples_of_the_shard_size() -> None:
    assert missing_shards(10, [], 4) == [(0, 3), (4, 7), (8, 9)]
    assert missing_shards(3, [], 4) == [(0, 2)]
    with pytest.raises(ValueError, match="shard_size=0"):
        missing_shards(3, [], 0)


def test_only_members_no_finished_shard_holds_are_missing() -> None:
    # Shards of an earlier job with another shard size: the gaps, cut at the new multiples.
    assert missing_shards(12, [(0, 2), (6, 8)], 4) == [(3, 3), (4, 5), (9, 11)]
    assert missing_shards(8, [(0, 3), (4, 7)], 4) == []


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_missing_shard_goes_to_exactly_one_rank(world: int) -> None:
    todo = missing_shards(23, [(4, 7)], 4)
    dealt = [s for rank in range(world) for s in deal(todo, rank, world)]
    assert sorted(dealt) == todo
    sizes = [len(deal(todo, rank, world)) for rank in range(world)]
    assert max(sizes) - min(sizes) <= 1


def test_differing_keys_name_the_nested_key() -> None:
    a = {"seed": 0, "sampler": {"schedule": "jacobi", "tol": 0.0}, "num_samples": 8}
    b = {"seed": 0, "sampler": {"schedule": "sequential", "tol": 0.0}, "num_samples": 8}
    assert differing_keys(a, b) == [("sampler.schedule", "jacobi", "sequential")]
    assert differing_keys(a, a) == []


def _shard(folder: SampleFolder, first: int, last: int) -> None:
    n = last + 1 - first
    images = np.full((n, 2, 2, 1), first, np.uint8)
    folder.write_shard(range(first, last + 1), images, np.arange(first, last + 1),
                       np.ones(7))


def test_temporary_files_of_a_killed_write_are_never_read(tmp_path: Path) -> None:
    folder = SampleFolder(tmp_path)
    _shard(folder, 0, 1)
    _shard(folder, 4, 5)
    # What a kill during atomic_write leaves: a hidden temporary file, possibly truncated.
    (folder.shard_dir / ".000002-000003.npz.abc123.tmp").write_bytes(b"PK\x03\x04 trunc")
    assert folder.done() == [(0, 1), (4, 5)]
    assert missing_shards(6, folder.done(), 2) == [(2, 3)]
    with pytest.raises(ValueError, match="member 2 is missing"):
        folder.assemble(6)
    _shard(folder, 2, 3)
    whole = folder.assemble(6)
    assert whole.indices.tolist() == list(range(6)) and whole.labels.tolist() == list(range(6))
    assert whole.images[:, 0, 0, 0].tolist() == [0, 0, 2, 2, 4, 4]
    assert whole.tally.tolist() == [3.0] * 7  # summed over the three shards
    # Two ranks read back every shard once between them.
    read = [s.indices.tolist() for r in range(2) for s in folder.shards_of_rank(r, 2)]
    assert sorted(i for part in read for i in part) == list(range(6))
    # Removing the set's shards leaves anything else in the folder.
    (folder.shard_dir / "notes.txt").write_text("mine")
    assert folder.remove_shards(6) == 4
    assert [p.name for p in folder.shard_dir.iterdir()] == ["notes.txt"]


def test_the_npz_has_the_adm_layout(tmp_path: Path) -> None:
    images = np.zeros((3, 4, 4, 3), np.uint8)
    save_adm_npz(tmp_path / "s.npz", images, np.array([1, 2, 0]), np.arange(3))
    with np.load(tmp_path / "s.npz") as z:
        assert sorted(z.files) == ["arr_0", "arr_1", "indices"]
        assert z["arr_0"].shape == (3, 4, 4, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].dtype == np.int64 and z["arr_1"].tolist() == [1, 2, 0]
