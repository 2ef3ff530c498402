"""Optuna searches (``hparams_search=optuna_sampler`` / ``optuna_train``) that survive a kill.

Hydra's Optuna sweeper keeps its study in the storage the config names (here SQLite in the
sweep folder: ``sqlite:///<sweep dir>/optuna.db``) and loads it again when the same search is
started with the same ``hydra.sweep.dir``; but it would then number its jobs from 0 again
(writing a new trial into an old trial's folder, and a training job would continue another
trial's checkpoint) and run ``n_trials`` more on top of those done. :func:`continue_study`, run
by the sweeper ``hydra_plugins.tarflow_sweeps.search.ContinuedOptunaSweeper`` before it starts,
reads how far the stored study got: job numbers continue after its last trial (job ``k`` is
trial ``k``), ``n_trials`` counts the trials of every run of the search, and the trials a kill
interrupted are marked failed (their folders stay; the sweep summary lists them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
SQLITE = "sqlite:///"


def continue_study(impl: Any) -> None:
    """Prepare an ``OptunaSweeperImpl`` (storage, study name, n_trials, job_idx) to continue
    its stored study (see the module doc); a new search is left as it is."""
    storage = None if impl.storage is None else str(impl.storage)
    if storage is None:
        return
    if storage.startswith(SQLITE):  # SQLite creates the file, not its folder
        Path(storage[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=impl.study_name, storage=storage)
    except KeyError:  # no study of that name yet: a new search
        return
    trials = study.trials
    finished = sum(t.state.is_finished() for t in trials)
    interrupted = [t for t in trials if t.state == TrialState.RUNNING]
    for trial in interrupted:
        study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
    impl.job_idx = len(trials)
    impl.n_trials = max(0, int(impl.n_trials) - finished)
    log.info("continuing search %r (%s): %d trial(s) finished, %d interrupted (now failed), "
             "%d to go", impl.study_name, storage, finished, len(interrupted), impl.n_trials)
