"""LightningDataModule over :func:`tarflow.data.build_dataset`.

The module only wires ring-1 datasets into DataLoaders. Two choices matter for reproducibility:

* Shuffling uses :class:`EpochShuffleSampler`, whose order is a pure function of
  ``(seed, epoch)``. Lightning calls ``set_epoch`` on it every epoch, so a run resumed from an
  end-of-epoch checkpoint sees exactly the batches an uninterrupted run would have seen; a
  ``RandomSampler`` would restart its generator on resume.
* The training loader is resumable (:class:`ResumableLoader`, Lightning's ``state_dict`` /
  ``load_state_dict`` interface): a checkpoint records the epoch and the batches consumed in it,
  so a run resumed from a mid-epoch checkpoint (``trainer.val_check_interval`` < 1) skips the
  batches already trained on and continues with the ones the uninterrupted run saw next.
* Under DDP the sampler shards that order round-robin over ranks, so the union of the per-rank
  batches at step k is the single-process batch k of size ``world * batch_size``; the global
  batch, not the per-device one, is what a run is defined by.

Data facts (``img_size``, ``channels``, ``num_classes``) are declared in the data config and read
by the model config through interpolation; :meth:`TarFlowDataModule.setup` checks that the built
dataset agrees with them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tarflow.data import DataError, build_dataset


class EpochShuffleSampler(DistributedSampler):
    """A permutation of ``range(length)`` fixed by ``(seed, epoch)``, sharded over ranks.

    Rank r of W takes positions r, r + W, r + 2W, ... of the (padded) permutation, so the union
    of the ranks' k-th batches of size B is the single-process k-th batch of size W * B. It is a
    ``DistributedSampler`` only so that Lightning does not wrap it in a second, differently
    seeded shuffle; it needs no process group.

    Args:
        length: dataset size.
        seed: base seed; the permutation for epoch e is seeded with ``seed * 1_000_003 + e``.
        shuffle: False keeps ``0 .. length - 1`` in order (validation).
        num_replicas: world size W.
        rank: this process's global rank.
        drop_last: drop the tail that does not divide by W instead of padding it by repetition.
    """

    def __init__(
        self,
        length: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        # DistributedSampler.__init__ wants a dataset and a process group; set its fields here.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.length = int(length)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0  # positions of this rank's share the next iteration skips (resume)
        if drop_last:
            self.num_samples = self.length // self.num_replicas
        else:
            self.num_samples = math.ceil(self.length / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=gen).tolist()
        else:
            order = list(range(self.length))
        if self.total_size > len(order):  # pad by repetition so every rank has equal work
            reps = math.ceil(self.total_size / max(1, len(order)))
            order = (order * reps)[: self.total_size]
        order = order[: self.total_size]
        start, self.start = self.start, 0  # once: the resumed epoch, not the ones after it
        return iter(order[self.rank : self.total_size : self.num_replicas][start:])


class ResumableLoader(DataLoader):
    """A training DataLoader whose position in the epoch goes into checkpoints.

    ``consumed`` counts the batches the training loop took this epoch (the datamodule adds one
    per training batch); :meth:`position` is what a checkpoint records, and :meth:`resume_at`
    makes the next iteration skip those batches in the sampler, so no image is read twice and
    none is missed. The datamodule saves and restores the position (its own ``state_dict``):
    Lightning restores the datamodule before it first builds this loader, whereas its call of
    a loader's ``load_state_dict`` is skipped when the loader was built early (a cosine
    schedule asks for ``estimated_stepping_batches``), so that call does nothing here; the
    method exists so Lightning counts the loader as resumable.

    Args:
        *args, **kwargs: as for ``DataLoader``; ``sampler`` must be an
            :class:`EpochShuffleSampler` and ``batch_size`` set.
        epoch_batches: the batches an epoch trains on (Lightning's ``num_training_batches``,
            which ``limit_train_batches`` may cut): a checkpoint after the last one is an
            end-of-epoch checkpoint, resumed at the next epoch's start.
    """

    def __init__(self, *args: Any, epoch_batches: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_batches = epoch_batches or (lambda: len(self))
        self.consumed = 0

    def __iter__(self):
        self.consumed = self.sampler.start // self.batch_size
        return super().__iter__()

    def position(self) -> dict[str, int]:
        """The epoch to resume in and the batches of it already trained on."""
        if self.consumed >= self.epoch_batches():
            return {"epoch": self.sampler.epoch + 1, "batches": 0}
        return {"epoch": self.sampler.epoch, "batches": self.consumed}

    def resume_at(self, position: dict[str, int]) -> None:
        self.sampler.set_epoch(int(position["epoch"]))
        self.sampler.start = int(position["batches"]) * self.batch_size

    def state_dict(self) -> dict[str, int]:
        return self.position()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Nothing: the datamodule has restored the position (see the class docstring)."""


