"""``python -m tests.reliability.sample_kill <tarflow-sample overrides>``: ``tarflow-sample``
that SIGKILLs the whole launch (torchrun and every rank: no cleanup, no flush) right after this
rank has written ``$TARFLOW_TEST_KILL_AFTER_SHARDS`` shard files. A crash midway that does not
depend on how fast a test can poll a busy machine. Linux (reads ``/proc``)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from tarflow.app.sample_shards import SampleFolder

KILL_ENV = "TARFLOW_TEST_KILL_AFTER_SHARDS"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each rank in a session of its own, so a
    process-group kill of torchrun would leave the ranks running)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it (this process last, if among them)."""
    targets = [*descendants(pid), pid]
    me = os.getpid()
    for target in [p for p in targets if p != me] + ([me] if me in targets else []):
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


_written = [0]


def _write_then_kill(write):  # noqa: ANN001, ANN202
    def wrapped(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        path = write(self, *args, **kwargs)
        _written[0] += 1
        if _written[0] >= int(os.environ.get(KILL_ENV, "1")):
            kill_tree(os.getppid())  # torchrun, the other ranks, this rank
        return path

    return wrapped


if __name__ == "__main__":
    from tarflow.cli.sample import main

    SampleFolder.write_shard = _write_then_kill(SampleFolder.write_shard)
    sys.exit(main())
