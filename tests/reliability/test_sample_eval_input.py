"""``tarflow-sample`` and ``tarflow-eval`` refuse bad input in one line before any work, read the
README's schedule notation, evaluate on the checkpoint's own data and never mix samples into a
folder that holds other ones (issue 14, items 1, 5, 6, 7, 8 and 10), each through the real
console entry point (in a subprocess, or its ``main`` in-process for the refusals) on tiny
models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from tarflow.conf import CONFIG_DIR
from tarflow.model import TarFlow, TarFlowConfig
from tests.integration.test_sampling_callback import TinyExtractor
from tests.reliability.helpers import (
    assert_one_line_error,
    call_main,
    run_cli,
    run_clis,
    snapshot,
)

EXTRACTOR = f"fid.extractor={{_target_:{TinyExtractor.__module__}.TinyExtractor}}"
# Small FID jobs: a few samples against a few reference images, features from a tiny conv net.
SMALL_FID = ["fid.num_samples=4", "fid.batch_size=4", "fid.reference_size=8", EXTRACTOR]
QUIET = ["device=cpu", "progress=false"]


@pytest.fixture(scope="module")
def files(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny run's checkpoint (trained on fake data, recorded in it), a conditional plain
    ``.pt`` (3 classes, no dataset record) and a file of random bytes."""
    tmp = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cond = TarFlow(TarFlowConfig(img_size=8, in_channels=1, patch_size=2, channels=32,
                                 num_blocks=2, layers_per_block=1, num_classes=3, head_dim=16))
    for block in cond.blocks:  # a fresh TarFlow is the identity map
        nn.init.normal_(block.proj_out.weight, std=0.05)
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(bytes(range(256)) * 40)
    return {"tmp": tmp, "uncond": tiny_run / "checkpoints" / "last.ckpt",
            "cond": cond.save_checkpoint(tmp / "cond.pt"), "garbage": garbage}


# ----------------------------------------------------------------------------- items 1, 7, 8, 10
# (command, checkpoint, overrides, fragments of the one error line)
BAD = {
    "sample-num-samples-0": ("sample", "uncond", ["num_samples=0"],
                             ["num_samples=0 must be an integer >= 1"]),
    "sample-batch-size-0": ("sample", "uncond", ["batch_size=0"],
                            ["batch_size=0 must be an integer >= 1"]),
    "sample-dtype": ("sample", "uncond", ["dtype=foo"], ["dtype=foo must be one of"]),
    "sample-cuda-without-gpu": ("sample", "uncond", ["device=cuda"],
                                ["device=cuda but no CUDA GPU is available"]),
    "sample-missing-block": ("sample", "uncond", ["sampler=gs_jacobi",
                                                  "sampler.schedule=[5-2-4-3]"],
                             ["names block(s) [5]", "blocks 0..1"]),
    "sample-schedule-list": ("sample", "uncond", ["sampler=gs_jacobi",
                                                  "sampler.schedule=[1-2-4-3,0-2-4-3]"],
                             ["is a list", "quote it"]),
    "sample-label-on-uncond": ("sample", "uncond", ["label=3"], ["label=3", "unconditional"]),
    "sample-label-out-of-range": ("sample", "cond", ["label=7"],
                                  ["label=7 is outside the model's classes 0...2"]),
    "sample-guidance-on-uncond": ("sample", "uncond", ["sampler.guidance=2.0"],
                                  ["guidance on an unconditional model"]),
    "sample-net-dtype": ("sample", "uncond", ["sampler=gs_jacobi_auto", "sampler.net_dtype=bf61"],
                         ["unknown net_dtype 'bf61'", "use auto", "float32", "bfloat16"]),
    "sample-plus-model": ("sample", "uncond", ["+model=tiny"], ["tarflow-sample has no model"]),
    "sample-garbage": ("sample", "garbage", [], ["not a readable checkpoint"]),
    "eval-negative-tol": ("eval", "uncond", ["sampler=jacobi", "sampler.tol=-1"],
                          ["sampler.tol=-1.0 must be >= 0"]),
    "eval-missing-block": ("eval", "uncond", ["sampler=gs_jacobi"], ["names block(s) [7]"]),
    "eval-fid-negative": ("eval", "uncond", ["fid.num_samples=-4"],
                          ["fid.num_samples=-4 must be an integer >= 2"]),
    "eval-nothing-enabled": ("eval", "uncond", ["bpd.enabled=false", "fid.enabled=false"],
                             ["nothing to evaluate"]),
    "eval-other-dataset": ("eval", "uncond", ["data.name=demo"],
                           ["data.name=demo but", "was trained on fake", "allow_mismatch"]),
    "eval-no-dataset-record": ("eval", "cond", [], ["does not record the dataset",
                                                    "data.name="]),
    "eval-garbage": ("eval", "garbage", [], ["not a readable checkpoint"]),
}


