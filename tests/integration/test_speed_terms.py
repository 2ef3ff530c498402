"""``module.speed_terms`` in real (tiny) Lightning runs: logged, with EMA, compile, resume, DDP
and ``init_from`` an official ``.pth`` (bad settings: tests/reliability/
test_speed_terms_startup.py)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tarflow.app.checks.train import _check_no_missing_values, check_config
from tarflow.cli.train import train
from tarflow.model import TarFlow
from tarflow.model.official import official_name
from tests.integration.conftest import (
    REPO,
    TINY,
    LossRecorder,
    StopAfterEpochs,
    compose_train,
)
from tests.integration.test_train import run_one_step

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
    # Its validation rounds log Jacobi iterations (fixed schedule, the docs' tolerance) at every
    # validation, so sampling/iters/<block> is a curve over the fine-tune, not the planner's plan.
    assert (cfg.sampler.schedule, cfg.sampler.tol) == ("jacobi", 3e-3)
    assert cfg.callbacks.sampling.every_n_epochs == 1
    # A fine-tune recipe: without init_from it stops at start-up instead of training afresh.
    assert list(cfg.required) == ["init_from"]
    with pytest.raises(ValueError, match="init_from=<value>"):
        check_config(cfg)
    cfg.ckpt_path = "run/checkpoints/last.ckpt"  # a resume: the weights come from there
    _check_no_missing_values(cfg)


# A term that is linear in the per-sample values (mean over the rows, `sum` over blocks, no
# random probes): DDP's gradient average over 2 ranks x 4 rows is then exactly the gradient of
# one process on the 8 rows.
LINEAR_TERM = {"traj": {"kind": "trajectory", "weight": 1.0, "k": 2, "balance": "sum"}}


@pytest.mark.slow  # a 2-process gloo fit and two single ones (1-2 min on 2 busy cores)
def test_ddp_with_a_term_takes_the_single_process_step(tmp_path: Path) -> None:
    """2 gloo processes x batch 4 with a speed term take the same step as 1 process x 8, and the
    term changes that step (proj_out random, so the network is not the identity where every
    term and its gradient vanish)."""
    single, double, plain = (tmp_path / f"{n}.pt" for n in ("single", "ddp", "plain"))
    kw = {"proj_out_std": 0.05}
    run_one_step(str(single), devices=1, batch_size=8, speed_terms=LINEAR_TERM, **kw)
    run_one_step(str(plain), devices=1, batch_size=8, **kw)
    code = (f"from tests.integration.test_train import run_one_step; "
            f"run_one_step({str(double)!r}, devices=2, batch_size=4, "
            f"speed_terms={LINEAR_TERM!r}, **{kw!r})")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b, c = (torch.load(p, weights_only=True) for p in (single, double, plain))
    moved = sum(int((a[k] != c[k]).sum()) for k in a)
    assert moved > 100, f"the term changed only {moved} weights"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_init_from_an_official_pth_with_terms_on(tmp_path: Path) -> None:
    """A fine-tune from an official-format .pth (bare state dict, official file name): the terms
    run on the loaded weights from the first step. A zero-initialised (fresh) network has every
    term exactly 0 at step 0, so positive step-0 values show the weights were loaded first."""
    overrides = [*TINY, TERMS, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                 "logger=csv"]
    config = instantiate(compose_train(tmp_path, overrides).module).config
    torch.manual_seed(1)
    net = TarFlow(config)
    for block in net.blocks:  # a trained-looking network: proj_out away from zero
        torch.nn.init.normal_(block.proj_out.weight, std=0.05)
    path = tmp_path / official_name("fake", config)
    torch.save(net.state_dict(), path)
    for name, extra in (("fresh", []), ("finetune", [f"init_from={path}"])):
        result = train(compose_train(tmp_path, [*overrides, *extra], run=name))
        log = Path(result["trainer"].logger.log_dir) / "metrics.csv"
        rows = [r for r in csv.DictReader(log.open()) if r.get("train/jac")]
        first = {k: float(rows[0][k]) for k in ("train/jac", "train/traj")}
        assert int(rows[0]["step"]) == 0
        if name == "fresh":
            assert first == {"train/jac": 0.0, "train/traj": 0.0}, first
        else:
            assert all(v > 0 and torch.isfinite(torch.tensor(v)) for v in first.values()), first
            ckpt = torch.load(result["last_ckpt"], weights_only=True)
            assert set(ckpt["hyper_parameters"]["speed_terms"]) == {"jac", "chain", "traj"}
