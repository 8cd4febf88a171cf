"""The experiment behind ``minilora demo``: data, tasks, training, report (the CLI is ``minilora.cli.demo``)."""
