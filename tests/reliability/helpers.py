"""Shared helpers of the reliability tests: console-script runners, subprocess environment and
readers for the files a training run leaves behind."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, TINY

# Hydra's job logging would install a file handler in every in-process run dir; not needed here.
QUIET_HYDRA = ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


@dataclass
class CliResult:
    """Exit status and captured output of one console-script run."""

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def train_overrides(
    tmp_path: Path, *extra: str, run: str = "run", base: tuple[str, ...] = tuple(TINY)
) -> list[str]:
    """``tarflow-train`` arguments: the tiny fake-data setup with every path under tmp_path."""
    return [*base, f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / run}", *extra]


def call_main(
    main: Callable[[], object], argv: list[str], capsys: pytest.CaptureFixture
) -> CliResult:
    """Run a console entry point in-process with ``sys.argv`` set, as the shell would."""
    saved = sys.argv
    sys.argv = argv
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def assert_one_line_error(result: CliResult, *fragments: str) -> str:
    """Exit status 2 and exactly one ``error: ...`` line on stderr containing ``fragments``."""
    assert result.code == 2, (result.code, result.err[-3000:])
    assert len(result.err_lines) == 1, result.err[-3000:]
    line = result.err_lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def subprocess_env(wandb_home: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment of a child run: offline W&B writing under ``wandb_home`` (default: what the
    test's environment says), one torch thread so runs compare bit for bit, the repo importable.
    """
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    if wandb_home is not None:
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            env[var] = str(wandb_home / var.lower())
    # WANDB_SERVICE is left behind by any W&B run earlier in this pytest process; a child that
    # inherits it attaches to that process's W&B service instead of starting its own.
    for var in ("TARFLOW_DEBUG", "HYDRA_FULL_ERROR", "WANDB_API_KEY", "WANDB_SERVICE"):
        env.pop(var, None)
    return {**env, **extra}


def train_process(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``python -m tarflow.cli.train <args>`` from the repo root."""
    return subprocess.Popen(
        [sys.executable, "-m", "tarflow.cli.train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    """Wait for a child (killing it on timeout, so no test leaves one behind)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child {proc.args[:4]} still running after {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def run_cli(command: str, *args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 240) -> CliResult:
    """``python -m tarflow.cli.<command> <args>`` in a fresh interpreter, as a user runs it."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", f"tarflow.cli.{command}", *args],
            cwd=cwd,
            env=env or subprocess_env(cwd / "wandb_home"),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"tarflow.cli.{command} still running after {timeout} s: {err.stderr}")
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def run_clis(calls: Sequence[tuple[str, Sequence[str]]], *, cwd: Path,
             workers: int = 2) -> list[CliResult]:
    """Several independent command lines, two at a time (each is mostly interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = [pool.submit(run_cli, command, *args, cwd=cwd) for command, args in calls]
        return [job.result() for job in jobs]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) with its bytes (None for directories)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def csv_loss_rows(metrics_csv: Path) -> list[tuple[int, str]]:
    """``(logger step, train/loss)`` rows of a CSVLogger file in file order, values kept as the
    written text so equality is bit-exact (the float repr round-trips)."""
    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [(int(r["step"]), r["train/loss"]) for r in rows if r.get("train/loss")]


def csv_losses(metrics_csv: Path) -> dict[int, str]:
    """``{logger step: train/loss}`` of a CSVLogger file (a step logged twice, as after a
    resume, keeps its later row)."""
    return dict(csv_loss_rows(metrics_csv))
