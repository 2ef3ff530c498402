"""A built wheel, installed without the checkout, trains: the configs ship inside the package.

Users ``pip install`` tarflow; nothing may be read from the source tree at run time. The wheel
is built from a copy of the tree (so a stale ``build/`` there cannot leak files in), installed
with ``--no-deps --target`` into a temp folder (torch and friends come from the environment,
not reinstalled), and its console script runs from a temp working directory with that folder
first on the path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.integration.conftest import REPO

# The checkout's own configs: every one must be inside the wheel.
CONF = REPO / "tarflow" / "conf"


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 300):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _checkout_clutter(folder: str, names: list[str]) -> set[str]:
    """Run outputs and build leftovers at the top of the checkout; caches anywhere."""
    top = {".git", "outputs", "build", "dist", "wandb", "data"} if Path(folder) == REPO else set()
    return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_checkout_clutter)
    # No build isolation: setuptools is already in the environment, and no registry is needed.
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", ".", "-w", str(tmp / "dist")], cwd=src)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp / "dist").glob("tarflow-*.whl"))
    target = tmp / "site"
    inst = _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                 str(target), str(wheel)], cwd=tmp)
    assert inst.returncode == 0, inst.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "offline"}
    work = tmp / "work"
    work.mkdir()
    return {"wheel": wheel, "target": target, "env": env, "work": work}


def test_wheel_holds_every_config(installed: dict) -> None:
    expected = {f"tarflow/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert len(expected) > 50  # the tree this test guards is really there
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert expected <= names, sorted(expected - names)[:10]


def test_wheel_holds_the_launch_wrappers(installed: dict) -> None:
    """torchrun and SLURM wrappers reach wheel users (scripts/ is not in the wheel)."""
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert {"tarflow/launch/torchrun.sh", "tarflow/launch/slurm.sbatch"} <= names
    script = installed["target"] / "bin" / "tarflow-launch"
    for name, marker in (("torchrun", "exec torchrun"), ("slurm", "#SBATCH --ntasks-per-node")):
        where = _run([sys.executable, str(script), "path", name], cwd=installed["work"],
                     env=installed["env"])
        assert where.returncode == 0, where.stderr[-2000:]
        path = Path(where.stdout.strip())
        assert path.is_relative_to(installed["target"]) and marker in path.read_text()
        # Both take the command first: sample and eval launch like training.
        assert "sample) MODULE=tarflow.cli.sample" in path.read_text()


def test_installed_package_is_the_one_imported(installed: dict) -> None:
    out = _run([sys.executable, "-c", "import tarflow.conf as c; print(c.CONFIG_DIR)"],
               cwd=installed["work"], env=installed["env"])
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(installed["target"])


def test_installed_train_composes_and_runs(installed: dict) -> None:
    script = installed["target"] / "bin" / "tarflow-train"
    cmd = [sys.executable, str(script)]
    job = _run([*cmd, "--cfg", "job"], cwd=installed["work"], env=installed["env"])
    assert job.returncode == 0, job.stderr[-2000:]
    assert "task_name: demo" in job.stdout
    run_dir = installed["work"] / "run"
    fit = _run([*cmd, "debug=fast_dev_run", "logger=csv", f"hydra.run.dir={run_dir}"],
               cwd=installed["work"], env=installed["env"], timeout=600)
    assert fit.returncode == 0, (fit.stdout[-2000:], fit.stderr[-2000:])
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "val/bpd" in (run_dir / "train.log").read_text()


def test_user_config_dir_composes_on_top(installed: dict, tmp_path: Path) -> None:
    """A user's own experiment file, outside the package, next to the shipped groups."""
    mine = tmp_path / "myconf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - /experiment/demo\n"
                                    "  - _self_\ntask_name: mine\ntrainer:\n  max_epochs: 3\n")
    script = installed["target"] / "bin" / "tarflow-train"
    job = _run([sys.executable, str(script), "--config-dir", str(tmp_path / "myconf"),
                "experiment=mine", "--cfg", "job"], cwd=installed["work"], env=installed["env"])
    assert job.returncode == 0, job.stderr[-2000:]
    assert "task_name: mine" in job.stdout and "max_epochs: 3" in job.stdout
