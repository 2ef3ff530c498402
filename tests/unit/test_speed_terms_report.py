"""``scripts/speed_terms_eval.py report``: each row's bpd change is against its own no-term run,
so fine-tunes and from-scratch runs share one table and chart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scripts import load_script


def _script():
    return load_script("speed_terms_eval")


def _run(root: Path, name: str, bpd: float, fid: float) -> str:
    log = root / name / "csv" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    # The last logged value wins, as in a Lightning CSV log (an earlier epoch first).
    log.write_text(f"step,val/bpd,val/fid_100\n1,{bpd + 1},\n2,{bpd},{fid}\n")
    return f"{name}={root / name}"


def _iters(crit16: int) -> dict:
    blocks = {"0": 3, "1": 3, "2": 3, "3": crit16 - 9}
    return {"1": {"blocks": blocks, "critical_path": crit16},
            "16": {"blocks": blocks, "critical_path": crit16}}


def test_rows_compare_with_their_own_reference(tmp_path):
    runs = [_run(tmp_path, "ft_none", 4.0, 40.0), _run(tmp_path, "ft_term", 4.02, 41.0),
            _run(tmp_path, "scratch_none", 5.0, 50.0), _run(tmp_path, "scratch_term", 5.1, 55.0)]
    it = tmp_path / "iters.json"
    it.write_text(json.dumps({"result": {"ft_none": _iters(29), "ft_term": _iters(22)}}))
    it2 = tmp_path / "iters2.json"  # several iters files merge
    it2.write_text(json.dumps({"result": {"scratch_none": _iters(29), "scratch_term": _iters(25)}}))
    png, mod = tmp_path / "pareto.png", _script()
    out = mod.cmd_report(mod.argparse.Namespace(
        checkpoints=runs, iters=[str(it), str(it2)], speed=None, step=None, label=[],
        ref=["scratch_term=scratch_none", "scratch_none=scratch_none"], fid_n=100,
        png=str(png), target=14, tol=3e-3))
    rows = {r["name"]: r for r in out["rows"]}
    assert rows["ft_term"]["dbpd"] == pytest.approx(0.5)      # 4.02 vs 4.0
    assert rows["scratch_term"]["dbpd"] == pytest.approx(2.0)  # 5.1 vs 5.0, not vs 4.0
    assert "| scratch_none | 5.0000 | (reference) |" in out["table"]
    assert png.stat().st_size > 0


def test_an_unknown_reference_is_refused(tmp_path):
    runs = [_run(tmp_path, "a", 4.0, 40.0)]
    it = tmp_path / "iters.json"
    it.write_text(json.dumps({"result": {"a": _iters(29)}}))
    mod = _script()
    with pytest.raises(SystemExit, match="'b' is not one of the runs"):
        mod.main(["report", *runs, "--iters", str(it), "--ref", "a=b", "--png", ""])
