"""Issue 30, items 6, 7, 8, 10 and 14: output that cannot be written, ``~`` in paths, a
shape-mismatched official file, ``tarflow-bench --fid`` without statistics, and the names and
help a new user meets. Each is refused in one line before any record or work, or just works.

The machine's tests run as root, for whom a read-only folder is writable: the unwritable outputs
here are paths that are, or lie under, an existing *file* (refused for every user); the
read-only case runs only for an ordinary user.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from tarflow.app.logs import job_log
from tarflow.cli import bench, export, fid_weights, prepare, rank, train_ae
from tarflow.model import TarFlow, TarFlowConfig
from tarflow.model.checkpoint import read_file
from tests.integration.conftest import REPO, TINY
from tests.reliability.helpers import (
    CliResult,
    assert_one_line_error,
    run_cli,
    run_clis,
    snapshot,
    subprocess_env,
)

QUIET = ["device=cpu", "progress=false"]
OFFICIAL = "fake_model_2_64_2_1_0.05.pth"  # {dataset}_model_{P}_{Ch}_{T}_{K}_{sigma}.pth


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny unconditional model as our ``.pt`` (also under a home folder ``home/m.pt``), the
    same weights as an official ``.pth`` with ONE tensor of the wrong shape, and a plain file
    (the unwritable place: a path under it cannot be created)."""
    tmp = tmp_path_factory.mktemp("outputs")
    torch.manual_seed(0)
    net = TarFlow(TarFlowConfig(img_size=8, in_channels=1, patch_size=2, channels=64,
                                num_blocks=2, layers_per_block=1, num_classes=0))
    for block in net.blocks:  # a fresh TarFlow is the identity map
        nn.init.normal_(block.proj_out.weight, std=0.05)
    (tmp / "home").mkdir()
    state = dict(net.state_dict())
    state["blocks.1.proj_out.weight"] = torch.zeros(9, 64)  # model: (8, 64)
    torch.save(state, tmp / OFFICIAL)
    afile = tmp / "afile"
    afile.write_text("the user's file\n")
    return {"tmp": tmp, "pt": net.save_checkpoint(tmp / "m.pt"),
            "home_pt": net.save_checkpoint(tmp / "home" / "m.pt"),
            "bad_pth": tmp / OFFICIAL, "afile": afile}


def _cli(command: str, files: dict[str, Path], *args: str) -> tuple[str, list[str]]:
    return command, [*args, f"paths.root_dir={files['tmp']}"]


# ----------------------------------------------------------------------------- item 6
def test_run_dir_that_is_a_file_is_one_line(files: dict[str, Path]) -> None:
    """``hydra.run.dir`` an existing file (Hydra's FileExistsError traceback before), or
    ``out_dir`` under one (refused after the ``.hydra`` records before): one line, nothing
    written, the file as it was."""
    afile, run = files["afile"], files["tmp"] / "run_out_dir"
    run.mkdir()
    calls = [
        _cli("sample", files, f"ckpt_path={files['pt']}", f"hydra.run.dir={afile}", *QUIET),
        _cli("evaluate", files, f"ckpt_path={files['pt']}", "data.name=fake",
             f"hydra.run.dir={afile}", *QUIET),
        ("train", [*TINY, f"paths.root_dir={files['tmp']}", f"hydra.run.dir={afile}/run"]),
        _cli("sample", files, f"ckpt_path={files['pt']}", f"hydra.run.dir={run}",
             f"out_dir={afile}/samples", *QUIET),
    ]
    results = run_clis(calls, cwd=files["tmp"])
    for result in results[:2]:
        assert_one_line_error(result, f"hydra.run.dir {afile} is a file, not a folder")
    assert_one_line_error(results[2], f"hydra.run.dir {afile}/run cannot be created",
                          f"{afile} is a file")
    assert_one_line_error(results[3], f"out_dir {afile}/samples cannot be created")
    assert afile.read_text() == "the user's file\n"
    assert snapshot(run) == {}  # no .hydra records, no log


