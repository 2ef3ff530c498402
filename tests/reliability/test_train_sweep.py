"""Issue 22 item 6: a training sweep a user can read. ``tarflow-train -m module.optim.lr=a,b``
ends with a table of every job's final metrics and overrides (printed, and written to
``<sweep dir>/summary.md``); each job's W&B run joins the sweep's group and is named by the
values it sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tarflow.app.sweep_summary import summary_table
from tarflow.app.train_sweep import job_label, swept_keys
from tests.reliability.helpers import TINY, run_cli


def test_a_training_sweep_ends_with_a_table_and_grouped_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli("train", "--multirun", *TINY, "trainer.max_epochs=1",
                     "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                     "logger=many", "module.optim.lr=1e-3,2e-3", f"paths.root_dir={tmp_path}",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.code == 0, result.err[-3000:]
    table = (sweep / "summary.md").read_text().strip()
    assert table in result.out
    lines = table.splitlines()
    head = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert head[:2] == ["job", "module.optim.lr"] and head[-2:] == ["train/loss", "minutes"]
    assert "val/nll" in head and "val/bpd" in head
    assert len(lines) == 4  # header, rule, one row per job
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[:2] for r in rows] == [["0", "0.001"], ["1", "0.002"]]
    for job, row in enumerate(rows):
        saved = json.loads((sweep / str(job) / "train.json").read_text())
        assert float(row[head.index("val/nll")]) == float(f"{saved['val/nll']:.4g}")
        assert saved["last_ckpt"] and Path(saved["last_ckpt"]).is_file()
    # W&B: one group for the sweep, each run named by its learning rate (recorded as used).
    names = set()
    for job in (0, 1):
        wandb = yaml.safe_load((sweep / str(job) / ".hydra" / "config.yaml").read_text())[
            "logger"]["wandb"]
        assert wandb["group"] == "demo-sweep"
        names.add(wandb["name"])
        run_file = next((sweep / str(job) / "wandb").glob("offline-run-*/run-*.wandb"))
        assert b"demo-sweep" in run_file.read_bytes()  # what the W&B run itself recorded
    assert names == {"demo module.optim.lr=0.001", "demo module.optim.lr=0.002"}


def test_the_swept_keys_name_a_job() -> None:
    argv = ["model=tiny", "module.optim.lr=1e-3,2e-3", "seed=range(2)", "--multirun",
            "data.batch_size=8"]
    assert swept_keys(argv) == ["module.optim.lr", "seed"]
    job = ["model=tiny", "module.optim.lr=0.001", "seed=1", "data.batch_size=8"]
    assert job_label(job, ["module.optim.lr", "seed"]) == "module.optim.lr=0.001, seed=1"


def test_a_failed_job_has_a_row_saying_so(tmp_path: Path) -> None:
    for job, loss in ((0, 0.5), (1, None)):
        (tmp_path / str(job)).mkdir()
        if loss is not None:
            (tmp_path / str(job) / "train.json").write_text(json.dumps(
                {"overrides": ["module.optim.lr=0.001"], "val/nll": 1.25, "train/loss": loss,
                 "seconds": 90.0}))
    lines = summary_table(tmp_path, "train.json").splitlines()
    assert lines[0] == "| job | module.optim.lr | val/nll | train/loss | minutes |"
    assert lines[2] == "| 0 | 0.001 | 1.25 | 0.5 | 1.5 |"
    assert lines[3].startswith("| 1 | - | failed: no train.json (killed? see the job's log) |")
