"""``module.speed_terms`` in real (tiny) Lightning runs: logged, with EMA, compile and resume
(bad settings: tests/reliability/test_speed_terms_startup.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tarflow.cli.train import train
from tests.integration.conftest import TINY, LossRecorder, StopAfterEpochs, compose_train

# All three kinds on every block, on 4 of the 8 rows; a random proj_out needs no help: the
# identity at step 0 gives zero terms, and one Adam step already makes them positive.
TERMS = ("module.speed_terms={jac: {kind: jacobian, weight: 0.5, rows: 4}, "
         "chain: {kind: chain, weight: 0.5, k: 2, rows: 4, every: 2}, "
         "traj: {kind: trajectory, weight: 1.0, k: 1, blocks: [1], rows: 4}}")


def _metrics(result: dict) -> dict[str, float]:
    return {k: float(v) for k, v in result["metrics"].items()}


def test_terms_train_log_and_are_recorded(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [*TINY, TERMS, "trainer.max_epochs=1", "logger=csv",
                                   "module.optim.lr=1e-2", "module.optim.warmup_steps=0"])
    result = train(cfg)
    m = _metrics(result)
    for key in ("train/jac", "train/traj", "train/jac/0", "train/jac/1", "train/traj/1"):
        assert key in m and m[key] > 0 and torch.isfinite(torch.tensor(m[key])), key
    assert "train/traj/0" not in m  # blocks: [1]
    ckpt = torch.load(result["last_ckpt"], weights_only=True)
    terms = ckpt["hyper_parameters"]["speed_terms"]
    assert terms["chain"]["kind"] == "chain" and terms["chain"]["every"] == 2
    assert ckpt["tarflow"]["weights"] == "ema"  # EMA (default callbacks) composes with them
    csv = (Path(result["trainer"].logger.log_dir) / "metrics.csv").read_text()
    assert "train/chain" in csv.splitlines()[0]


def test_terms_with_compiled_blocks(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [*TINY, TERMS, "module.compile={backend: aot_eager}",
                                   "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                                   "logger=csv"])
    m = _metrics(train(cfg))
    assert torch.isfinite(torch.tensor([m["train/loss"], m["train/jac"], m["train/traj"]])).all()


@pytest.mark.slow  # three short fits (~1 min on 2 busy cores)
def test_resume_with_terms_continues_exactly(tmp_path: Path) -> None:
    """The terms' probes and schedule draw from per-step state only: a resumed run with terms
    takes the same steps as an uninterrupted one."""
    common = [*TINY, TERMS, "trainer.max_epochs=2", "module.optim.lr=1e-3", "logger=csv",
              "callbacks.model_checkpoint.monitor=null"]
    losses = {}
    for name, extra, cbs in (("full", [], []), ("first", [], [StopAfterEpochs(1)]),
                             ("resumed", [f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}"],
                              [])):
        recorder = LossRecorder()
        cfg = compose_train(tmp_path, [*common, *extra],
                            run="first" if name == "resumed" else name)
        train(cfg, callbacks=[*cbs, recorder])
        losses[name] = recorder.losses
    assert sorted(losses["resumed"]) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert losses["resumed"][step] == losses["full"][step], step


def test_speed_terms_group_and_experiment_compose(tmp_path: Path) -> None:
    """Every option of the `speed_terms` group (and the fine-tune experiment) builds a module
    with exactly that term; `none` builds none."""
    from hydra.utils import instantiate

    for option, kind in (("none", None), ("jacobian", "jacobian"), ("chain", "chain"),
                         ("trajectory", "trajectory")):
        cfg = compose_train(tmp_path, ["experiment=demo_fast_sampling", f"speed_terms={option}"])
        module = instantiate(cfg.module)
        assert [t.kind for t in module.speed_terms] == ([kind] if kind else []), option
    cfg = compose_train(tmp_path, ["experiment=demo_fast_sampling"])
    assert cfg.trainer.max_epochs <= 10 and cfg.module.speed_terms
