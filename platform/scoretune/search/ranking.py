"""Comparing trials: better/best-epoch values, Pareto dominance and front, and how a trial ended.

Pure functions (no Ray, no MLflow): the searcher, the callbacks and the summary all rank with these.

How a trial ended (:func:`classify_trial`): a stopper's ``reasons`` holds it -> stopped_floor /
stopped_plateau; it reached its epoch budget -> completed; otherwise (terminated early by the
scheduler) -> stopped_asha. Whatever stopped it, a trial that ends at chance accuracy or with an
exploding loss is ``diverged`` (:func:`divergence`). :func:`status_label` is the short form the
MLflow run name starts with (``[asha@3]``, ``[floor@7]``, ``[diverged]``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

STATUSES = ("completed", "stopped_asha", "stopped_floor", "stopped_plateau", "diverged", "failed")
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


LOSS_KEYS = ("train_loss", "train_robust", "train_madry_kl", "train_r_madry")
ACC_KEYS = ("val_clean_acc", "train_clean_acc")
KL_KEYS = ("train_r_madry", "train_madry_kl", "train_attack_ce")  # the robust KL/CE estimate of a row
EXPLODE_FACTOR = 3.0   # a training loss this many times its lowest value (after it was lower) has exploded
CHANCE_MARGIN = 0.05   # clean accuracy within this of 1/num_classes is chance


def divergence(rows: Sequence[Mapping[str, Any]], num_classes: int | None = None) -> str | None:
    """Why a trial's epoch rows show it diverged, or None:

    * a non-finite training loss;
    * the total training loss rose to ``EXPLODE_FACTOR`` times its lowest value;
    * (``num_classes`` known) a last-epoch clean accuracy within ``CHANCE_MARGIN`` of chance
      ``1/num_classes`` together with a robust KL estimate above ``2 ln(num_classes)`` (confidently
      wrong: a near-uniform network has about ``ln(num_classes)``) or a training loss that did not go
      down since the first epoch. A trial that is merely slow (a tiny lr, still near uniform after one
      epoch) is at chance too, but not diverged."""
    rows = sorted(rows, key=lambda r: float(r.get("epoch", 0)))
    if not rows:
        return None
    for r in rows:
        for k in LOSS_KEYS:
            v = r.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                return f"{k} became {v} at epoch {int(r.get('epoch', 0))}"
    last = rows[-1]
    ep = int(last.get("epoch", 0))
    if num_classes and num_classes > 1:
        chance = 1.0 / num_classes
        acc_key = next((k for k in ACC_KEYS if finite(last.get(k))), None)
        if acc_key is not None and float(last[acc_key]) <= chance + CHANCE_MARGIN:
            at = f"{acc_key}={float(last[acc_key]):.3f} at epoch {ep} is chance (1/{num_classes})"
            kl_key = next((k for k in KL_KEYS if finite(last.get(k))), None)
            if kl_key is not None and float(last[kl_key]) > 2.0 * math.log(num_classes):
                return f"{at}, {kl_key}={float(last[kl_key]):.3g}"
            losses = [float(r["train_loss"]) for r in rows if finite(r.get("train_loss"))]
            if len(losses) >= 2 and losses[-1] >= losses[0]:
                return f"{at}, train_loss not falling ({losses[0]:.3g} -> {losses[-1]:.3g})"
    for k in ("train_loss",):  # the robust terms may rise in healthy training; the total should not
        vals = [float(r[k]) for r in rows if finite(r.get(k))]
        if len(vals) >= 2:
            low = min(vals[:-1])
            if low > 0 and vals[-1] >= EXPLODE_FACTOR * low:
                return f"{k} exploded from {low:.3g} to {vals[-1]:.3g} by epoch {ep}"
    return None


_SHORT = {"completed": "done", "stopped_asha": "asha", "stopped_floor": "floor", "stopped_plateau": "plateau",
          "stopped_early": "stopped", "running": "running"}


def status_label(status: str, epoch: int | None = None) -> str:
    """The bracketed status the UI shows first in a trial's run name: ``[done@12]``, ``[asha@3]``,
    ``[floor@7]``, ``[plateau@5]``, ``[diverged]``, ``[failed]``, ``[running]``."""
    if status in ("diverged", "failed", "running") or epoch is None:
        return f"[{_SHORT.get(status, status)}]"
    return f"[{_SHORT.get(status, status)}@{int(epoch)}]"
