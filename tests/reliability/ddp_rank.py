"""One rank of the DDP fault test, started on its own like an ``srun`` task (no supervisor that
would kill the other rank): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` come from the environment. Rank one fails inside the sampling callback's local
phase (``python -m tests.reliability.ddp_rank <tmp dir>``)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.integration.test_sampling_callback import (
    FailOnRankOne,
    tiny_callback,
    tiny_data,
    tiny_module,
    trainer,
)

if __name__ == "__main__":
    tmp = Path(sys.argv[1])
    callback = tiny_callback(tmp, FailOnRankOne, fid_stats_path=None, compare_sequential=0)
    trainer(tmp, [callback], devices=2, strategy="ddp").validate(tiny_module(), tiny_data())
