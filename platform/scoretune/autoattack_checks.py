"""AutoAttack's checks, captured: what ``pyautoattack.checks`` reports, as :class:`AACheck` records.

The checks report through the ``logging`` logger ``"auto-attack"`` (``logger.warning``), or
``warnings.warn(Warning(msg))`` where no logger is passed. Both are captured (not printed per batch)
and kept once per kind, with a count: ``randomized``, ``softmax_output``, ``dynamic``, ``n_classes``,
``zero_gradients`` (from APGD-T's DLR gradient), ``square_success`` (Square beat the gradient
attacks), plus scoretune's own ``perturbation_bound`` (see :mod:`scoretune.robustness`).
``checks.check_dynamic`` counts in a module-global dict that the package never resets; it is reset
before each evaluation so one dynamic model cannot flag later ones. No MLflow/Ray/Optuna import.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

Log = Callable[[str], None]


@dataclass(frozen=True)
class AACheck:
    """One AutoAttack check that fired: its kind, the first message, how many times it was reported."""

    name: str
    message: str
    count: int = 1



_CHECK_KINDS = (
    ("randomized defense", "randomized"),
    ("probability distribution", "softmax_output"),
    ("zero gradient", "zero_gradients"),
    ("Square Attack has decreased", "square_success"),
    ("dynamic defense", "dynamic"),
    ("target classes", "n_classes"),
    ("not possible to use the", "n_classes"),
)


def _check_kind(message: str) -> str:
    for needle, kind in _CHECK_KINDS:
        if needle in message:
            return kind
    return "other"


class _CheckLog:
    """Collects AutoAttack check messages by kind (first message kept, reports counted)."""

    def __init__(self, log: Log | None, initial: list[dict[str, Any]] | None = None):
        self.log = log
        self.items: dict[str, AACheck] = {}
        for c in initial or []:
            self.items[c["name"]] = AACheck(c["name"], c["message"], int(c["count"]))

    def add(self, message: str, kind: str | None = None) -> None:
        kind = kind or _check_kind(message)
        old = self.items.get(kind)
        if old is None:
            self.items[kind] = AACheck(kind, message, 1)
            if self.log:
                self.log(f"AutoAttack check [{kind}]: {message}")
        else:
            self.items[kind] = AACheck(kind, old.message, old.count + 1)

    def as_list(self) -> list[AACheck]:
        return list(self.items.values())

    def to_json(self) -> list[dict[str, Any]]:
        return [{"name": c.name, "message": c.message, "count": c.count} for c in self.items.values()]


class _Handler(logging.Handler):
    def __init__(self, sink: _CheckLog):
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.add(record.getMessage())


@contextlib.contextmanager
def _capture_checks(sink: _CheckLog) -> Iterator[None]:
    """Route the 'auto-attack' logger's warnings and pyautoattack's ``warnings.warn`` into ``sink``."""
    from pyautoattack import checks

    for k in checks.funcs:  # a module-global call counter the package never resets (check_dynamic)
        checks.funcs[k] = 0
    logger = logging.getLogger("auto-attack")
    handler = _Handler(sink)
    old_propagate, old_level = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False  # reported by us, once per kind, not printed per batch
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate
        logger.setLevel(old_level)
    for w in caught:
        if w.category is Warning and _check_kind(str(w.message)) != "other":
            sink.add(str(w.message))
        else:  # not ours: let it through
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
