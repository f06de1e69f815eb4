"""Early-stopping rules, framework-free: each sees one metrics row per epoch and says stop or go.

* :class:`FloorRule` -- SCORE's floor rule. Corollary 1 of Pang et al. (ICML 2022) gives
  R_Madry^KL >= (C^l1)^2 / 2 for a self-consistent model (:func:`scoretune.bounds.madry_floor`);
  a robust training cross-entropy (the engine's ``train_r_madry``: CE at the CE-PGD maximiser on a
  fixed subsample of the training split, R_Madry^KL with one-hot p_d) that stays below that floor is
  fitting the training set more tightly than the data allow: robust overfitting. The rule stops
  after ``patience`` consecutive epochs below the floor.
* :class:`PlateauRule` -- stop when a validation metric has not improved for ``patience`` epochs
  (the early stopping of Rice et al., 2020, on PGD accuracy).

Every rule has ``should_stop(row: dict) -> bool`` and a ``reason`` string (empty until it stops);
once a rule has stopped it keeps answering True. :func:`build_stopper` turns the ``early_stop``
section of an experiment config into a rule (or None). Ray Tune adapters live in
``trainables/stoppers.py``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Protocol

__all__ = ["Rule", "FloorRule", "PlateauRule", "build_stopper"]


class Rule(Protocol):
    reason: str

    def should_stop(self, row: Mapping[str, Any]) -> bool: ...


def _value(row_or_value: Mapping[str, Any] | float, metric: str) -> float | None:
    """The metric's value in a row (None when the row does not carry a finite one)."""
    if isinstance(row_or_value, Mapping):
        v = row_or_value.get(metric)
    else:
        v = row_or_value
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _epoch_of(row_or_value: Mapping[str, Any] | float, epoch: int | None, seen: int) -> int:
    """The row's epoch: the explicit argument, else the row's ``epoch`` (or Tune's
    ``training_iteration``), else a 1-based count of the rows seen."""
    if epoch is not None:
        return int(epoch)
    if isinstance(row_or_value, Mapping):
        for key in ("epoch", "training_iteration"):
            v = row_or_value.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                return int(v)
    return seen


class FloorRule:
    """Stop when ``metric`` has been strictly below ``floor`` for ``patience`` consecutive epochs.

    ``floor`` is (C^l1)^2 / 2 (Corollary 1; ``scoretune bound`` prints it). A value at or above the
    floor resets the count. Rows without a finite ``metric`` are ignored (they neither count nor
    reset). Attributes: ``first_below_epoch`` (the first epoch ever below the floor),
    ``streak_start_epoch`` (where the current run below began), ``below_count``, ``stopped_epoch``
    and ``reason``.
    """

    def __init__(self, floor: float, patience: int = 2, metric: str = "train_r_madry"):
        floor = float(floor)
        if not math.isfinite(floor) or floor < 0:
            raise ValueError(f"floor must be a finite number >= 0 (the value (C^l1)^2/2 from `scoretune bound`), "
                             f"got {floor}")
        if int(patience) < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {patience}")
        self.floor = floor
        self.patience = int(patience)
        self.metric = metric
        self.first_below_epoch: int | None = None
        self.streak_start_epoch: int | None = None
        self.below_count = 0
        self.stopped_epoch: int | None = None
        self.reason = ""
        self._seen = 0

    @property
    def stopped(self) -> bool:
        return self.stopped_epoch is not None

    def update(self, row_or_value: Mapping[str, Any] | float, epoch: int | None = None) -> bool:
        """Feed one epoch (a metrics row, or the metric's value); True means stop."""
        if self.stopped:
            return True
        self._seen += 1
        value = _value(row_or_value, self.metric)
        if value is None:
            return False
        ep = _epoch_of(row_or_value, epoch, self._seen)
        if value < self.floor:
            if self.below_count == 0:
                self.streak_start_epoch = ep
            if self.first_below_epoch is None:
                self.first_below_epoch = ep
            self.below_count += 1
        else:
            self.below_count = 0
            self.streak_start_epoch = None
        if self.below_count >= self.patience:
            self.stopped_epoch = ep
            self.reason = (f"floor: {self.metric} below (C^l1)^2/2={self.floor:.4g} for {self.below_count} "
                           f"epochs since epoch {self.streak_start_epoch}")
            return True
        return False

    def should_stop(self, row: Mapping[str, Any]) -> bool:
        return self.update(row)

    def __repr__(self) -> str:
        return f"FloorRule(floor={self.floor!r}, patience={self.patience}, metric={self.metric!r})"


