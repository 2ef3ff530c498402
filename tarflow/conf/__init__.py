"""The Hydra configs shipped inside the package (``train.yaml``, ``sample.yaml``, ``eval.yaml``,
``encode.yaml`` and their groups).

They live in the package, not the checkout, so a wheel or a non-editable install composes the
same configs. :data:`CONFIG_DIR` is the one definition every Hydra entry point reads; users add
their own directories on top with Hydra's ``--config-dir`` (see the README's Installation notes).
"""

from pathlib import Path

# An absolute path: hydra.main reads a relative config_path against the calling module's package,
# which would tie each entry point to its own location.
CONFIG_DIR = str(Path(__file__).resolve().parent)
