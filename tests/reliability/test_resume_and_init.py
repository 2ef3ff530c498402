"""Resuming a run and starting from weights through ``tarflow-train`` in subprocesses (issue 14,
items 2, 3 and 4): a resume keeps its run's own config and records, a resume or a new run that
cannot fit is refused in one line with the run directory left byte for byte as it was, and
``init_from`` fine-tunes from an official ``.pth`` or a ``.ckpt``'s EMA weights.

All runs are the tiny model on 8x8 fake images; each test copies the shared finished run
(``tiny_run``) before it aims a command at it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tarflow.model import TarFlow, TarFlowConfig
from tests.reliability.helpers import (
    assert_one_line_error,
    call_main,
    run_cli,
    snapshot,
    train_overrides,
)


def _resume_args(run: Path, *extra: str) -> list[str]:
    """The README's resume command (and nothing of the run's original overrides)."""
    return [*extra, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={run}"]


# ----------------------------------------------------------------------------- item 3
def test_resume_restores_the_runs_own_config_and_keeps_its_records(tmp_path: Path) -> None:
    # Its own run, resumed where it was made (a moved run: the test after this one).
    first = train_overrides(tmp_path, "trainer.max_epochs=1", "trainer.limit_train_batches=2")
    started = run_cli("train", *first, cwd=tmp_path)
    assert started.code == 0, started.err[-3000:]
    run = tmp_path / "run"
    records = {name: (run / ".hydra" / name).read_bytes()
               for name in ("config.yaml", "hydra.yaml", "overrides.yaml")}
    result = run_cli("train", *_resume_args(run, "trainer.max_epochs=2"), cwd=tmp_path)
    assert result.code == 0, result.err[-3000:]
    # The run was started with 1 epoch x 2 batches: the resume ran one more epoch of 2 batches
    # (with the defaults it would have been the demo model, which does not fit the checkpoint).
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 1
    # Earlier records untouched; this launch's records numbered beside them.
    for name, data in records.items():
        assert (run / ".hydra" / name).read_bytes() == data, name
    overrides = yaml.safe_load((run / ".hydra" / "1" / "overrides.yaml").read_text())
    assert "trainer.limit_train_batches=2" in overrides and "trainer.max_epochs=2" in overrides
    assert "trainer.max_epochs=1" not in overrides
    resume = yaml.safe_load((run / ".hydra" / "1" / "resume.yaml").read_text())
    assert resume["new_overrides"][0] == "trainer.max_epochs=2"
    assert resume["changes"] == {"trainer.max_epochs": [1, 2]}
    # The warning names what changed; train.log has it, each epoch and the total time.
    assert "resumed run differs from its recorded config: trainer.max_epochs: 1 -> 2" in (
        result.out
    )
    log = (run / "train.log").read_text()
    assert "trainer.max_epochs: 1 -> 2" in log
    assert "epoch 1/1: 2 steps" in log and "epoch 2/2: 2 steps" in log
    assert log.count("finished in") == 2
    # One CSV folder across the resume.
    assert [p.name for p in (run / "csv").iterdir()] == ["version_0"]


def test_a_moved_run_resumes_into_its_own_checkpoints(tiny_run: Path, tmp_path: Path) -> None:
    """A run copied elsewhere and resumed there replaces its own last.ckpt and best checkpoint
    (Lightning alone wrote last-v1.ckpt beside a stale last.ckpt and kept both best files)."""
    run = tmp_path / "moved"
    shutil.copytree(tiny_run, run, symlinks=True)
    before = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    result = run_cli("train", *_resume_args(run, f"trainer.max_epochs={before['epoch'] + 2}"),
                     cwd=tmp_path)
    assert result.code == 0, result.err[-3000:]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in names and not any("-v" in n for n in names), names
    assert len([n for n in names if n.startswith("epoch")]) == 1, names  # save_top_k: 1
    after = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] > before["global_step"]
    # The run it was copied from is untouched.
    source = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert source["global_step"] == before["global_step"]


# ----------------------------------------------------------------------------- item 2
# Commands aimed at (a copy of) the finished tiny run, which they must leave byte for byte.
AT_THE_RUN = {
    "model-mismatch": (["does not fit this run's model", "model.channels=64 (checkpoint: 32)",
                        "init_from="]),
    "new-run-into-a-run": ["already holds a run", ".hydra/ records", "ckpt_path="],
    "weights-as-ckpt-path": ["holds weights only", "init_from="],
}
# Bad weight sources for a new run, which must not get as far as creating anything.
NEW_RUN = {
    "garbage-ckpt-path": ["ckpt_path", "not a readable checkpoint"],
    "garbage-init-from": ["init_from", "not a readable checkpoint"],
    "missing-init-from": ["init_from", "does not exist"],
    "init-from-wrong-shapes": ["init_from", "does not fit the model", "shape mismatches"],
    "both-keys": ["ckpt_path (resume a run) and init_from", "exclude each other"],
    # Same shapes, another flow: the stored scale must match the configured one.
    "init-from-other-scale": ["init_from", "does not fit the model",
                              "trained with model.scale=exp, the config has model.scale=softplus"],
}


@pytest.fixture(scope="module")
def refused(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The arguments of every command above; for the ones aimed at the tiny run, a copy of it
    each and its snapshot from before."""
    tmp = tmp_path_factory.mktemp("refused")
    pt = TarFlow(TarFlow.from_checkpoint(tiny_run / "checkpoints" / "last.ckpt").config)
    weights = pt.save_checkpoint(tmp / "weights.pt")
    small = TarFlowConfig(img_size=8, in_channels=1, patch_size=2, channels=16, num_blocks=2,
                          layers_per_block=1, num_classes=0, head_dim=8)
    other = TarFlow(small).save_checkpoint(tmp / "other.pt")
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(bytes(range(256)) * 40)
    runs = {name: tmp / name for name in [*AT_THE_RUN, *NEW_RUN]}
    args = {
        "model-mismatch": _resume_args(runs["model-mismatch"], "model.channels=64"),
        "new-run-into-a-run": train_overrides(tmp, run="new-run-into-a-run"),
        "weights-as-ckpt-path": [f"ckpt_path={weights}",
                                 f"hydra.run.dir={runs['weights-as-ckpt-path']}"],
        "garbage-ckpt-path": [f"ckpt_path={garbage}"],
        "garbage-init-from": [f"init_from={garbage}"],
        "missing-init-from": [f"init_from={tmp / 'nope.pth'}"],
        "init-from-wrong-shapes": [f"init_from={other}"],
        "both-keys": [f"init_from={weights}", f"ckpt_path={tiny_run / 'checkpoints/last.ckpt'}"],
        "init-from-other-scale": [f"init_from={weights}", "model.scale=softplus"],
    }
    for name in NEW_RUN:
        args[name] = train_overrides(tmp, *args[name], run=name)
    before = {}
    for name in AT_THE_RUN:
        shutil.copytree(tiny_run, runs[name], symlinks=True)
        before[name] = snapshot(runs[name])
    return {"runs": runs, "before": before, "args": args, "tmp": tmp}


