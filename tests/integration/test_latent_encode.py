"""``tarflow-encode``: shards and manifest, resuming an interrupted run, refusing to mix
configurations, and sharding the work over 2 CPU processes under torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from tarflow.cli import encode
from tarflow.data import build_dataset
from tarflow.data.latents import DRAFT, MANIFEST, LatentDataset, read_manifest, shard_name
from tarflow.model.autoencoder import Autoencoder, resolve_autoencoder
from tests.integration.conftest import CONF_DIR, REPO

# 8x8x1 fake images with 3 classes: 20 train items in shards of 8 (8, 8, 4), 6 val items.
DATA = ["data=fake", "data.img_size=8", "data.channels=1", "data.num_classes=3",
        "data.dataset_kwargs.num_classes=3", "data.train_kwargs.length=20",
        "data.val_kwargs.length=6", "encode.shard_size=8", "encode.batch_size=3",
        "encode.progress=false"]


def encode_overrides(tmp_path: Path, autoencoder: Path, out: Path) -> list[str]:
    return [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'logs'}",
            "experiment=demo_latent", *DATA, "data.latent_size=4", "data.latent_channels=4",
            f"model.autoencoder.path={autoencoder}", f"data.latents={out}"]


def compose_encode(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("encode", overrides=overrides)


def shards(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.relative_to(root).as_posix(): torch.load(p, weights_only=True)
            for p in sorted(root.glob("*/shard-*.pt"))}


def test_writes_shards_a_manifest_and_the_autoencoders_latents(
        tmp_path: Path, tiny_autoencoder: Path, capsys) -> None:
    out = tmp_path / "latents"
    manifest = encode.run(compose_encode(encode_overrides(tmp_path, tiny_autoencoder, out)))
    assert read_manifest(out) == manifest and manifest["complete"]
    record = resolve_autoencoder({"path": str(tiny_autoencoder), "chunk_size": 256})
    assert manifest["autoencoder"] == record.to_dict()  # what decodes these latents
    assert manifest["source"]["name"] == "fake" and manifest["source"]["img_size"] == 8
    assert manifest["latent_shape"] == [4, 4, 4] and manifest["flip"] == "none"
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [8, 8, 4]
    assert sorted(shards(out)) == [shard_name("train", k) for k in range(3)] + [
        shard_name("val", 0)]
    # The stored latents are the autoencoder's (float16 storage) of the images in order.
    images = build_dataset("fake", img_size=8, split="val", channels=1, flip=False, length=6,
                           num_classes=3)
    x = torch.stack([images[i][0] for i in range(6)])
    want = Autoencoder.load(record).encode(x)
    got = torch.stack([z for z, _ in LatentDataset(out, "val", random=False)])
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
    labels = [int(y) for _, y in LatentDataset(out, "val")]
    assert labels == [int(images[i][1]) for i in range(6)]
    capsys.readouterr()
    encode.run(compose_encode(encode_overrides(tmp_path, tiny_autoencoder, out)))
    assert "nothing to do" in capsys.readouterr().out  # a finished directory is left alone


def test_an_interrupted_encoding_resumes_and_keeps_finished_shards(
        tmp_path: Path, tiny_autoencoder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "latents"
    overrides = [*encode_overrides(tmp_path, tiny_autoencoder, out), "encode.flip=true"]
    real_write, written = encode.write_shard, []

    def write_then_die(path, payload):
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C after two shards
        real_write(path, payload)
        written.append(path)

    monkeypatch.setattr(encode, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        encode.run(compose_encode(overrides))
    assert (out / DRAFT).is_file() and not (out / MANIFEST).exists()
    with pytest.raises(ValueError, match="interrupted; run the same tarflow-encode command"):
        LatentDataset(out, "train")  # nothing is read from an unfinished directory
    kept = {p: p.stat().st_mtime_ns for p in written}
    monkeypatch.setattr(encode, "write_shard", real_write)
    encode.run(compose_encode(overrides))
    assert {p: p.stat().st_mtime_ns for p in written} == kept  # finished shards were kept
    # The resumed directory equals an uninterrupted encoding.
    fresh = tmp_path / "fresh"
    encode.run(compose_encode([*encode_overrides(tmp_path, tiny_autoencoder, fresh),
                               "encode.flip=true"]))
    a, b = shards(out), shards(fresh)
    assert sorted(a) == sorted(b)
    for name in a:
        # Train items as the image and its mirror (n, 2, c, h, w); val items as they are.
        assert a[name]["latents"].shape[1:] == ((2, 4, 4, 4) if name.startswith("train")
                                                else (4, 4, 4))
        torch.testing.assert_close(a[name]["latents"], b[name]["latents"], rtol=0, atol=0)
        assert torch.equal(a[name]["indices"], b[name]["indices"])
    assert read_manifest(out)["splits"] == read_manifest(fresh)["splits"]
    # Another configuration aimed at the same directory is refused, naming what differs.
    with pytest.raises(ValueError, match="holds latents of another configuration .*flip"):
        encode.run(compose_encode([*encode_overrides(tmp_path, tiny_autoencoder, out)]))


def test_refuses_bad_settings_before_reading_images(tmp_path: Path,
                                                    tiny_autoencoder: Path) -> None:
    base = encode_overrides(tmp_path, tiny_autoencoder, tmp_path / "latents")
    pixel_model = [f"paths.root_dir={tmp_path}", *DATA, f"encode.out_dir={tmp_path / 'x'}"]
    with pytest.raises(ValueError, match="model.autoencoder is not set"):
        encode.run(compose_encode(pixel_model))
    with pytest.raises(ValueError, match="encode.shard_size=0 must be >= 1"):
        encode.run(compose_encode([*base, "encode.shard_size=0"]))
    with pytest.raises(ValueError, match="data.img_size=9 is not divisible"):
        encode.run(compose_encode([*base, "data.img_size=9"]))
    with pytest.raises(ValueError, match="does not exist; train the demo's"):
        encode.run(compose_encode([*base, f"model.autoencoder.path={tmp_path / 'none'}"]))
    assert not (tmp_path / "latents").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_the_shards_and_write_what_one_would(
        tmp_path: Path, tiny_autoencoder: Path) -> None:
    single, double = tmp_path / "one", tmp_path / "two"
    encode.run(compose_encode(encode_overrides(tmp_path, tiny_autoencoder, single)))
    overrides = [*encode_overrides(tmp_path, tiny_autoencoder, double),
                 f"hydra.run.dir={tmp_path / 'ddp'}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "tarflow.cli.encode", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Rank r of 2 took the shards k with k % 2 == r.
    assert "rank 0/2 encoded shards train:0, train:2, val:0" in proc.stdout, proc.stdout
    assert "rank 1/2 encoded shards train:1" in proc.stdout, proc.stdout
    a, b = shards(single), shards(double)
    assert sorted(a) == sorted(b)
    for name in a:  # other processes, other thread counts: float16 rounding may differ
        torch.testing.assert_close(a[name]["latents"], b[name]["latents"], rtol=1e-3,
                                   atol=1e-3)
        assert torch.equal(a[name]["labels"], b[name]["labels"])
    one, two = read_manifest(single), read_manifest(double)
    assert one["splits"] == two["splits"] and one["autoencoder"] == two["autoencoder"]


def test_encodes_the_imagenet_npz_layout_with_both_orientations(tmp_path: Path) -> None:
    """experiment=imagenet256_latent's encoder on data=imagenet64's official npz files (RGB,
    flips on), with a random 8x-downsampling autoencoder standing in for Stable Diffusion's."""
    import numpy as np

    from tarflow.data import write_imagenet_npz
    from tests.conftest import save_tiny_autoencoder

    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet64"
    labels = {"train_data_batch_1": rng.integers(0, 1000, 10), "val_data": rng.integers(0, 1000, 4)}
    for name, y in labels.items():
        write_imagenet_npz(root / name, rng.integers(0, 256, (len(y), 16, 16, 3), np.uint8), y)
    rgb = save_tiny_autoencoder(tmp_path / "rgb8", image_channels=3, widths=(8, 8, 8, 8))
    out = tmp_path / "latents"
    manifest = encode.run(compose_encode([
        f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'logs'}",
        "experiment=imagenet256_latent", "data=imagenet64", f"data.root={root}",
        "data.img_size=16", "data.latent_size=2", "data.num_workers=0",
        f"model.autoencoder.path={rgb}", f"data.latents={out}", "encode.progress=false"]))
    assert manifest["source"]["name"] == "imagenet64" and manifest["flip"] == "both"
    assert manifest["latent_shape"] == [4, 2, 2]
    assert (manifest["splits"]["train"]["count"], manifest["splits"]["val"]["count"]) == (10, 4)
    train = torch.load(out / shard_name("train", 0), weights_only=True)
    assert train["latents"].shape == (10, 2, 4, 2, 2)  # the image and its mirror
    assert train["labels"].tolist() == labels["train_data_batch_1"].tolist()
    assert [int(y) for _, y in LatentDataset(out, "val")] == labels["val_data"].tolist()
