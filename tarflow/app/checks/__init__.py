"""Start-up checks of every command, run before any work or record: one module per command
(``train``, ``sample`` (also ``tarflow-eval``), ``encode``) and the checks they share, each in its
own module (``sampler``, ``config_types``, ``startup``, ``eval_inputs``, ``sweeps``, ``distill``,
``common``, ``paths``). A refused config ends in one ``error: ...`` line and exit status 2."""
