"""Errors a user can fix.

Anything derived from :class:`NanoGPTError` is printed by the CLI as one line per
problem, without a traceback, and ends the program with exit status 2. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class NanoGPTError(Exception):
    """A problem with the user's input (a file, a key, a value) rather than a bug.

    ``str(error)`` is what the user sees: one line per problem.
    """

    exit_code: int = 2


class ConfigError(NanoGPTError):
    """One or more problems in an experiment file or a ``--set`` override."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class DataError(NanoGPTError):
    """A dataset source or prepared dataset that cannot be used."""


class PluginError(NanoGPTError):
    """A plugin registered something it must not (a duplicate name, a bad options class)."""


class PluginFault(NanoGPTError):
    """A plugin raised an error while running (a callback hook, a dataset source): exit 1.

    The message names the plugin, the hook or method and the error; ``--debug``
    shows the original traceback (it is chained as ``__cause__``).
    """

    exit_code = 1


class StorageError(NanoGPTError):
    """A file could not be written: the disk is full or the folder is read-only."""


class TrainingError(NanoGPTError):
    """A run that started and then had to stop (a NaN loss, say): exit status 1."""

    exit_code = 1