class PlateauRule:
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    ``mode='max'`` (accuracies) or ``'min'`` (losses). The default watches validation PGD accuracy,
    the early stopping of Rice et al. (2020) against robust overfitting. Attributes: ``best``,
    ``best_epoch``, ``bad_epochs``, ``stopped_epoch``, ``reason``.
    """

    def __init__(self, metric: str = "val_pgd_acc", mode: str = "max", patience: int = 5, min_delta: float = 0.0):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if int(patience) < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.metric = metric
        self.mode = mode
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.stopped_epoch: int | None = None
        self.reason = ""
        self._seen = 0

    @property
    def stopped(self) -> bool:
        return self.stopped_epoch is not None

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def update(self, row_or_value: Mapping[str, Any] | float, epoch: int | None = None) -> bool:
        if self.stopped:
            return True
        self._seen += 1
        value = _value(row_or_value, self.metric)
        if value is None:
            return False
        ep = _epoch_of(row_or_value, epoch, self._seen)
        if self._improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, ep, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            self.stopped_epoch = ep
            self.reason = (f"plateau: {self.metric} has not improved on {self.best:.4g} (epoch {self.best_epoch}) "
                           f"for {self.bad_epochs} epochs")
            return True
        return False

    def should_stop(self, row: Mapping[str, Any]) -> bool:
        return self.update(row)

    def __repr__(self) -> str:
        return (f"PlateauRule(metric={self.metric!r}, mode={self.mode!r}, patience={self.patience}, "
                f"min_delta={self.min_delta!r})")


def replay_history(stopper: Any, history: Iterable[Mapping[str, Any]]) -> str:
    """Feed a resumed run's finished epochs to the early-stopping rule (None: no rule); its reason if it
    already stopped in one of them ("" otherwise). Every driver calls this before training on."""
    if stopper is None:
        return ""
    for row in history:
        if stopper.should_stop(row):
            return stopper.reason or "early_stopped"
    return ""


def build_stopper(early_stop: Any) -> Rule | None:
    """The rule for an ``early_stop`` config section (pydantic ``EarlyStopConfig``, a dict or None).

    ``rule: none`` -> None; ``rule: floor`` -> ``FloorRule(floor, patience, metric)`` (``floor`` a
    number: ``auto`` is resolved before training by :func:`scoretune.floor_estimate.resolve_auto`).
    """
    if early_stop is None:
        return None
    get = early_stop.get if isinstance(early_stop, Mapping) else (lambda k, d=None: getattr(early_stop, k, d))
    rule = get("rule", "none") or "none"
    if rule == "none":
        return None
    if rule == "floor":
        floor = get("floor", None)
        if floor is None:
            raise ValueError("early_stop.rule 'floor' needs early_stop.floor = (C^l1)^2/2 or 'auto' "
                             "(run `scoretune bound` to get it, or pass --floor)")
        if floor == "auto":
            raise ValueError("early_stop.floor: 'auto' must be estimated before the rule is built "
                             "(scoretune.floor_estimate.resolve_auto; `scoretune train` does it)")
        patience = get("patience", 2)
        metric = get("metric", None) or "train_r_madry"
        return FloorRule(float(floor), 2 if patience is None else int(patience), metric)
    raise ValueError(f"unknown early_stop.rule {rule!r}; choose one of: none, floor")
