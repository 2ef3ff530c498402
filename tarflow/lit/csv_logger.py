"""A CSV logger that keeps one folder per run across resumes, and never deletes a metrics file.

Lightning's ``CSVLogger`` gives every launch the next ``version_<k>`` folder, so a resumed run's
metrics are split over ``csv/version_0``, ``csv/version_1``, ...; pinning the version instead is
worse: its writer deletes the existing ``metrics.csv`` when it starts. :class:`RunCSVLogger`
writes ``<save_dir>/<name>/version_0/metrics.csv`` and a resumed launch appends to that file
(the header is read back, so rows line up; when new columns appear the file is rewritten through
a temporary file and a rename, never truncated in place). Each launch's hyper-parameters go to
``hparams.yaml``, then ``hparams_1.yaml``, ... so none is overwritten.

Rows logged by an interrupted launch after its last checkpoint stay in the file, so a step that
was replayed after the resume appears twice; the later row is the resumed run's.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from tarflow.files import atomic_write


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


class _ContinuingWriter(ExperimentWriter):
    """``ExperimentWriter`` that appends to an existing ``metrics.csv`` instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = list(next(csv.reader(handle), []))
        self._hparams_file: str | None = None

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes the existing metrics file here; a resumed run continues it."""

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        if not _is_local(self.metrics_file_path):
            super()._rewrite_with_new_header(fieldnames)
            return
        with open(self.metrics_file_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        # A crash during the rewrite must not cost the rows already written.
        atomic_write(self.metrics_file_path, text.getvalue())

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        if self._hparams_file is None:
            names = ["hparams.yaml", *(f"hparams_{k}.yaml" for k in range(1, 10_000))]
            self._hparams_file = next(
                name for name in names if not self._fs.exists(os.path.join(self.log_dir, name))
            )
        save_hparams_to_yaml(os.path.join(self.log_dir, self._hparams_file), self.hparams)


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` with one ``version_0`` folder per run directory (see the module doc).

    Args:
        save_dir: the run directory.
        name: sub-folder of ``save_dir`` (``csv``).
        version: the folder's version (0); an int or a string, as for ``CSVLogger``.
        **kwargs: ``prefix``, ``flush_logs_every_n_steps``.
    """

    def __init__(self, save_dir: str, name: str = "csv", version: int | str = 0,
                 **kwargs: Any) -> None:
        super().__init__(save_dir, name=name, version=version, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
