"""One-line errors for the Hydra console scripts (tarflow-train, tarflow-sample, tarflow-eval).

A wrong path, a config value that cannot work or a broken checkpoint is the user's to fix, so it is
reported as a single ``error: <message>`` line on stderr with exit status 2, not as an 80-line
Hydra/instantiate traceback. Programming errors (anything else) keep their traceback. Setting
``TARFLOW_DEBUG=1`` (or Hydra's own ``HYDRA_FULL_ERROR=1``) shows the full traceback for every
error.

Two places need the conversion, because Hydra reports errors itself in both:

* :func:`cli_main` runs the ``@hydra.main`` function; it sees what fails before the task starts
  (an unknown ``experiment=`` name, a bad override). Hydra would print those in several lines and
  exit 1, so it is asked to re-raise them (``HYDRA_FULL_ERROR`` for the duration of the call).
* :func:`one_line_errors` goes around the task's body; Hydra would otherwise print
  ``Error executing job with overrides: [...]`` before re-raising. In ``--multirun`` mode it stays
  out of the way, so one failing job is reported by Hydra and does not end the sweep at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

from hydra.errors import HydraException, InstantiationException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

DEBUG_ENV = "TARFLOW_DEBUG"
EXIT_USAGE = 2  # the status argparse uses for a bad command line
# Errors a user causes and fixes: config values (ValueError covers DataError and
# CheckpointError), paths, and Hydra / OmegaConf composition errors.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    HydraException,
    OmegaConfBaseException,
)
# Marks HYDRA_FULL_ERROR as set by cli_main, so processes started meanwhile (plain-ddp ranks
# re-run the command with this environment) do not read it as the user asking for tracebacks.
_OURS = "_TARFLOW_SET_HYDRA_FULL_ERROR"


def debug_requested() -> bool:
    """True when the user asked for full tracebacks."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    return os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(_OURS) != "1"


def root_cause(err: BaseException) -> BaseException:
    """The exception inside Hydra's ``InstantiationException`` wrappers (only those: our own
    errors chained with ``raise ... from`` carry the clearer message themselves)."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def one_line(text: str) -> str:
    """Join a multi-line message into one line.

    A line ending in ":" introduces a list (Hydra's "Available options in 'experiment':"); its
    items are joined with commas, other lines with "; ".
    """
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    out, in_list = lines[0], lines[0].endswith(":")
    for line in lines[1:]:
        if out.endswith((":", ".")):
            out += " " + line
        elif in_list:
            out += ", " + line
        else:
            out += "; " + line
        in_list = in_list or line.endswith(":")
    return out


def describe(err: BaseException) -> str:
    """The one-line message for ``err`` (without the ``error:`` prefix)."""
    cause = root_cause(err)
    # Hydra appends its config search path to composition errors: noise for the user.
    text = str(cause).split("\nConfig search path:", 1)[0]
    if "Original Traceback" in text:
        # Raised in a DataLoader worker: torch puts the worker's whole traceback in the message;
        # its last line is the original "Type: message".
        text = text.strip().splitlines()[-1]
    elif not isinstance(cause, USER_ERRORS):
        # Found inside an InstantiationException: the type name helps (e.g. the TypeError of a
        # misspelt config key reaching a constructor).
        text = f"{type(cause).__name__}: {text}"
    where = ""
    if cause is not err and isinstance(err, InstantiationException):
        # Hydra's message ends with "full_key: <node>": name the config node that failed.
        key = str(err).rsplit("full_key:", 1)
        where = f" (config: {key[1].strip()})" if len(key) == 2 else ""
    return one_line(text) + where + _quoting_hint(cause)


def _quoting_hint(err: BaseException) -> str:
    """How to quote an override Hydra's grammar refused (``ckpt_path=~/m.ckpt``: ``~`` and
    parentheses, a space next to brackets, are grammar unless quoted)."""
    override = getattr(err, "override", None)
    if not isinstance(err, OverrideParseException) or not override or "=" not in override:
        return ""
    key, value = override.split("=", 1)
    return (f" (hint: quote the value for Hydra, inside the shell's quotes: "
            f"'{key}=\"{value}\"')")


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a user error raised inside the block into ``error: ...`` and exit status 2; the
    run directory the command created is removed again when it is still empty."""
    from tarflow.app.runs import remove_new_run_dir, run_dir_error

    try:
        if (unwritable := run_dir_error()) is not None:  # an existing read-only run dir
            raise ValueError(unwritable)
        yield
    except USER_ERRORS as err:
        if in_multirun():
            raise
        remove_new_run_dir()  # a refused command leaves no empty run directory behind
        if debug_requested():
            raise
        fail(describe(err))
    except SystemExit as stop:  # fail() called by the command itself
        if stop.code == EXIT_USAGE and not in_multirun():
            remove_new_run_dir()
        raise


def cli_main(hydra_main: Callable[[], T]) -> T:
    """Run a ``@hydra.main`` function as a console script, with one-line user errors.

    Args:
        hydra_main: the decorated function; it reads ``sys.argv`` itself.

    Returns:
        Whatever the task returned (Hydra sweepers read it).
    """
    from tarflow.app.runs import run_dir_error

    run_dir_error(forget=True)  # an earlier command's, in this process (tests, notebooks)
    debug = debug_requested()
    saved = {k: os.environ.get(k) for k in ("HYDRA_FULL_ERROR", _OURS)}
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        # Hydra re-raises instead of printing its own report; in debug mode that gives the
        # complete traceback rather than Hydra's shortened one.
        os.environ.update({"HYDRA_FULL_ERROR": "1", _OURS: "1"})
    from tarflow.app.hydra_config import resolved_hydra_config

    try:
        if debug:
            return hydra_main()
        with one_line_errors():
            if resolved_hydra_config(hydra_main):  # --cfg hydra --resolve
                return None  # type: ignore[return-value]
            try:
                return hydra_main()
            except OSError:  # Hydra could not create hydra.run.dir: say why in one line
                if (unwritable := run_dir_error()) is None:
                    raise
                raise ValueError(unwritable) from None
    except BaseException:
        # A sweep that a launcher gave up on still gets its table (tarflow.app.sweep_summary).
        from tarflow.app.sweep_summary import finish_interrupted

        finish_interrupted()
        raise
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
