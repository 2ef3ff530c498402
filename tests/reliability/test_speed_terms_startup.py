"""Bad ``module.speed_terms`` stop ``tarflow-train`` at start-up with one ``error:`` line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tarflow.cli import train
from tests.reliability.helpers import QUIET_HYDRA, assert_one_line_error, call_main, train_overrides

pytestmark = pytest.mark.usefixtures("clean_hydra")


@pytest.mark.parametrize("value,fragments", [
    ("{a: {kind: chain, weight: -1}}", ["module.speed_terms.a.weight=-1.0", ">= 0"]),
    ("{a: {kind: chain, weight: 1, blocks: [3]}}", ["unknown block id(s) [3]", "0..1"]),
    ("{a: {kind: chain, weight: 1, k: 0}}", ["module.speed_terms.a.k=0", ">= 1"]),
    ("{a: {kind: chain, weight: 1, every: 0}}", ["module.speed_terms.a.every=0"]),
])
def test_bad_terms_stop_at_start_up(tmp_path: Path, capsys, value, fragments) -> None:
    argv = ["tarflow-train", *train_overrides(tmp_path, f"module.speed_terms={value}"),
            *QUIET_HYDRA]
    assert_one_line_error(call_main(train.main, argv, capsys), *fragments)
    for name in ("wandb", "csv", "checkpoints"):
        assert not (tmp_path / "run" / name).exists(), name
