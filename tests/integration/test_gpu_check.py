"""``scripts/gpu_check.py --cpu-smoke``: the GPU check's own code at toy sizes on the CPU, so the
script a lent GPU runs in one call cannot rot between loans. The whole smoke run (a minute: DDP,
FSDP and a pytest child) is nightly (``slow``); CI keeps the refusal without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu-smoke",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "WANDB_MODE": "offline"})
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    result = json.loads((out / "gpu_check.json").read_text())
    sections = {k: v for k, v in result.items() if k != "env"}
    assert set(sections) == {"train", "lightning", "planner", "passes", "tests"}
    assert all(s["status"] == "ok" for s in sections.values()), sections
    train = sections["train"]["result"]
    assert [r["compile"] for r in train] == [False, True]
    assert all(r["steps_per_s"] > 0 for r in train)
    runs = {r["trainer"]: r for r in sections["lightning"]["result"]}
    assert runs["ddp"]["checkpoint"] == "file" and runs["fsdp"]["checkpoint"] == "dir"
    bench = sections["planner"]["result"]
    assert {r["method"] for r in bench["rows"]} >= {"sequential", "auto", "jacobi"}
    assert any("auto at batch" in line for line in bench["plan_lines"])
    assert {r["net"] for r in sections["passes"]["result"]["rows"]} == {"float32", "bfloat16"}
    table = (out / "gpu_check.md").read_text()
    assert "## planner: ok" in table and "| tiny | 2 | bfloat16 |" in table


def test_gpu_check_without_cuda_says_how_to_smoke(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: no CUDA device; run with --cpu-smoke for the toy-size check on a CPU"]
    assert not (tmp_path / "x").exists()
