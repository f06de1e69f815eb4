"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback.

A leaf module: every module's own user-facing error (``ConfigError``, ``DatasetError``,
``CheckpointError``, ``NonFiniteLossError``) subclasses :class:`UserError`, so the CLI catches one type.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a flag, a file, a name); the message says how to fix it."""