@pytest.mark.usefixtures("clean_hydra")
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_before_any_work(files: dict[str, Path], case: str, capsys,
                                               monkeypatch) -> None:
    """Through the console entry points' ``main`` in this process (argv and cwd as the shell
    sets them; a refusal happens before anything a subprocess would do differently), so the
    19 cases cost no interpreter start-ups."""
    if case == "sample-cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from tarflow.cli import evaluate, sample

    command, model, extra, fragments = BAD[case]
    out = files["tmp"] / "out" / case
    # Evaluations get a cheap FID setup, so that code which would accept the input does not
    # spend minutes on Inception before the test sees it.
    cheap = [EXTRACTOR, "fid.reference_size=8"] if command == "eval" else []
    monkeypatch.chdir(files["tmp"])
    main = {"sample": sample.main, "eval": evaluate.main}[command]
    result = call_main(main, [f"tarflow-{command}", f"ckpt_path={files[model]}", *QUIET,
                              *cheap, *extra, f"hydra.run.dir={out}"], capsys)
    line = assert_one_line_error(result, *fragments)
    assert "weights_only" not in line and "Traceback" not in result.err
    # Before any work: no samples, no eval.json, no .hydra records, not even a log file.
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


def test_the_readme_eval_command_reads_the_schedule_notation(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """``sampler.schedule="[3-8-32-10]"`` reaches Hydra without its quotes, i.e. as a list."""
    result = run_cli("evaluate", f"ckpt_path={files['uncond']}", *QUIET, *SMALL_FID,
                     "sampler=gs_jacobi", "sampler.schedule=[1-2-4-3]",
                     f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.code == 0, result.err[-3000:]
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["schedule"] == "[1-2-4-3]" and "val/bpd" in saved and "val/fid_4" in saved


# ----------------------------------------------------------------------------- item 6
def test_eval_uses_the_data_the_checkpoint_was_trained_on(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """No ``data=`` given: the tiny run's checkpoint says it learnt 8x8 fake images (not the
    demo digits eval used to default to); a relative ckpt_path is recorded absolute."""
    run_root = files["uncond"].parents[2]
    result = run_cli("evaluate", "ckpt_path=run/checkpoints/last.ckpt", *QUIET,
                     "fid.enabled=false", f"hydra.run.dir={tmp_path / 'eval'}", cwd=run_root)
    assert result.code == 0, result.err[-3000:]
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["data"]["name"] == "fake" and saved["bpd_images"] > 0
    assert saved["checkpoint"] == str(files["uncond"].resolve())
    # What was printed is in evaluate.log too.
    log = (tmp_path / "eval" / "evaluate.log").read_text()
    assert "val/bpd:" in log and "results written to" in log
    # The same job again into the same folder: the first results are kept, not overwritten.
    first = (tmp_path / "eval" / "eval.json").read_bytes()
    again = run_cli("evaluate", "ckpt_path=run/checkpoints/last.ckpt", *QUIET,
                    "fid.enabled=false", "bpd.seed=1", f"hydra.run.dir={tmp_path / 'eval'}",
                    cwd=run_root)
    assert again.code == 0, again.err[-3000:]
    assert (tmp_path / "eval" / "eval.1.json").read_bytes() == first
    assert "kept as" in again.out and (tmp_path / "eval" / "eval.json").read_bytes() != first


def test_sample_probe_defaults_to_the_checkpoints_training_data(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """No probe.dataset: the CRM/IGM ranking of ``schedule: auto`` uses the data the
    checkpoint records (fake 8x8 images), not a sequential pass over the model's own samples."""
    result = run_cli("sample", f"ckpt_path={files['uncond']}", *QUIET, "num_samples=2",
                     "format=npz", "sampler=gs_jacobi_auto", "sampler.schedule=auto:paper",
                     "probe.size=8", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.code == 0, result.err[-3000:]
    assert "ranked on 8 fake images" in result.out, result.out


# ----------------------------------------------------------------------------- item 5
@pytest.fixture(scope="module")
def sample_folder(files: dict[str, Path]) -> Path:
    """A folder holding 6 samples (0..5) of the tiny model, sequential sampler, seed 0."""
    out = files["tmp"] / "six"
    result = run_cli("sample", f"ckpt_path={files['uncond']}", *QUIET, "num_samples=6",
                     f"hydra.run.dir={out}", cwd=files["tmp"])
    assert result.code == 0, result.err[-3000:]
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "folder"
    shutil.copytree(folder, target)
    return target


def test_sampling_into_a_folder_with_samples_is_refused_or_overwritten(
    files: dict[str, Path], sample_folder: Path, tmp_path: Path
) -> None:
    folder = _copy(sample_folder, tmp_path)
    # A user's own files beside the samples, named like the command's (issue 30 item 2).
    users = {"samples_backup.npz": b"mine", "grid_final.png": b"mine too",
             "sample_summary_notes.json": b"{}", "samples/notes.png": b"not a sample"}
    for name, data in users.items():
        (folder / name).write_bytes(data)
    before = snapshot(folder)
    base = [f"ckpt_path={files['uncond']}", *QUIET, "num_samples=4", "sampler=jacobi",
            f"hydra.run.dir={folder}"]
    refused = run_cli("sample", *base, "seed=3", cwd=tmp_path)
    assert_one_line_error(refused, "already holds samples", "sample_job.json of 6 samples",
                          "if_exists=resume", "if_exists=overwrite")
    assert snapshot(folder) == before
    replaced = run_cli("sample", *base, "seed=3", "if_exists=overwrite", cwd=tmp_path)
    assert replaced.code == 0, replaced.err[-3000:]
    assert sorted(p.name for p in (folder / "samples").iterdir()) == [
        f"{i:06d}.png" for i in range(4)] + ["notes.png"]
    assert sorted(p.name for p in (folder / "shards").iterdir()) == ["000000-000003.npz"]
    for name, data in users.items():  # only what the records listed was deleted
        assert (folder / name).read_bytes() == data, name
    summary = json.loads((folder / "sample_summary.json").read_text())
    assert summary["num_samples"] == 4 and summary["seed"] == 3
    # The earlier job's records are kept beside this one's; sample.log holds both reports.
    assert (folder / ".hydra" / "config.yaml").read_bytes() == before[".hydra/config.yaml"]
    assert "seed: 3" in (folder / ".hydra" / "1" / "config.yaml").read_text()
    assert (folder / "sample.log").read_text().count(" samples with ") == 2


def test_resume_continues_only_the_same_set(
    files: dict[str, Path], sample_folder: Path, tmp_path: Path
) -> None:
    """``if_exists=resume`` into a folder of another set is one line naming the key, before
    anything is written; ``append`` (which accepted another sampler) says what replaced it."""
    folder = _copy(sample_folder, tmp_path)
    before = snapshot(folder)
    base = [f"ckpt_path={files['uncond']}", *QUIET, "num_samples=6", f"hydra.run.dir={folder}"]
    seed, sampler, count, append = run_clis([
        ("sample", [*base, "if_exists=resume", "seed=1"]),
        ("sample", [*base, "if_exists=resume", "sampler=jacobi"]),
        ("sample", [*base[:-2], "num_samples=9", base[-1], "if_exists=resume"]),
        ("sample", [*base, "if_exists=append"])], cwd=tmp_path)
    assert_one_line_error(seed, "if_exists=resume", "another sample set", "seed: 0 there, 1 here")
    assert_one_line_error(sampler, "another sample set", "sampler.name: 'sequential' there, "
                                                         "'jacobi' here")
    assert_one_line_error(count, "num_samples: 6 there, 9 here")
    assert_one_line_error(append, "if_exists=append", "replaced by if_exists=resume")
    assert snapshot(folder) == before
    # The same set: nothing is missing, so nothing is drawn; the outputs are assembled again.
    shards = {p.name: p.read_bytes() for p in (folder / "shards").iterdir()}
    again = run_cli("sample", *base, "if_exists=resume", cwd=tmp_path)
    assert again.code == 0, again.err[-3000:]
    assert "(0 drawn now, the rest resumed)" in again.out, again.out
    assert {p.name: p.read_bytes() for p in (folder / "shards").iterdir()} == shards
    assert (folder / "samples" / "000005.png").read_bytes() == before["samples/000005.png"]


# ----------------------------------------------------------------------------- item 10
@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_help_lists_only_what_works_there(tmp_path: Path, command: str) -> None:
    result = run_cli(command, "--help", cwd=tmp_path)
    assert result.code == 0, result.err[-3000:]
    name = "tarflow-eval" if command == "evaluate" else "tarflow-sample"
    assert result.out.startswith(f"{name}: ")
    samplers = sorted(p.stem for p in (Path(CONFIG_DIR) / "sampler").glob(
        "*.yaml"))
    assert f"sampler: {', '.join(samplers)}" in result.out
    for group in ("experiment:", "model:", "trainer:", "callbacks:", "logger:", "debug:"):
        assert f"\n{group}" not in result.out, group
    assert ("hparams_search: gs_jacobi_grid, guidance_grid" in result.out) == (
        command == "evaluate")


def test_an_eval_sweep_ends_with_a_table(files: dict[str, Path], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli("evaluate", "--multirun", f"ckpt_path={files['uncond']}", *QUIET,
                     *SMALL_FID, "bpd.enabled=false", "sampler=jacobi",
                     "sampler.schedule=jacobi,sequential", f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path)
    assert result.code == 0, result.err[-3000:]
    table = (sweep / "summary.md").read_text().strip()
    lines = table.splitlines()
    assert lines[0] == "| job | sampler.schedule | val/fid_4 | s/image | iterations |"
    assert lines[2].startswith("| 0 | jacobi | ") and lines[3].startswith("| 1 | sequential | ")
    assert len(lines) == 4 and table in result.out
