"""Issue 30 defect 4: ``tarflow-eval`` (and ``-sample``) and ``tarflow-bench`` plan ``auto``
alike for the same checkpoint, batch, tolerance and guidance. Their plan-cache keys differed
(bench's planner part held only ``tough_factor``, the sampler configs' held their own, older
planner options), so one never reused the other's plan and each planned with other options: FID
102.93 vs 103.19. The key is built in one place (``plan_key``) from every planner option."""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tarflow.app.cli_args import model_from_args
from tarflow.cli import bench
from tarflow.conf import CONFIG_DIR
from tarflow.sampling import PlanCache, PlannerOptions
from tarflow.sampling.choose import choose_schedule
from tarflow.sampling.settings import parse_sampler

TOL = "0.002"


def _eval_settings(*overrides: str):
    """The sampler settings ``tarflow-eval sampler=gs_jacobi_auto ...`` builds."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("eval", overrides=["sampler=gs_jacobi_auto", *overrides])
    GlobalHydra.instance().clear()
    return parse_sampler(OmegaConf.to_container(cfg.sampler, resolve=True))


def test_eval_reuses_the_plan_bench_made_for_the_same_settings(tmp_path, capsys):
    cache = tmp_path / "plans.json"
    argv = ["--preset", "tiny", "--batch", "2", "--methods", "auto", "--tol", TOL,
            "--repeats", "1", "--warmup", "0", "--probe", "8", "--plan-cache", str(cache)]
    assert bench.main(argv) == 0
    assert "planned in" in capsys.readouterr().out
    model, _ = model_from_args(bench.build_parser().parse_args(argv))
    settings = _eval_settings(f"sampler.tol={TOL}")
    assert PlanCache(cache).get(settings.plan_key(model, 2)) is not None
    _, plan = choose_schedule(settings, model, batch_size=2, plan_cache=str(cache), report=None)
    assert plan is not None and plan.source == "cache"
    bench_settings = bench.planned_settings(bench.build_parser().parse_args(argv), None)
    assert settings.plan_key(model, 2) == bench_settings.plan_key(model, 2)


def test_the_shipped_sampler_configs_plan_with_the_planners_defaults():
    """Written-out planner options equal ``PlannerOptions``' defaults (which bench, notebooks
    and the callback's tests use), so every command plans alike unless a user changes one."""
    defaults = PlannerOptions()
    for path in sorted(Path(CONFIG_DIR, "sampler").glob("*.yaml")):
        planner = yaml.safe_load(path.read_text()).get("planner") or {}
        for key, value in planner.items():
            want = getattr(defaults, key)
            assert (list(want) if isinstance(want, tuple) else want) == value, (path.name, key)
        settings = parse_sampler({**yaml.safe_load(path.read_text()), "schedule": "auto"})
        assert settings.planner_options == defaults, path.name
