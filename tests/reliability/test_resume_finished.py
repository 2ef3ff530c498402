"""Resuming a run that has already reached its end is refused in one line, before any record
is touched (issue 30, item 9); it used to train nothing, exit 0 with empty metrics and write an
empty ``train.json`` over the run's own."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.reliability.helpers import assert_one_line_error, run_clis, snapshot


def test_resuming_a_finished_run_is_refused_and_leaves_its_records(
    tiny_run: Path, tmp_path: Path
) -> None:
    # tiny_run trained trainer.max_epochs=1 to its end; the resume restores that setting.
    cases = {"as-recorded": [], "fewer-epochs": ["trainer.max_epochs=0"]}
    runs, before, calls = {}, {}, []
    for name, extra in cases.items():
        runs[name] = tmp_path / name
        shutil.copytree(tiny_run, runs[name], symlinks=True)
        before[name] = snapshot(runs[name])
        ckpt = runs[name] / "checkpoints" / "last.ckpt"
        calls.append(("train", [*extra, f"ckpt_path={ckpt}", f"hydra.run.dir={runs[name]}"]))
    results = dict(zip(cases, run_clis(calls, cwd=tmp_path), strict=True))
    for name, result in results.items():
        assert_one_line_error(result, "already trained to max_epochs=1",
                              "raise trainer.max_epochs to continue")
        assert "Traceback" not in result.err
        assert snapshot(runs[name]) == before[name], f"{name}: the run dir changed"
