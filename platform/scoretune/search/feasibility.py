"""Constraints after the search: which trials are feasible.

A trial is feasible when every ``constraints:`` entry of the space holds for its metrics at its best
epoch (the values the searcher gave Optuna's constrained TPE). :func:`mark_feasibility` sets
``TrialSummary.feasible`` and tags each trial's MLflow run ``scoretune.feasible`` (``true``, or
``false: <why>``); the summary then ranks feasible trials first, picks the best trial and the Pareto
front among them, and ``promote`` refuses an infeasible trial unless ``--allow-infeasible``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..tracking import tags


def metric_at(cl: Any, run_id: str, metric: str, epoch: float | None) -> float | None:
    """``metric`` of a run at step ``epoch`` (None: not logged there)."""
    hist = cl.get_metric_history(run_id, metric)
    if epoch is not None:
        at = [m for m in hist if int(m.step) == int(epoch)]
        if at:
            return float(at[-1].value)
    return None


def check(constraints: Sequence[Any], values: dict[str, float | None]) -> tuple[bool, str]:
    """(feasible, why): every constraint's violation <= 0."""
    bad = [f"{c.metric} {'-' if values.get(c.metric) is None else f'{values[c.metric]:.4g}'} (needs {c.describe()})"
           for c in constraints if c.violation(values.get(c.metric)) > 0]
    return (not bad), "; ".join(bad)


def mark_feasibility(cl: Any, trials: Sequence[Any], space: Any, out: Callable[[str], None] = print) -> int:
    """Set ``t.feasible`` and the runs' ``scoretune.feasible`` tags; returns the number of infeasible trials."""
    if not space.constraints:
        return 0
    n_bad = 0
    for t in trials:
        if t.status == "failed" or t.run_id is None:
            continue
        epoch = t.best.get("best_epoch")
        values = {c.metric: metric_at(cl, t.run_id, c.metric, epoch) for c in space.constraints}
        ok, why = check(space.constraints, values)
        t.feasible = ok
        n_bad += not ok
        cl.set_tag(t.run_id, tags.FEASIBLE, "true" if ok else f"false: {why}"[:5000])
    rated = sum(t.feasible is not None for t in trials)
    out(f"constraints ({'; '.join(c.describe() for c in space.constraints)}): {rated - n_bad} of {rated} trials "
        f"feasible" + ("; the best trial and the Pareto front are chosen among them" if n_bad else ""))
    return n_bad


def feasible_first(trials: list[Any]) -> list[Any]:
    """Stable reorder: feasible (or unconstrained) trials before infeasible ones."""
    return [t for t in trials if t.feasible is not False] + [t for t in trials if t.feasible is False]
