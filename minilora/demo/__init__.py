"""The experiment behind ``minilora demo``: ``tasks`` (models and data), ``experiment`` (training,
merge check, report). The command is ``minilora.cli.demo``."""
