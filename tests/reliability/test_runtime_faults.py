"""Faults during a run: bad image files, non-finite numbers, logging outages and a failing DDP
rank (issue 7, items 3, 5, 6 and 7)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from tarflow.cli import train as train_cli
from tarflow.cli.train import train
from tarflow.data import DataWarning
from tarflow.lit import wandb_utils
from tarflow.lit.callbacks.media import RoundMedia, log_media
from tarflow.lit.callbacks.sampling import SamplingCallback
from tarflow.lit.safe_logging import LoggingFailureWarning, guard_logger, logging_failures
from tarflow.model import TarFlow
from tests.integration.conftest import compose_train
from tests.integration.test_sampling_callback import tiny_data, tiny_module, trainer
from tests.reliability.helpers import (
    QUIET_HYDRA,
    REPO,
    TINY,
    assert_one_line_error,
    call_main,
    csv_losses,
    subprocess_env,
)
from tests.reliability.hooks import PoisonBatchAt, finite_state


# ----------------------------------------------------------------------------- item 3: bad files
def image_folder(root: Path, *, train_images: int, bad: int) -> list[Path]:
    """Flat train/ and val/ folders of 8x8 PNGs in mixed modes (L, RGB, RGBA, P, converted to
    one channel on load); the first ``bad`` train files are garbage or truncated."""
    modes = ("L", "RGB", "RGBA", "P")
    bad_files = []
    for split, count in (("train", train_images), ("val", 8)):
        folder = root / split
        folder.mkdir(parents=True)
        for i in range(count):
            gen = torch.Generator().manual_seed(i)
            pixels = torch.randint(0, 256, (8, 8, 3), generator=gen, dtype=torch.uint8)
            path = folder / f"{i:03d}.png"
            Image.fromarray(pixels.numpy()).convert(modes[i % 4]).save(path)
            if split == "train" and i < bad:
                data = path.read_bytes()
                # Alternate two kinds of damage: random bytes, and a file cut short.
                path.write_bytes(b"not a png at all" if i % 2 else data[: len(data) // 2])
                bad_files.append(path)
    return bad_files


def folder_overrides(root: Path) -> list[str]:
    return [
        *[o for o in TINY if not o.startswith(("data=", "data.train_kwargs", "data.val_kwargs"))],
        "data=imagenet128",
        f"data.root={root}",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "data.pin_memory=false",
        "trainer.max_epochs=1",
        "+data.dataset_kwargs.max_bad=2",
        "+data.dataset_kwargs.max_bad_fraction=0.0",
        "logger=csv",
    ]


def test_a_few_corrupt_images_are_skipped_with_a_count(tmp_path: Path) -> None:
    bad = image_folder(tmp_path / "images", train_images=16, bad=2)
    cfg = compose_train(tmp_path, folder_overrides(tmp_path / "images"))
    with pytest.warns(DataWarning) as caught:
        result = train(cfg)
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 2 and "2 bad so far, 2 tolerated" in messages[-1], messages
    assert {p.name for p in bad} == {m.split()[2].rsplit("/", 1)[-1] for m in messages}
    TarFlow.from_checkpoint(result["last_ckpt"])  # the run trained and saved


def test_too_many_corrupt_images_fail_naming_the_last(tmp_path: Path, capsys) -> None:
    bad = image_folder(tmp_path / "images", train_images=16, bad=3)
    argv = [
        "tarflow-train",
        *folder_overrides(tmp_path / "images"),
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.root_dir={tmp_path}",
        *QUIET_HYDRA,
    ]
    with pytest.warns(DataWarning) as caught:
        result = call_main(train_cli.main, argv, capsys)
    line = assert_one_line_error(result, "3 unreadable images", "the last was")
    warned = {str(w.message).split()[2] for w in caught if issubclass(w.category, DataWarning)}
    last = next(str(p) for p in bad if f"the last was {p} " in line)
    assert warned | {last} == {str(p) for p in bad}  # two warned about, the third named


# ----------------------------------------------------------------------------- item 5: numerics
def test_sampling_callback_reports_the_overflow_fallback(tmp_path: Path) -> None:
    """A block whose Jacobi iterates overflow (its output projection scaled up): the round
    re-solves those samples sequentially, warns, and logs ``sampling/fallback`` > 0. (In float32
    this block overflows sequentially too, which is warned about separately; that the fallback
    reproduces the sequential result is tests/unit/test_sampling.py's job.)"""
    module = tiny_module()
    with torch.no_grad():
        module.net.blocks[0].proj_out.weight.mul_(3.0)
    callback = SamplingCallback(
        {"name": "jacobi", "schedule": "jacobi", "init": "zeros"},
        num_samples=8,
        batch_size=8,
        grid_size=4,
        probe_size=0,
        fid_stats_path=None,
    )
    logger = CSVLogger(tmp_path, name="csv")
    with pytest.warns(RuntimeWarning, match="re-solving those with the sequential loop"):
        run = trainer(tmp_path, [callback], logger=logger)
        run.validate(module, tiny_data())
    assert run.callback_metrics["sampling/fallback"] > 0
    rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("sampling/fallback")
    assert float(rows[1].split(",")[column]) > 0


def test_nan_loss_stops_before_a_poisoned_checkpoint(tmp_path: Path) -> None:
    """NaN images in the batch that starts at global step 6 (epoch 1, batch index 2)."""
    cfg = compose_train(tmp_path, [*TINY, "trainer.max_epochs=3", "logger=csv"])
    with pytest.raises(FloatingPointError, match=r"global step 6 \(epoch 1, batch index 2\)"):
        train(cfg, callbacks=[PoisonBatchAt(6)])
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert checkpoints, "the epoch-0 checkpoint is missing"
    for path in checkpoints:
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["global_step"] == 4, path  # nothing was saved after the NaN
        assert finite_state(ckpt["state_dict"]) and finite_state(ckpt["current_model_state"])


# ----------------------------------------------------------------------------- item 6: logging
def test_training_survives_a_logger_that_always_raises(tmp_path: Path) -> None:
    cfg = compose_train(
        tmp_path,
        [
            *TINY,
            "logger=csv",
            "trainer.max_epochs=1",
            "+logger.broken._target_=tests.reliability.hooks.ExplodingLogger",
            f"+logger.broken.save_dir={tmp_path / 'broken'}",
        ],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count our own once-per-method logic, not Python's
        result = train(cfg)
    failed = [str(w.message) for w in caught if issubclass(w.category, LoggingFailureWarning)]
    for method in ("log_hyperparams", "log_metrics", "save", "finalize"):
        assert sum(f"ExplodingLogger.{method} failed" in m for m in failed) == 1, (method, failed)
    broken = result["trainer"].loggers[1]
    assert logging_failures(broken)["log_metrics"] >= 4  # every step tried, one warning
    TarFlow.from_checkpoint(result["last_ckpt"])
    # The healthy logger beside it logged every step.
    assert sorted(csv_losses(tmp_path / "run" / "csv" / "version_0" / "metrics.csv")) == [
        0,
        1,
        2,
        3,
    ]


class BrokenWandb(WandbLogger):
    """W&B whose media uploads fail (never started: offline and nothing is logged)."""

    def log_image(self, *args, **kwargs) -> None:
        raise ConnectionError("media upload failed")

    def log_table(self, *args, **kwargs) -> None:
        raise ConnectionError("media upload failed")


def test_media_logging_failures_are_contained(tmp_path: Path) -> None:
    logger = guard_logger(BrokenWandb(save_dir=str(tmp_path), offline=True))
    assert isinstance(logger, WandbLogger)  # media.py still routes W&B objects to it
    media = RoundMedia(
        step=1,
        epoch=0,
        grid=Image.new("L", (4, 4)),
        caption="grid",
        columns=["block", "crm"],
        rows=[[0, 1.0]],
    )
    with pytest.warns(LoggingFailureWarning) as caught:
        log_media([logger], media)
    assert sorted(str(w.message).split()[1] for w in caught) == [
        "BrokenWandb.log_image",
        "BrokenWandb.log_table",
    ]
    assert logging_failures(logger) == {"log_image": 1, "log_table": 1}


class FakeWandb:
    """Stands in for ``WandbLogger``: starting online fails as it does without a network."""

    def __init__(self, *, offline: bool, **kwargs) -> None:
        self.offline = offline

    @property
    def experiment(self) -> object:
        if not self.offline:
            raise ConnectionError("api.wandb.ai: Name or service not known")
        return object()


def test_no_network_falls_back_to_offline_wandb_with_one_warning(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr("lightning.pytorch.loggers.WandbLogger", FakeWandb)
    monkeypatch.setenv("WANDB_MODE", "online")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = wandb_utils.wandb_logger(save_dir=str(tmp_path))
    assert isinstance(logger, FakeWandb) and logger.offline
    assert len(caught) == 1 and "logging offline instead" in str(caught[0].message)


UNREACHABLE_WANDB = """
import warnings
warnings.simplefilter("always")
from tarflow.lit.wandb_utils import finish_wandb, wandb_logger
logger = wandb_logger(save_dir={save_dir!r})
logger.log_metrics({{"loss": 1.0}}, step=0)
finish_wandb([logger])
print("logger", type(logger).__name__, logger._offline)
"""


@pytest.mark.slow
def test_real_wandb_without_network_goes_offline(tmp_path: Path) -> None:
    """The real client with a key but an unreachable server (about 40 s: W&B's init timeout).
    W&B keeps the failed run registered in its service and ignores WANDB_MODE once a session
    exists; the retry must still produce an offline run under the same id."""
    env = subprocess_env(
        tmp_path / "wandb_home",
        WANDB_MODE="online",
        WANDB_API_KEY="a" * 40,
        WANDB_BASE_URL="http://127.0.0.1:9",
        WANDB_INIT_TIMEOUT="20",
    )
    code = UNREACHABLE_WANDB.format(save_dir=str(tmp_path / "run"))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logger WandbLogger True" in proc.stdout, proc.stdout[-2000:]
    assert proc.stderr.count("logging offline instead") == 1, proc.stderr[-3000:]
    run_id = wandb_utils.run_id_for(tmp_path / "run")
    assert list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))


def test_closing_a_crashed_wandb_run_only_warns() -> None:
    class Run:
        def finish(self) -> None:
            raise BrokenPipeError("wandb service gone")

    class Holder:
        _experiment = Run()

    with pytest.warns(UserWarning, match="could not be closed"):
        wandb_utils.finish_wandb([Holder()])


# ----------------------------------------------------------------------------- item 7: DDP
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_failing_rank_ends_every_independent_rank(tmp_path: Path) -> None:
    """Two ranks started on their own (as ``srun`` starts them), so no launcher kills the
    healthy rank when the other dies. Rank one fails while sampling; rank zero must end with
    the shared failure flag's error naming rank one, not wait in a collective or die on a
    gloo "connection closed by peer" error.

    (``tests/integration/test_sampling_callback.py`` runs the same failure under
    ``ddp_spawn``, whose launcher terminates the other workers itself: that test also passes
    with the flag removed, so it cannot show the flag works.)
    """
    env = subprocess_env(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", NODE_RANK="0"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.ddp_rank", str(tmp_path)],
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    deadline, outputs = time.monotonic() + 180, []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[1])
    except subprocess.TimeoutExpired:
        pytest.fail("a rank was still running after 180 s: the failure was not shared")
    finally:
        for proc in procs:  # only the processes started here
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert procs[1].returncode != 0 and "injected failure on rank one" in outputs[1], outputs[1]
    assert procs[0].returncode != 0, outputs[0][-3000:]
    assert "rank(s) [1] failed while sampling" in outputs[0], outputs[0][-3000:]
