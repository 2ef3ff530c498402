"""Ring 3 support: what every command shares around the core.

Start-up checks (:mod:`tarflow.app.checks`), run records and resumes (:mod:`~tarflow.app.runs`),
the job log (:mod:`~tarflow.app.logs`), one-line user errors (:mod:`~tarflow.app.errors`), the
argparse commands' shared arguments (:mod:`~tarflow.app.cli_args`), sweep summaries and
sample-output folders. Hydra, OmegaConf and Lightning may appear
here; the console scripts themselves are the thin modules of :mod:`tarflow.cli`, one per script
(docs/architecture.md, "Ring 3").
"""
