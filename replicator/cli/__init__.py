"""The ``replicator`` command line (:mod:`.app`): commands by what they do (:mod:`.replication`,
:mod:`.repository`, :mod:`.maintenance`), their options (:mod:`.options`), what they share at
run time (:mod:`.support`) and what they print (:mod:`.render`)."""

# Importing the command modules registers their commands, in the order `--help` lists them.
# isort: off
from replicator.cli import replication, repository, maintenance  # noqa: F401

# isort: on
from replicator.cli.app import app, main

__all__ = ["app", "main"]
