"""The sweeper of the ``hparams_search=optuna_*`` configs: Hydra's Optuna sweeper whose study,
stored in the sweep folder, continues where a stopped search left it (same job numbering,
``n_trials`` counted over all runs of the search): :func:`tarflow.app.search.continue_study`."""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class ContinuedOptunaSweeper(OptunaSweeper):
    """:class:`OptunaSweeper` that first reads how far its stored study got."""

    def sweep(self, arguments: list[str]) -> Any:
        from tarflow.app.search import continue_study

        continue_study(self.sweeper)
        return super().sweep(arguments)
