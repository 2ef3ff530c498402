"""tarflow-bench and tarflow-rank on a tiny model with non-trivial weights."""

from __future__ import annotations

import json

import pytest

from tarflow.cli import bench, rank


def test_bench_table_errors_below_1e4_in_float32(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--batch", "1", "3", "--methods", "jacobi", "auto",
                "auto:paper", "[1-4-8-10]", "--tol", "1e-10", "--repeats", "2", "--probe", "16",
                "--plan-cache", str(tmp_path / "plans.json"), "--json", str(out)])
    text = capsys.readouterr().out
    assert "| sequential |" in text and "| auto |" in text and "| auto_paper |" in text
    assert text.count("planned in") == 2  # one plan per batch size, with its table
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"sequential", "jacobi", "auto", "auto_paper",
                                           "[1-4-8-10]"}
    assert {r["batch"] for r in rows} == {1, 3}
    for r in rows:
        assert r["max_abs_err"] < 1e-4, r
        assert r["seconds"] > 0 and r["speedup"] > 0
        assert set(r["iters"]) == {"0", "1"}


def test_rank_prints_table_and_schedule(tmp_path, capsys):
    rank.main(["--preset", "tiny", "--data", "fake", "--probe", "8",
               "--json", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert "share%" in text and "suggested schedule" in text
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["ranking"]) == 2 and "default" in saved["schedule"]


def test_the_printed_schedule_reads_back_as_a_sampler_schedule(capsys):
    """Issue 14 item 9: tarflow-rank's schedule, passed back on a command line, is the same."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from tarflow.app.checks.sampler import normalise_schedule
    from tarflow.conf import CONFIG_DIR
    from tarflow.sampling import parse_schedule
    from tarflow.sampling.settings import parse_sampler

    rank.main(["--preset", "tiny", "--data", "fake", "--probe", "8", "--tough-factor", "1.0",
               "--tough-segments", "4", "--tol", "0.002"])
    lines = capsys.readouterr().out.splitlines()
    printed = next(ln for ln in lines if ln.startswith("suggested schedule")).split(": ", 1)[1]
    override = next(ln for ln in lines if "as a fixed schedule" in ln).split(": ", 1)[1]
    schedule = parse_schedule(printed)
    assert printed.startswith("{") and schedule.describe() == printed
    # What the shell hands Hydra once it has stripped the single quotes.
    args = [a.replace("'", "") for a in override.split()]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("sample", overrides=["ckpt_path=x", "sampler=jacobi", *args])
    normalise_schedule(cfg.sampler)
    settings = parse_sampler(OmegaConf.to_container(cfg.sampler, resolve=True))
    assert settings.schedule == schedule


def test_cli_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as err:
        rank.main(["does-not-exist.pt"])
    assert err.value.code == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--methods", "[9-8-32]"])
    assert "cannot parse" in capsys.readouterr().err


def test_bench_bf16_network_and_paper_rule_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--batch", "2", "--methods", "jacobi@bf16", "auto:paper",
                "--tol", "1e-10", "--repeats", "1", "--warmup", "0", "--probe", "8",
                "--json", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"sequential", "jacobi@bfloat16", "auto_paper"}
    assert rows["jacobi@bfloat16"]["schedule"].endswith("@bfloat16")
    assert 0 < rows["jacobi@bfloat16"]["max_abs_err"] < 0.5  # bf16 network: close, not exact
    assert rows["auto_paper"]["max_abs_err"] < 1e-4


def test_bench_plain_loop_row_matches_jacobi_at_equal_iterations(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--batch", "2", "--methods", "jacobi:5", "plain:5",
                "--tol", "0", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["plain:5"]["iters"] == rows["jacobi:5"]["iters"] == {"0": 5, "1": 5}
    assert abs(rows["plain:5"]["max_abs_err"] - rows["jacobi:5"]["max_abs_err"]) < 1e-5


def test_bench_reuses_a_cached_plan(tmp_path, capsys):
    args = ["--preset", "tiny", "--batch", "2", "--methods", "auto", "--tol", "1e-4",
            "--repeats", "1", "--warmup", "0", "--probe", "8",
            "--plan-cache", str(tmp_path / "plans.json")]
    bench.main(args)
    assert "planned in" in capsys.readouterr().out
    bench.main(args)
    assert "reused from cache" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_compile_rows_match_their_eager_twins(tmp_path, capsys):
    """--compile adds '<method>+compile' rows on the same noise; compiled passes give the
    eager samples up to float32 rounding."""
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--batch", "2", "--methods", "jacobi", "--tol", "1e-10",
                "--repeats", "1", "--warmup", "0", "--compile", "--json", str(out)])
    text = capsys.readouterr().out
    assert "sequential+compile: first call (compile + run)" in text
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"sequential", "jacobi", "sequential+compile", "jacobi+compile"}
    assert rows["sequential+compile"]["max_abs_err"] < 1e-4
    assert rows["jacobi+compile"]["max_abs_err"] < 1e-4
    assert rows["jacobi+compile"]["iters"] == rows["jacobi"]["iters"]
