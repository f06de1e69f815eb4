"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a flag, a file, a name); the message says how to fix it."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every exception type the CLI reports as a one-line error."""
    from .config import ConfigError
    from .data import DatasetError
    from .engine import CheckpointError, NonFiniteLossError

    return (UserError, ConfigError, DatasetError, CheckpointError, NonFiniteLossError)
