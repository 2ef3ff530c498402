"""Fixtures of the reliability suite: offline W&B, one torch thread, clean logging state, and one
finished tiny training run that tests copy before they touch it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from tests.reliability.helpers import run_cli, train_overrides


@pytest.fixture(autouse=True)
def _offline_and_quiet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network, no key, no W&B files outside tmp_path, and no debug switches from the
    caller's shell (they would turn the one-line errors under test into tracebacks)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    for var in ("TARFLOW_DEBUG", "HYDRA_FULL_ERROR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The tiny models here run faster on one thread, and much faster when another process
    keeps the cores busy (two threads then spin-wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def clean_hydra() -> Iterator[None]:
    """For in-process ``main()`` calls: Hydra installs log handlers (one writes into the run
    dir) and a global instance; put both back so later tests see the state they expect."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    GlobalHydra.instance().clear()
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of a finished ``tarflow-train`` run: the tiny model on 8x8 fake images,
    started with ``trainer.max_epochs=1 trainer.limit_train_batches=2`` (W&B offline + CSV).
    Shared: copy it (``shutil.copytree``) before running anything that may write into it."""
    root = tmp_path_factory.mktemp("tiny_run")
    args = train_overrides(root, "trainer.max_epochs=1", "trainer.limit_train_batches=2")
    result = run_cli("train", *args, cwd=root)
    assert result.code == 0, result.err[-3000:]
    return root / "run"
