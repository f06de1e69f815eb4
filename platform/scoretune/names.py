"""Names and output paths: one rule for every command, and every output path kept inside its root.

A name (a run, a search, a job) becomes a folder name, an MLflow filter value and part of a Ray job's
submission id, so it is ASCII letters, digits, '.', '_' and '-', starts with a letter or digit, and
is at most 100 characters: ``train``, ``search``, ``launch``, ``status`` and ``promote`` all call
:func:`validate_name`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from .errors import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
NAME_RULE = "ASCII letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters"


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(NAME_RE.match(name)) and name not in (".", "..") and ".." not in name


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid name (None when it is): for pydantic validators."""
    if is_valid_name(name):
        return None
    return f"{name!r} is not allowed: use {NAME_RULE}"


def _pydantic_name(v: str) -> str:
    problem = name_problem(v)
    if problem:
        raise ValueError(problem)
    return v


Name = Annotated[str, AfterValidator(_pydantic_name)]
"""A pydantic field type that follows the one rule (experiment and search-space names)."""


def validate_name(name: object, what: str = "name", flag: str | None = None) -> str:
    """``name`` if it follows the one rule, else a one-line :class:`UserError` naming ``flag``/``what``."""
    problem = name_problem(name)
    if problem:
        raise UserError(f"{flag or what}: {problem}; e.g. cifar10-trades")
    return str(name)


def inside(root: str | os.PathLike, *parts: str) -> Path:
    """``root/parts...`` resolved, refused unless it stays inside ``root`` (no '..' or absolute escape)."""
    base = Path(root).expanduser().absolute().resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise UserError(f"{os.path.join(*parts)} would write outside {base}: use a plain name")
    return path