def _refused(main, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    captured = capsys.readouterr()
    assert stop.value.code == 2, captured.err[-2000:]
    result = CliResult(2, captured.out, captured.err)
    line = assert_one_line_error(result)
    assert "| sequential |" not in captured.out  # bench: refused before any timing
    return line


def test_argparse_outputs_that_cannot_be_written(files: dict[str, Path],
                                                 capsys: pytest.CaptureFixture) -> None:
    """``--json`` / OUT under a file: one line before any work (rank's and bench's came at the
    very end, after the ranking or the timing, as a traceback)."""
    afile = files["afile"]
    tiny = ["--preset", "tiny", "--device", "cpu", "--probe", "4"]
    for main, argv, flag in [
        (rank.main, [*tiny, "--json", f"{afile}/r.json"], "--json"),
        (bench.main, [*tiny, "--methods", "jacobi", "--batch", "1", "--repeats", "1",
                      "--json", f"{afile}/b.json"], "--json"),
        (export.main, [str(files["pt"]), f"{afile}/x.pth"], "OUT"),
        (prepare.main, ["afhq", str(files["tmp"]), f"{afile}/prepared"], "OUT"),
    ]:
        line = _refused(main, argv, capsys)
        assert f"{flag} {afile}/" in line and f"{afile} is a file, not a folder" in line, line
    assert afile.read_text() == "the user's file\n"


def test_json_into_a_missing_folder_is_written(tmp_path: Path) -> None:
    """``tarflow-rank --json new/folder/r.json`` creates the folder (a traceback before)."""
    out = tmp_path / "new" / "folder" / "r.json"
    assert rank.main(["--preset", "tiny", "--device", "cpu", "--probe", "2",
                      "--json", str(out)]) == 0
    assert "ranking" in out.read_text()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(tmp_path: Path) -> None:
    from tarflow.app.checks.paths import check_writable

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="is not writable by this user"):
            check_writable("out_dir", folder / "x", folder=True)
    finally:
        folder.chmod(0o700)


# ----------------------------------------------------------------------------- item 7
def test_tilde_paths(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A quoted ``~`` checkpoint samples (it was refused after the ``.hydra`` records, the
    start-up check having expanded it and the loader not); an unquoted one gets a hint on
    quoting with the override written back; expansion rewrites the config once."""
    home = files["tmp"] / "home"
    env = subprocess_env(files["tmp"] / "wandb_home", HOME=str(home))
    out = files["tmp"] / "tilde_run"
    calls = [
        _cli("sample", files, "ckpt_path='~/m.pt'", f"hydra.run.dir={out}", "num_samples=2",
             "batch_size=2", *QUIET),
        _cli("sample", files, "ckpt_path=~/m.pt", f"hydra.run.dir={out}_2", *QUIET),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(run_cli, c, *a, cwd=files["tmp"], env=env) for c, a in calls]
        done, hint = (job.result() for job in jobs)
    assert done.code == 0, done.err[-3000:]
    assert len(list((out / "samples").glob("*.png"))) == 2
    assert_one_line_error(hint, "LexerNoViableAltException",
                          """quote the value for Hydra, inside the shell's quotes: """
                          """'ckpt_path="~/m.pt"'""")
    assert not (files["tmp"] / "tilde_run_2").exists()

    from tarflow.app.checks.paths import expand_user_paths

    monkeypatch.setenv("HOME", str(home))
    cfg = OmegaConf.create({"ckpt_path": "~/m.pt", "init_from": None, "out_dir": "/abs",
                            "data": {"root": "~/data"}})
    expand_user_paths(cfg)
    assert cfg.ckpt_path == f"{home}/m.pt" and cfg.data.root == f"{home}/data"
    assert cfg.out_dir == "/abs" and cfg.init_from is None
    assert "state_dict" in read_file("~/m.pt")  # every loader reads through read_file


# ----------------------------------------------------------------------------- item 8
def test_shape_mismatched_official_file(files: dict[str, Path]) -> None:
    """One wrong tensor in an official ``.pth``: sample and eval refuse it before any record,
    naming that one tensor (it was reported after the records, as the architecture inferred
    from the wrong tensor: every tensor mismatched)."""
    run = files["tmp"] / "run_mismatch"
    run.mkdir()
    calls = [_cli(c, files, f"ckpt_path={files['bad_pth']}", f"hydra.run.dir={run}", *extra,
                  *QUIET) for c, extra in (("sample", []), ("evaluate", ["data.name=fake"]))]
    for result in run_clis(calls, cwd=files["tmp"]):
        line = assert_one_line_error(result, f"{OFFICIAL} does not match a TarFlow P2-Ch64-T2-K1",
                                     "shape mismatches (1): blocks.1.proj_out.weight: file "
                                     "(9, 64) vs model (8, 64)")
        assert "missing keys" not in line and "unexpected" not in line, line
    assert snapshot(run) == {}


