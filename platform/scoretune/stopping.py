"""Early-stopping rules, framework-free: each sees one metrics row per epoch and says stop or go.

* :class:`FloorRule` -- SCORE's floor rule. Corollary 1 of Pang et al. (ICML 2022) gives
  R_Madry^KL >= (C^l1)^2 / 2 for a self-consistent model (:func:`scoretune.bounds.madry_floor`);
  a robust training cross-entropy (the engine's ``train_r_madry``: CE at the CE-PGD maximiser on a
  fixed subsample of the training split, R_Madry^KL with one-hot p_d) that stays below that floor is
  fitting the training set more tightly than the data allow: robust overfitting. The rule stops
  after ``patience`` consecutive epochs below the floor. With ``refine`` (a :class:`FloorRefiner`)
  the floor is refined during training from the best model so far (see there).
* :class:`PlateauRule` -- stop when a validation metric has not improved for ``patience`` epochs
  (the early stopping of Rice et al., 2020, on PGD accuracy).

Every rule has ``should_stop(row: dict) -> bool``, a ``kind`` and a ``reason`` string (empty until it
stops); once a rule has stopped it keeps answering True, and :meth:`stop` says why as a :class:`Stop`. :func:`build_stopper` turns the ``early_stop``
section of an experiment config into a rule (or None). Ray Tune adapters live in
``trainables/stoppers.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol

__all__ = ["Rule", "Stop", "FloorRule", "FloorRefiner", "PlateauRule", "build_stopper"]


@dataclass(frozen=True)
class Stop:
    """Why a rule stopped a run: the rule's ``kind`` (``floor``, ``plateau``), its one-line ``reason``, the
    ``epoch``, the watched ``metric`` and its ``value`` then, and (floor rule) the ``floor`` in force."""

    kind: str
    reason: str
    epoch: int | None = None
    metric: str | None = None
    value: float | None = None
    floor: float | None = None


class Rule(Protocol):
    kind: str
    reason: str

    def should_stop(self, row: Mapping[str, Any]) -> bool: ...

    def stop(self, row: Mapping[str, Any]) -> Stop | None: ...


def _stop(rule: Any, row: Mapping[str, Any], floor: float | None = None) -> Stop | None:
    """The :class:`Stop` of a rule that has stopped (``row``: the row it stopped on), else None."""
    if rule.stopped_epoch is None:
        return None
    value = _value(row, rule.metric) if isinstance(row, Mapping) else None
    return Stop(rule.kind, rule.reason, rule.stopped_epoch, rule.metric, value, floor)


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


class FloorRefiner:
    """The floor refined from the best model so far: ``min(floor, (C^l1)^2/2)`` with C^l1 measured on
    the model of best ``by`` (validation PGD accuracy) seen so far.

    C^l1 is a property of the data, estimated off the toy with a model standing in for p_d; a short
    proxy training is less robust than the models being trained, so its C^l1 is too large (the README's
    "Refining the floor"). The refiner reads the engine's ``val_c_l1`` (``early_stop.refine``: C^l1 of the
    current model on a fixed validation subsample), keeps the value of the row with the best ``by`` and
    never raises the floor above the starting one. One refiner may be shared by the rules of many
    trials (a search: the best trial so far refines everyone's floor).
    """

    def __init__(self, floor: float, by: str = "val_pgd_acc", c_metric: str = "val_c_l1"):
        self.base = float(floor)
        self.floor = self.base
        self.by, self.c_metric = by, c_metric
        self.best: float | None = None
        self.c_l1: float | None = None
        self.epoch: int | None = None

    def observe(self, row: Mapping[str, Any], epoch: int | None = None) -> float:
        """Take in one epoch's row; the floor now in force."""
        score, c = _value(row, self.by), _value(row, self.c_metric)
        if score is not None and c is not None and c >= 0 and (self.best is None or score > self.best):
            self.best, self.c_l1 = score, c
            self.epoch = _epoch_of(row, epoch, 0)
            self.floor = min(self.base, c * c / 2.0)  # bounds.madry_floor (Corollary 1)
        return self.floor

    def describe(self) -> str:
        if self.c_l1 is None:
            return f"(C^l1)^2/2={self.floor:.4g}"
        return (f"(C^l1)^2/2={self.floor:.4g} (C^l1 {self.c_l1:.4g} of the model of best {self.by} "
                f"{self.best:.4g}, epoch {self.epoch}; started at {self.base:.4g})")


class FloorRule:
    """Stop when ``metric`` has been strictly below ``floor`` for ``patience`` consecutive epochs.

    ``floor`` is (C^l1)^2 / 2 (Corollary 1; ``scoretune bound`` prints it). A value at or above the
    floor resets the count. Rows without a finite ``metric`` are ignored (they neither count nor
    reset). ``refine``: True (a :class:`FloorRefiner` of its own) or a refiner shared with other
    rules: each row first refines the floor, then is compared with it. Attributes:
    ``first_below_epoch`` (the first epoch ever below the floor), ``streak_start_epoch`` (where the
    current run below began), ``below_count``, ``stopped_epoch``, ``stopped_floor`` and ``reason``.
    """

    kind = "floor"

    def __init__(self, floor: float, patience: int = 2, metric: str = "train_r_madry",
                 refine: "bool | FloorRefiner" = False):
        floor = float(floor)
        if not math.isfinite(floor) or floor < 0:
            raise ValueError(f"floor must be a finite number >= 0 (the value (C^l1)^2/2 from `scoretune bound`), "
                             f"got {floor}")
        if int(patience) < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {patience}")
        self.patience = int(patience)
        self.metric = metric
        self.refiner = refine if isinstance(refine, FloorRefiner) else FloorRefiner(floor) if refine else None
        self._floor = floor
        self.stopped_floor: float | None = None
        self.first_below_epoch: int | None = None
        self.streak_start_epoch: int | None = None
        self.below_count = 0
        self.stopped_epoch: int | None = None
        self.reason = ""
        self._seen = 0

    @property
    def stopped(self) -> bool:
        return self.stopped_epoch is not None

    @property
    def floor(self) -> float:
        """The floor in force (the refined one with ``refine``)."""
        return self.refiner.floor if self.refiner is not None else self._floor

    def update(self, row_or_value: Mapping[str, Any] | float, epoch: int | None = None) -> bool:
        """Feed one epoch (a metrics row, or the metric's value); True means stop."""
        if self.stopped:
            return True
        self._seen += 1
        if self.refiner is not None and isinstance(row_or_value, Mapping):
            self.refiner.observe(row_or_value, epoch)
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
            self.stopped_floor = self.floor
            where = self.refiner.describe() if self.refiner is not None else f"(C^l1)^2/2={self.floor:.4g}"
            self.reason = (f"floor: {self.metric} below {where} for {self.below_count} "
                           f"epochs since epoch {self.streak_start_epoch}")
            return True
        return False

    def should_stop(self, row: Mapping[str, Any]) -> bool:
        return self.update(row)

    def stop(self, row: Mapping[str, Any]) -> Stop | None:
        return _stop(self, row, self.stopped_floor)

    def __repr__(self) -> str:
        return (f"FloorRule(floor={self._floor!r}, patience={self.patience}, metric={self.metric!r}"
                f"{', refine=True' if self.refiner is not None else ''})")


class PlateauRule:
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    ``mode='max'`` (accuracies) or ``'min'`` (losses). The default watches validation PGD accuracy,
    the early stopping of Rice et al. (2020) against robust overfitting. Attributes: ``best``,
    ``best_epoch``, ``bad_epochs``, ``stopped_epoch``, ``reason``.
    """

    kind = "plateau"

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

    def stop(self, row: Mapping[str, Any]) -> Stop | None:
        return _stop(self, row)

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

    ``rule: none`` -> None; ``rule: floor`` -> ``FloorRule(floor, patience, metric, refine)`` (``floor`` a
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
        return FloorRule(float(floor), 2 if patience is None else int(patience), metric, bool(get("refine", False)))
    raise ValueError(f"unknown early_stop.rule {rule!r}; choose one of: none, floor")
