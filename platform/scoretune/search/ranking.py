"""Comparing trials: better/best-epoch values, Pareto dominance and front, and how a trial ended.

Pure functions (no Ray, no MLflow): the searcher, the callbacks and the summary all rank with these.

How a trial ended (:func:`classify_trial`): a stopper's ``reasons`` holds it -> stopped_floor /
stopped_plateau; it reached its epoch budget -> completed; otherwise (terminated early by the
scheduler) -> stopped_asha.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

STATUSES = ("completed", "stopped_asha", "stopped_floor", "stopped_plateau", "failed")
EARLY = ("stopped_asha", "stopped_floor", "stopped_plateau")


def better(a: float, b: float, mode: str) -> bool:
    """True when ``a`` is strictly better than ``b`` under ``mode`` ('max' or 'min')."""
    return a > b if mode == "max" else a < b


def finite(v: Any) -> bool:
    """A real, finite number (not a bool, not NaN/inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def best_row(rows: Iterable[Mapping[str, Any]], metric: str, mode: str) -> Mapping[str, Any] | None:
    """The first row with the best finite ``metric`` (the trial's best epoch), or None."""
    best = None
    for row in rows:
        v = row.get(metric)
        if finite(v) and (best is None or better(float(v), float(best[metric]), mode)):
            best = row
    return best


def best_values(rows: Iterable[Mapping[str, Any]], objectives: Sequence[Any]) -> dict[str, float]:
    """``best_<metric>`` for every objective, read at the best epoch of the primary objective,
    plus ``best_epoch``; empty when no row has the primary metric."""
    rows = list(rows)
    primary = objectives[0]
    row = best_row(rows, primary.metric, primary.mode)
    if row is None:
        return {}
    out = {f"best_{o.metric}": float(row[o.metric]) for o in objectives if finite(row.get(o.metric))}
    if finite(row.get("epoch")):
        out["best_epoch"] = float(row["epoch"])
    return out


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """``a`` Pareto-dominates ``b``: at least as good in every objective, strictly better in one."""
    at_least = all(x >= y if m == "max" else x <= y for x, y, m in zip(a, b, modes))
    strictly = any(better(x, y, m) for x, y, m in zip(a, b, modes))
    return at_least and strictly


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (the Pareto front), in input order."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, modes) for j, q in enumerate(points) if j != i)]


def classify_trial(trial_id: str, last_epoch: float | None, budget: int, stoppers: Sequence[Any],
                   scheduler: str) -> tuple[str, str]:
    """(status, reason) of a trial that ended without an error."""
    for st in stoppers:
        reason = getattr(st, "reasons", {}).get(trial_id)
        if reason:
            kind = "stopped_floor" if reason.startswith("floor") else (
                "stopped_plateau" if reason.startswith("plateau") else "stopped_early")
            return kind, reason
    epochs = int(last_epoch or 0)
    if epochs >= budget:
        return "completed", f"reached the epoch budget ({budget})"
    if scheduler == "asha":
        return "stopped_asha", f"ASHA stopped it after epoch {epochs} of {budget} (below the rung cutoff)"
    return "stopped_early", f"ended after epoch {epochs} of {budget}"