# ----------------------------------------------------------------------------- item 10
def test_bench_fid_inputs_are_checked_before_timing(files: dict[str, Path],
                                                    capsys: pytest.CaptureFixture) -> None:
    tiny = ["--preset", "tiny", "--device", "cpu", "--methods", "jacobi", "--batch", "1",
            "--repeats", "1", "--fid", "2"]
    assert "needs --fid-stats" in _refused(bench.main, tiny, capsys)
    missing = files["tmp"] / "no_stats.npz"
    assert f"{missing} do not exist" in _refused(bench.main, [*tiny, "--fid-stats",
                                                               str(missing)], capsys)


# ----------------------------------------------------------------------------- item 14
def test_data_config_names_are_accepted(capsys: pytest.CaptureFixture) -> None:
    """``afhq256`` (the data config's name) is accepted where ``afhq`` is; a missing root in an
    argparse command names its flag, not the Hydra key."""
    assert rank.build_parser().parse_args(["--data", "afhq256"]).data == "afhq"
    assert prepare.build_parser().parse_args(["afhq256", "src", "out"]).name == "afhq"
    line = _refused(rank.main, ["--preset", "tiny", "--device", "cpu", "--data", "afhq"],
                    capsys)
    assert "--root" in line and "data.root" not in line, line


def test_help_has_examples(capsys: pytest.CaptureFixture) -> None:
    for main in (fid_weights.main, train_ae.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = capsys.readouterr().out
        assert re.search(r"^examples:\n  .*tarflow-", text, re.MULTILINE), text[-1500:]


def test_help_lists_the_users_config_dir(files: dict[str, Path]) -> None:
    mine = files["tmp"] / "myconf"
    (mine / "sampler").mkdir(parents=True)
    (mine / "sampler" / "my_sampler.yaml").write_text("defaults:\n  - gs_jacobi\n  - _self_\n")
    (mine / "experiment").mkdir()
    (mine / "experiment" / "my_exp.yaml").write_text("# @package _global_\nseed: 3\n")
    sample, train = run_clis([("sample", ["--config-dir", str(mine), "--help"]),
                              ("train", ["--config-dir", str(mine), "--help"])],
                             cwd=files["tmp"])
    assert re.search(r"^sampler: .*\bgs_jacobi\b.*\bmy_sampler\b", sample.out, re.MULTILINE)
    assert re.search(r"^experiment: .*\bdemo\b.*\bmy_exp\b", train.out, re.MULTILINE)


def test_secondary_processes_are_quiet(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    """The start-up lines a command logs are said by the first process only (every DDP rank
    logged them into the same console and log file); warnings still come from all."""
    log = logging.getLogger("tarflow.test_quiet")
    handler = logging.StreamHandler()  # stderr, as captured by capsys
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        for rank_env, said in (("0", True), ("1", False)):
            monkeypatch.setenv("LOCAL_RANK", rank_env)
            with job_log():
                log.info("start-up line")
                log.warning("a warning")
            err = capsys.readouterr().err
            assert ("start-up line" in err) == said, (rank_env, err)
            assert "a warning" in err
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_readme_names_runnable_modules() -> None:
    """Every ``python -m tarflow.cli.X`` the README names exists, and the README says how the
    console scripts whose module is not their name are run that way."""
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"python -m (tarflow\.cli\.\w+)", readme))
    assert named, "the README names no module"
    for module in named:
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
    scripts = re.findall(r'^(tarflow-[\w-]+) = "([\w.]+):main"$',
                         (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert len(scripts) >= 10, scripts
    for script, module in scripts:
        if module.startswith("tarflow.cli.") and module.rsplit(".", 1)[1] != script[8:]:
            assert f"python -m {module}" in readme or module.endswith(
                script[8:].replace("-", "_")), (script, module)


def test_official_name_states_the_architecture(files: dict[str, Path]) -> None:
    """A wrong tensor among those the architecture is inferred from (block 0's ``proj_in``):
    the official name's P, Ch, T and K are taken, so that tensor alone mismatches (it was
    every tensor of a 128-channel model inferred from it)."""
    from tarflow.model import describe_checkpoint, weights_mismatch

    state = torch.load(files["pt"], weights_only=True)["state_dict"]
    state["blocks.0.proj_in.weight"] = torch.zeros(128, 4)
    path = files["tmp"] / "bad" / OFFICIAL
    path.parent.mkdir()
    torch.save(state, path)
    summary = describe_checkpoint(path)
    assert summary.config.tag == "P2-Ch64-T2-K1"
    assert weights_mismatch(summary.config, summary.state) == [
        "shape mismatches (1): blocks.0.proj_in.weight: file (128, 4) vs model (64, 4)"]
