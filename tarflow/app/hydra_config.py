"""``--cfg hydra --resolve`` for the Hydra commands.

Hydra prints the ``hydra`` node after deleting the rest of the config, so every interpolation into
it (``${task_name}`` in the run dir, ``${trainer.devices}`` in ``hydra/launcher=slurm``) fails
with "Interpolation key not found"; :func:`resolved_hydra_config` (called by
:func:`tarflow.app.errors.cli_main`) prints the node resolved in the whole config instead.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from contextlib import redirect_stdout


def _asks_resolved_hydra(argv: list[str]) -> int | None:
    """The index of ``hydra`` in ``--cfg hydra`` / ``-c hydra`` when ``--resolve`` is given."""
    if "--resolve" not in argv:
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg in ("--cfg", "-c") and argv[i + 1] == "hydra":
            return i + 1
    return None


def resolved_hydra_config(hydra_main: Callable[[], object]) -> bool:
    """For ``--cfg hydra --resolve``: print the resolved ``hydra`` node (from Hydra's own
    ``--cfg all --resolve``) and return True; otherwise do nothing and return False."""
    import yaml

    at = _asks_resolved_hydra(sys.argv)
    if at is None:
        return False
    saved = sys.argv
    sys.argv = [*saved[:at], "all", *saved[at + 1:]]
    printed = io.StringIO()
    try:
        with redirect_stdout(printed):
            hydra_main()
    finally:
        sys.argv = saved
    whole = yaml.safe_load(printed.getvalue()) or {}
    print(yaml.safe_dump({"hydra": whole.get("hydra")}, sort_keys=False), end="")
    return True
