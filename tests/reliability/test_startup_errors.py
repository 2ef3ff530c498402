"""Bad configuration, bad data paths and bad checkpoints stop the console scripts at start-up
with one ``error: ...`` line and exit status 2 (issue 7, items 2, 3 and 4).

The entry points run in-process with ``sys.argv`` set (each case costs a Hydra composition, not
an interpreter start); one case goes through the installed console script in a subprocess to
check the real stderr. "At start-up" is checked by what the run dir does not contain: no W&B
run, no CSV log, no checkpoint.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tarflow.cli import evaluate, sample, train
from tarflow.eval import FeatureStats
from tarflow.model import TarFlow, preset
from tests.reliability.helpers import (
    QUIET_HYDRA,
    TINY,
    assert_one_line_error,
    call_main,
    subprocess_env,
    train_overrides,
)

pytestmark = pytest.mark.usefixtures("clean_hydra")

# TINY drops the validation sampling callback; the sampler checks need it configured.
WITH_SAMPLING = tuple(o for o in TINY if o != "~callbacks.sampling")


def run_train(tmp_path: Path, capsys, *extra: str, base: tuple[str, ...] = tuple(TINY)):
    argv = ["tarflow-train", *train_overrides(tmp_path, *extra, base=base), *QUIET_HYDRA]
    return call_main(train.main, argv, capsys)


def assert_nothing_started(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for name in ("wandb", "csv", "checkpoints"):
        assert not (run / name).exists(), f"{name}/ was created: the run got past start-up"


# ----------------------------------------------------------------------------- item 2: config
@pytest.mark.parametrize(
    ("extra", "base", "fragments"),
    [
        pytest.param(
            ["data.img_size=9"],
            TINY,
            ["img_size=9 is not divisible by patch_size=2"],
            id="image-size-vs-patch",
        ),
        pytest.param(
            ["model.head_dim=12"],
            TINY,
            ["channels=32 is not divisible by head_dim=12"],
            id="channels-vs-head",
        ),
        pytest.param(
            ["experiment=nope"],
            TINY,
            ["Could not find 'experiment/nope'", "demo"],
            id="unknown-experiment",
        ),
        pytest.param(
            ["model=nope"], TINY, ["Could not find 'model/nope'", "tiny"], id="unknown-preset"
        ),
        pytest.param(
            ["sampler=gs_jacobi"],
            WITH_SAMPLING,
            ["names block(s) [7]", "blocks 0..1"],
            id="schedule-names-missing-block",
        ),
        pytest.param(
            ["sampler.schedule='[0-32-4-10]'"],
            WITH_SAMPLING,
            ["asks for 32 segments", "N=16 tokens"],
            id="more-segments-than-tokens",
        ),
        pytest.param(
            ["sampler.tol=-0.1"],
            WITH_SAMPLING,
            ["sampler.tol=-0.1 must be >= 0"],
            id="negative-tolerance",
        ),
        pytest.param(
            ["init_from='???'"],
            TINY,
            ["mandatory value(s) not set", "init_from", "init_from=<value>"],
            id="mandatory-init-from-left-unset",
        ),
        pytest.param(
            ["sampler.guidance=1.0"],
            WITH_SAMPLING,
            ["guidance on an unconditional model needs attn_temp != 1"],
            id="guidance-without-attn-temp",
        ),
    ],
)
def test_bad_config_is_one_line(tmp_path: Path, capsys, extra, base, fragments) -> None:
    result = run_train(tmp_path, capsys, *extra, base=tuple(base))
    assert_one_line_error(result, *fragments)
    assert_nothing_started(tmp_path)


def test_fid_stats_of_another_resolution(tmp_path: Path, capsys) -> None:
    """A cached reference for 16 px images where the run trains 8 px ones: refused, not
    silently overwritten after the first epoch."""
    stats = FeatureStats().update(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "data" / "fid_stats" / "fake_8px_c1_train300.npz"
    path.parent.mkdir(parents=True)
    stats.save(path, dataset="fake", img_size=16, channels=1, split="train", count=4)
    result = run_train(tmp_path, capsys, base=WITH_SAMPLING)
    assert_one_line_error(result, str(path), "img_size=16 (this run: 8)")
    assert_nothing_started(tmp_path)


def test_debug_switch_keeps_the_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TARFLOW_DEBUG", "1")
    argv = ["tarflow-train", *train_overrides(tmp_path, "data.img_size=9"), *QUIET_HYDRA]
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        call_main(train.main, argv, capsys)


def test_console_script_prints_one_line(tmp_path: Path) -> None:
    """The installed ``tarflow-train`` in a fresh interpreter: the real stderr, warnings and all."""
    script = shutil.which("tarflow-train")
    command = [script] if script else [sys.executable, "-m", "tarflow.cli.train"]
    proc = subprocess.run(
        [*command, *train_overrides(tmp_path, "data.img_size=9")],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines == [
        "error: invalid TarFlow configuration: img_size=9 is not divisible by patch_size=2"
    ], proc.stderr[-3000:]


# ----------------------------------------------------------------------------- item 3: data
FOLDER_DATA = ("data.num_workers=0", "data.persistent_workers=false", "data.pin_memory=false")
ON_DISK = tuple(
    o for o in TINY if not o.startswith(("data=", "data.train_kwargs", "data.val_kwargs"))
)


@pytest.mark.parametrize("data", ["imagenet64", "imagenet128", "afhq256"])
def test_missing_data_root(tmp_path: Path, capsys, data: str) -> None:
    missing = tmp_path / "no" / data
    result = run_train(
        tmp_path, capsys, f"data={data}", f"data.root={missing}", *FOLDER_DATA, base=ON_DISK
    )
    assert_one_line_error(result, str(missing), "does not exist")
    assert_nothing_started(tmp_path)


def test_empty_data_directory(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_train(
        tmp_path, capsys, "data=imagenet128", f"data.root={empty}", *FOLDER_DATA, base=ON_DISK
    )
    assert_one_line_error(result, "No images", str(empty))
    assert_nothing_started(tmp_path)


@pytest.mark.parametrize(
    ("columns", "labels", "fragment"),
    [
        pytest.param(3 * 8 * 8, [0, 5, 1001, 7], "label(s) outside [1, 1000]", id="labels"),
        pytest.param(100, [1, 2, 3, 4], "not 3*S*S", id="shape"),
    ],
)
def test_bad_npz(tmp_path: Path, capsys, columns: int, labels: list[int], fragment: str) -> None:
    root = tmp_path / "imagenet64"
    root.mkdir()
    bad = root / "train_data_batch_1.npz"
    np.savez(bad, data=np.zeros((4, columns), np.uint8), labels=np.array(labels, np.int64))
    result = run_train(
        tmp_path,
        capsys,
        "data=imagenet64",
        f"data.root={root}",
        "data.channels=3",
        *FOLDER_DATA,
        base=ON_DISK,
    )
    assert_one_line_error(result, str(bad), fragment)
    assert_nothing_started(tmp_path)


# ----------------------------------------------------------------------------- item 4: checkpoints
@pytest.fixture(scope="module")
def truncated_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt")
    full = TarFlow(preset("tiny")).save_checkpoint(directory / "full.ckpt")
    data = Path(full).read_bytes()
    cut = directory / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])  # a save that died half-way, without atomic writes
    return cut


def _sample_argv(tmp_path: Path, ckpt: Path, name: str = "tarflow-sample") -> list[str]:
    return [
        name,
        f"ckpt_path={ckpt}",
        "device=cpu",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'out'}",
        *QUIET_HYDRA,
    ]


def test_sample_truncated_checkpoint(tmp_path: Path, capsys, truncated_checkpoint: Path) -> None:
    result = call_main(sample.main, _sample_argv(tmp_path, truncated_checkpoint), capsys)
    assert_one_line_error(result, str(truncated_checkpoint), "truncated")


@pytest.mark.parametrize("entry", [sample.main, evaluate.main], ids=["sample", "eval"])
def test_sample_and_eval_missing_checkpoint(tmp_path: Path, capsys, entry) -> None:
    missing = tmp_path / "nope.ckpt"
    result = call_main(entry, _sample_argv(tmp_path, missing), capsys)
    assert_one_line_error(result, "checkpoint not found", str(missing))


@pytest.mark.parametrize("which", ["missing", "truncated"])
def test_train_resume_from_bad_checkpoint(
    tmp_path: Path, capsys, truncated_checkpoint: Path, which: str
) -> None:
    ckpt = tmp_path / "gone" / "last.ckpt" if which == "missing" else truncated_checkpoint
    result = run_train(tmp_path, capsys, f"ckpt_path={ckpt}")
    assert_one_line_error(
        result, str(ckpt), "does not exist" if which == "missing" else "not a readable checkpoint"
    )
    assert_nothing_started(tmp_path)


def test_dataloader_worker_errors_keep_the_original_line() -> None:
    """With num_workers > 0 torch re-raises a worker's error with the worker's whole traceback
    in the message; the one-line report keeps only its last line."""
    from tarflow.app.errors import describe

    wrapped = ValueError(
        "Caught DataError in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "folder.py", line 1, in __getitem__\n'
        "tarflow.data.errors.DataError: 3 unreadable images in /data (tolerated: 2)"
    )
    assert describe(wrapped) == (
        "tarflow.data.errors.DataError: 3 unreadable images in /data (tolerated: 2)"
    )
