"""Issue 28: the pieces of the sweeps that need no subprocess: the Pareto front, a stored Optuna
study continuing where a killed search left it, and the launchers' start-up check."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from optuna.trial import TrialState

from tarflow.app import launchers  # noqa: F401  (the launcher configs' resolvers)
from tarflow.app.checks.sweeps import check_launcher
from tarflow.app.search import continue_study
from tarflow.conf import CONFIG_DIR
from tarflow.eval.pareto import dominates, pareto_front


def test_the_front_is_every_point_no_other_beats_on_both() -> None:
    points = [(1.0, 9.0), (2.0, 5.0), (2.0, 6.0), (3.0, 5.0), (4.0, 1.0), (5.0, 2.0),
              (0.5, float("nan"))]
    assert pareto_front(points) == [0, 1, 4]  # by seconds; ties and NaN never on it
    assert dominates((2.0, 5.0), (3.0, 5.0)) and not dominates((2.0, 5.0), (2.0, 5.0))
    front = pareto_front(points)
    for i, p in enumerate(points[:-1]):  # the definition, checked point by point
        beaten = any(dominates(q, p) for q in points[:-1])
        assert (i in front) == (not beaten)


def _impl(storage: str, n_trials: int) -> SimpleNamespace:
    return SimpleNamespace(storage=storage, study_name="s", n_trials=n_trials, job_idx=0)


def test_a_stored_study_continues_after_a_kill(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}"
    fresh = _impl(storage, 5)
    continue_study(fresh)  # a new search: nothing to continue; the folder is made for SQLite
    assert (fresh.job_idx, fresh.n_trials) == (0, 5) and (tmp_path / "sweep").is_dir()
    study = optuna.create_study(study_name="s", storage=storage,
                                directions=["minimize", "minimize"])
    for value in (1.0, 2.0):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        study.tell(trial, [value, -value])
    study.ask()  # running when the search was killed
    again = _impl(storage, 5)
    continue_study(again)
    assert again.job_idx == 3  # job k is trial k: the next job is 3, not 0 again
    assert again.n_trials == 3  # 5 in all, 2 finished; the interrupted one is not counted
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    done = _impl(storage, 2)
    continue_study(done)
    assert done.n_trials == 0


def _hydra_cfg(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("train", overrides=[f"paths.root_dir={tmp_path}", *overrides],
                       return_hydra_config=True)


def test_the_slurm_launcher_follows_the_trainer_and_refuses_a_mismatch(tmp_path: Path) -> None:
    cfg = _hydra_cfg(tmp_path, ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert (launcher.tasks_per_node, launcher.nodes, launcher.gpus_per_node) == (4, 2, 4)
    check_launcher(cfg)  # agrees: no error
    cpu = _hydra_cfg(tmp_path, ["hydra/launcher=slurm", "trainer=cpu"])
    assert cpu.hydra.launcher.gpus_per_node == 0
    bad = _hydra_cfg(tmp_path, ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                "hydra.launcher.tasks_per_node=2"])
    with pytest.raises(ValueError, match=r"hydra.launcher.tasks_per_node=2 but "
                                         r"trainer.devices=4"):
        check_launcher(bad)
    nodes = _hydra_cfg(tmp_path, ["hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.nodes=3"])
    with pytest.raises(ValueError, match=r"hydra.launcher.nodes=3 but trainer.num_nodes=1"):
        check_launcher(nodes)


def test_a_local_sweep_refuses_a_trainer_that_relaunches_itself(tmp_path: Path) -> None:
    cfg = _hydra_cfg(tmp_path, ["hydra/launcher=local", "trainer=cpu", "trainer.devices=2",
                                "+trainer.strategy=ddp"])
    with pytest.raises(ValueError, match="trainer.strategy=ddp_spawn"):
        check_launcher(cfg)
    check_launcher(_hydra_cfg(tmp_path, ["hydra/launcher=local", "trainer=cpu",
                                         "trainer.devices=2", "+trainer.strategy=ddp_spawn"]))
    check_launcher(_hydra_cfg(tmp_path, ["hydra/launcher=local", "trainer=cpu"]))


def test_the_report_of_an_eval_sweep_names_its_front_and_places_a_mark(tmp_path: Path) -> None:
    import json

    from tarflow.app.search_report import write_report

    for job, (seconds, fid, tol) in enumerate([(0.1, 30.0, "0.01"), (0.2, 20.0, "0.001"),
                                                (0.3, 25.0, "0.0001")]):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "eval.json").write_text(json.dumps(
            {"val/fid_64": fid, "seconds_per_image": seconds, "overrides": [f"sampler.tol={tol}"]}))
    (tmp_path / "3").mkdir()  # a failed job: no eval.json, no point
    mark = tmp_path / "auto.json"
    mark.write_text(json.dumps({"val/fid_64": 26.0, "seconds_per_image": 0.25}))
    table = write_report(tmp_path, {"auto": mark}).read_text().splitlines()
    assert table[0] == "| job | s/image | val/fid_64 | sampler.tol |"
    assert table[2:4] == ["| 0 | 0.1 | 30 | 0.01 |", "| 1 | 0.2 | 20 | 0.001 |"]
    assert "2 of 3 finished jobs are on the front" in table[5]
    assert table[6] == "auto: 0.25 s/image, val/fid_64 26: dominated by job(s) 1."
    assert (tmp_path / "pareto.png").stat().st_size > 1000