class TarFlowDataModule(L.LightningDataModule):
    """Train / val datasets for TarFlow with per-device batches.

    Args:
        name: dataset registry name (``demo``, ``fake``, ``imagenet64``, ``imagenet128``, ``afhq``).
        img_size: image side S.
        channels: image channels C.
        num_classes: class count the config promises (0 = unconditional data); checked in setup.
        root: data location for on-disk datasets (also a ``tarflow-prepare`` directory).
        batch_size: batch size per device (global batch = batch_size * devices * num_nodes).
        val_batch_size: per-device validation batch; None = ``batch_size``.
        num_workers: DataLoader worker processes per device.
        pin_memory: pin host memory (useful on GPU only).
        persistent_workers: keep workers alive between epochs (only when num_workers > 0).
        flip: random horizontal flip on the train split (ignored by demo / fake).
        seed: shuffling seed.
        drop_last: drop the last incomplete training batch (keeps every step the same size).
        dataset_kwargs: extra keyword arguments for both splits (e.g. ``num_classes`` for fake).
        train_kwargs: extra keyword arguments for the train dataset (e.g. ``length`` for fake).
        val_kwargs: extra keyword arguments for the val dataset.
        val_split: name of the held-out split.
    """

    def __init__(
        self,
        name: str,
        *,
        img_size: int,
        channels: int = 3,
        num_classes: int = 0,
        root: str | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        flip: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        dataset_kwargs: dict[str, Any] | None = None,
        train_kwargs: dict[str, Any] | None = None,
        val_kwargs: dict[str, Any] | None = None,
        val_split: str = "val",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.name = name
        self.img_size = int(img_size)
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.root = root
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.flip = flip
        self.seed = int(seed) if seed is not None else 0
        self.drop_last = drop_last
        shared = dict(dataset_kwargs or {})
        self.train_kwargs = {**shared, **(train_kwargs or {})}
        self.val_kwargs = {**shared, **(val_kwargs or {})}
        self.val_split = val_split
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._train_loader: ResumableLoader | None = None
        self._resume: dict[str, int] | None = None  # the checkpoint's data position

    def _build(self, split: str, extra: dict[str, Any]) -> Dataset:
        ds = build_dataset(
            self.name,
            root=self.root,
            img_size=self.img_size,
            split=split,
            channels=self.channels,
            flip=self.flip,
            **extra,
        )
        # The model was sized from the config, so a disagreeing dataset is a config error.
        for attr, want in (
            ("img_size", self.img_size),
            ("channels", self.channels),
            ("num_classes", self.num_classes),
        ):
            got = getattr(ds, attr, want)
            if int(got) != want:
                raise DataError(
                    f"dataset {self.name!r} ({split}) has {attr}={got} but the data "
                    f"config says {want}; fix data.{attr}"
                )
        if len(ds) == 0:
            raise DataError(f"dataset {self.name!r} ({split}) is empty")
        return ds

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets once (every rank builds its own; they are cheap to construct)."""
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._build("train", self.train_kwargs)
        if self.val_set is None and stage in (None, "fit", "validate"):
            self.val_set = self._build(self.val_split, self.val_kwargs)

    def _loader(self, ds: Dataset, batch_size: int, *, train: bool) -> DataLoader:
        trainer = self.trainer  # None outside a Trainer (notebooks, tests)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = EpochShuffleSampler(
            len(ds), seed=self.seed, shuffle=train, num_replicas=world, rank=rank
        )
        extra: dict[str, Any] = {}
        if train and trainer is not None:
            extra["epoch_batches"] = lambda: trainer.num_training_batches
        return (ResumableLoader if train else DataLoader)(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            # Never drop validation images: val/bpd must cover the whole split.
            drop_last=self.drop_last and train and len(ds) >= batch_size,
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        self._train_loader = self._loader(self.train_set, self.batch_size, train=True)
        if self._resume is not None:
            self._train_loader.resume_at(self._resume)
            self._resume = None
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        """The training data position (saved in every checkpoint)."""
        loader = self._train_loader
        return {} if loader is None else {"train_position": loader.position()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restored before the training loader is built, which then resumes at the position."""
        self._resume = state_dict.get("train_position")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches taken: the data position a checkpoint records."""
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.consumed += 1
        return batch

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set, self.val_batch_size, train=False)
