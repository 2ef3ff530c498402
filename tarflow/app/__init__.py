"""Ring 3 support: what every command shares around the core.

Start-up checks (:mod:`tarflow.app.checks`), run records and resumes (:mod:`~tarflow.app.runs`),
the job log (:mod:`~tarflow.app.logs`), one-line user errors (:mod:`~tarflow.app.errors`), config
type checks, sweep summaries and sample-output folders. Hydra, OmegaConf and Lightning may appear
here; the console scripts themselves are the thin modules of :mod:`tarflow.cli`.
"""
