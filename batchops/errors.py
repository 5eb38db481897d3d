"""One shallow exception hierarchy: every error batchops raises on purpose is a BatchopsError.

The CLI maps them to exit codes; library users catch BatchopsError.
"""

from __future__ import annotations


class BatchopsError(Exception):
    """Base class for every error batchops raises on purpose."""

    exit_code = 1


class InputError(BatchopsError):
    """Bad input or usage: a file, row, column or value is wrong. Nothing was uploaded.

    The message is one line that names the problem (file, row, column or value).
    """

    exit_code = 2


class ConfigError(InputError):
    """A bad option, a bad batchops.toml entry, or a missing key variable."""


class RunIncomplete(BatchopsError):
    """The run ended with rows still missing (quota gone, budget reached, skipped rows)."""

    exit_code = 3


class StateError(BatchopsError):
    """The run directory's database is missing, newer than this version, or inconsistent."""

    exit_code = 2
