"""What melbo prints, in a terminal or a log: :mod:`~melbo.output.live` (consoles, progress while work runs) and
:mod:`~melbo.output.tables` (results as tables and lines). Light: nothing here imports torch, so the command line
stays quick to start."""
