"""Issue 30 item 5: a sweep with failed jobs (a start-up refusal, a NaN loss) runs every job,
lists each in ``summary.md`` with a ``failed: <reason>`` row, explains every job folder with a
``failed.json``, prints no traceback and exits with status 1."""

from __future__ import annotations

import json
from pathlib import Path

from tarflow.app.sweep_summary import summary_table
from tests.reliability.helpers import TINY, run_cli

SWEPT = ["+callbacks.poison._target_=tests.reliability.hooks.PoisonBatchAt",
         "+callbacks.poison.step=0,99", "trainer.max_epochs=1,-3"]


def test_failed_jobs_are_rows_of_the_summary_and_the_sweep_exits_1(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli("train", "--multirun", *TINY, "trainer.limit_train_batches=2",
                     "trainer.limit_val_batches=1", "logger=csv", "final_samples.enabled=false",
                     *SWEPT, f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path, timeout=400)
    assert result.code == 1, result.err[-3000:]
    assert "Traceback" not in result.err and "Traceback" not in result.out
    table = (sweep / "summary.md").read_text().strip()
    assert table in result.out
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert sorted(rows) == ["0", "1", "2", "3"]  # every job, in Hydra's order
    # Jobs: (poison 0, 1 epoch) NaN; (0, -3) refused; (99, 1) trains; (99, -3) refused.
    assert "failed: FloatingPointError" in rows["0"] and "non-finite" in rows["0"]
    for job in ("1", "3"):
        assert "failed: trainer: `max_epochs` must be a non-negative integer" in rows[job]
    assert "failed" not in rows["2"]
    assert (sweep / "2" / "train.json").is_file()
    for job in ("0", "1", "3"):
        record = json.loads((sweep / job / "failed.json").read_text())
        assert f"failed: {record['error']}" in rows[job]
        assert any(o.startswith("trainer.max_epochs=") for o in record["overrides"])
        assert ("traceback" in record) == (job == "0")  # only a non-user error keeps one
    errors = [line for line in result.err_lines if line.startswith("error:")]
    assert len(errors) == 4, result.err[-3000:]  # one per failed job, and the total
    assert errors[-1].startswith("error: 3 of 4 jobs failed")


def test_a_job_folder_without_a_result_or_a_reason_says_so(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "failed.json").write_text(json.dumps(
        {"overrides": ["seed=1"], "error": "data.root /x | y does not exist"}))
    (tmp_path / "1").mkdir()  # killed before it wrote anything
    lines = summary_table(tmp_path, "train.json").splitlines()
    assert lines[0] == "| job | seed | train/loss | minutes |"
    assert lines[2] == "| 0 | 1 | failed: data.root /x / y does not exist |  |"
    assert lines[3].startswith("| 1 | - | failed: no train.json (killed?")
