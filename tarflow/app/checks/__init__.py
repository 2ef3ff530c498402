"""Start-up checks of every command, run before any work or record: one module per command
(``train``, ``sample`` (also ``tarflow-eval``), ``encode``) and the helpers they share
(``common``). A refused config ends in one ``error: ...`` line and exit status 2."""
