"""tarflow's Hydra plugins (Hydra finds plugins only under the ``hydra_plugins`` namespace):
a local launcher with a cap on parallel jobs, and an Optuna sweeper whose study continues.
The logic lives in ``tarflow/app`` (:mod:`tarflow.app.launchers`, :mod:`tarflow.app.search`)."""