@pytest.mark.parametrize(("case", "fragments"), list({**AT_THE_RUN, **NEW_RUN}.items()),
                         ids=list({**AT_THE_RUN, **NEW_RUN}))
@pytest.mark.usefixtures("clean_hydra")
def test_a_command_that_cannot_fit_is_refused_before_touching_anything(
    refused: dict, case: str, fragments: list[str], capsys, monkeypatch
) -> None:
    """Through ``tarflow-train``'s ``main`` in this process (argv and cwd as the shell sets
    them): a refusal comes before anything a subprocess would do differently."""
    from tarflow.cli import train

    monkeypatch.chdir(refused["tmp"])
    result = call_main(train.main, ["tarflow-train", *refused["args"][case]], capsys)
    line = assert_one_line_error(result, *fragments)
    assert "weights_only" not in line and "Traceback" not in result.err
    run = refused["runs"][case]
    if case in AT_THE_RUN:
        assert snapshot(run) == refused["before"][case], "the run dir changed"
    else:  # Hydra made the (empty) run dir; nothing was written into it
        assert not run.exists() or not any(run.iterdir()), list(run.rglob("*"))


# ----------------------------------------------------------------------------- item 4
@pytest.mark.parametrize("source", ["official-pth", "ckpt-ema"])
def test_init_from_starts_a_new_run_from_weights(
    tiny_run: Path, tmp_path: Path, source: str
) -> None:
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    if source == "official-pth":
        config = TarFlow.from_checkpoint(ckpt).config
        torch.manual_seed(1)
        net = TarFlow(config)
        for block in net.blocks:
            torch.nn.init.normal_(block.proj_out.weight, std=0.05)
        path = tmp_path / "fake_model_2_32_2_2_0.05.pth"  # the official naming: bare weights
        torch.save(net.state_dict(), path)
        expected = net.state_dict()
    else:
        path = ckpt
        state = torch.load(ckpt, weights_only=True)
        assert state["tarflow"]["weights"] == "ema"
        expected = {k.removeprefix("net."): v for k, v in state["state_dict"].items()}
    probe = tmp_path / "at_start.pt"
    args = train_overrides(
        tmp_path, f"init_from={path}", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
        "logger=csv", "+callbacks.probe._target_=tests.reliability.hooks.SaveNetAtFitStart",
        f"+callbacks.probe.path={probe}", run="finetune")
    result = run_cli("train", *args, cwd=tmp_path)
    assert result.code == 0, result.err[-3000:]
    at_start = torch.load(probe, weights_only=True)
    assert at_start.keys() == expected.keys()
    assert all(torch.equal(at_start[k], expected[k]) for k in expected)
    # A new run: its own counters, starting from step 0.
    last = torch.load(tmp_path / "finetune" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 1
    log = (tmp_path / "finetune" / "train.log").read_text()
    assert f"initialised the network from {path}" in log
    if source == "ckpt-ema":
        # A killed fine-tune resumes with the README's resume command: its recorded init_from
        # is not restored (the weights come from its own checkpoint), so the two keys do not
        # collide, and the run is not re-initialised.
        run = tmp_path / "finetune"
        again = run_cli("train", *_resume_args(run, "trainer.max_epochs=2"), cwd=tmp_path)
        assert again.code == 0, again.err[-3000:]
        last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 2 and last["epoch"] == 1
        assert (run / "train.log").read_text().count("initialised the network from") == 1
        assert "init_from" not in yaml.safe_load((run / ".hydra" / "1" / "resume.yaml").read_text()
                                                  )["changes"]

