"""Issue 22 item 8: ``tarflow-train --help`` says what the command does and lists only what
works there; the unreadable-image warning reaches ``train.log``, not only stderr."""

from __future__ import annotations

from pathlib import Path

from tarflow.conf import CONFIG_DIR
from tests.reliability.helpers import run_cli, train_overrides
from tests.reliability.test_runtime_faults import folder_overrides, image_folder


def test_train_help_starts_with_a_description_and_examples(tmp_path: Path) -> None:
    result = run_cli("train", "--help", cwd=tmp_path)
    assert result.code == 0, result.err[-2000:]
    text = result.out
    head = text.split("== Config ==", 1)[0]
    assert text.startswith("tarflow-train: train a TarFlow")
    assert "Powered by Hydra" not in text.splitlines()[0]
    assert "tarflow-train experiment=img64_cond" in head and "ckpt_path=" in head
    groups = dict(line.split(": ", 1) for line in
                  head.split("== Config groups (group=option) ==", 1)[1].strip().splitlines())
    assert "optuna_train" in groups["hparams_search"]  # the training search (issue 28)
    assert "base" not in groups["model"].split(", ") and "tiny" in groups["model"]
    # Every other group and option of the config directory is offered.
    for group in Path(CONFIG_DIR).iterdir():
        if group.is_dir() and group.name not in ("hparams_search", "hydra", "__pycache__"):
            options = {p.stem for p in group.glob("*.yaml")} - {"base"}
            assert set(groups[group.name].split(", ")) == options, group.name


def test_an_unreadable_image_warning_reaches_train_log(tmp_path: Path) -> None:
    image_folder(tmp_path / "images", train_images=16, bad=1)
    args = [*folder_overrides(tmp_path / "images"), "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1"]
    result = run_cli("train", *train_overrides(tmp_path, base=tuple(args)), cwd=tmp_path)
    assert result.code == 0, result.err[-3000:]
    assert "Unreadable image" in result.err  # still shown on stderr, as Python shows warnings
    log = (tmp_path / "run" / "train.log").read_text()
    line = next(ln for ln in log.splitlines() if "Unreadable image" in ln)
    assert "[WARNING]" in line and "DataWarning" in line and "000.png" in line
