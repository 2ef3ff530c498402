"""``tarflow-bench`` refuses input that cannot work in one ``error: ...`` line with exit status 2,
before any timing (issue 22 item 4), the way ``--tol -0.5`` already did."""

from __future__ import annotations

import pytest

from tarflow.cli import bench


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        pytest.param(["--methods", "[9-8-32-10]"], "names block(s) [9]", id="block-out-of-range"),
        pytest.param(["--methods", "[1-64-8-10]"], "asks for 64 segments", id="too-many-segments"),
        pytest.param(["--batch", "0"], "--batch 0 must be >= 1", id="batch-0"),
        pytest.param(["--batch", "4", "-2"], "--batch -2 must be >= 1", id="batch-negative"),
        pytest.param(["--repeats", "0"], "--repeats 0 must be >= 1", id="repeats-0"),
        pytest.param(["--fid-batch", "0", "--fid", "4"], "--fid-batch 0 must be >= 1",
                     id="fid-batch-0"),
        pytest.param(["--tol", "-0.5"], "tol=-0.5 must be >= 0", id="negative-tol"),
        pytest.param(["--methods", "jacobi", "auto:tuned@bf16"],
                     "method 'auto:tuned' was removed: the planner times segment counts now: "
                     "use 'auto'", id="retired-auto-tuned"),
    ],
)
def test_bad_bench_input_is_one_line(capsys, args, fragment) -> None:
    argv = ["--preset", "tiny", "--methods", "jacobi", "--repeats", "1", "--probe", "8", *args]
    with pytest.raises(SystemExit) as stop:
        bench.main(argv)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err[-2000:]
    assert fragment in lines[0], lines[0]
    assert "| sequential |" not in captured.out  # refused before any timing
