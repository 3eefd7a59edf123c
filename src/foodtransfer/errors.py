"""Errors a user can fix: bad params, unreachable URLs, corrupt archives, missing files.

Every stage catches :class:`UserError` at its entry point, prints the message (what is wrong,
the bad value, how to fix it) and exits non-zero, without a stack trace from deep inside a
library.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user controls, with a message that says how to fix it."""


class ConfigError(UserError):
    """An invalid value in params.yaml (or a `dvc exp run -S` override)."""


class DownloadError(UserError):
    """The dataset archive could not be downloaded, verified or read."""


class DataError(UserError):
    """The images or meta lists do not allow building the requested dataset."""


class TrackingError(UserError):
    """The MLflow tracking store cannot be used."""


class ServerLostError(TrackingError):
    """The MLflow tracking server stopped answering in the middle of a stage."""
