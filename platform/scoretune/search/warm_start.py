"""Warm starts: an earlier search's finished trials as completed trials of a new Optuna study.

``warm_start: {from: NAME, max_trials: N}`` in a space (or ``scoretune search --warm-start NAME``).
``NAME`` is a search name (the newest parent run tagged ``scoretune.search_name`` = NAME) or, when no
search has that name, an MLflow experiment (every search parent run in it). The trials are read from
MLflow only -- their child runs' sampled params and ``best_<objective>`` metrics, the values the
searcher told Optuna (each trial's best epoch) -- so searches from before the study storage existed
work too, and nothing is written to the earlier search's runs.

Skipped, and counted in one line: failed, unfinished or superseded trials, trials without a value,
trials of another space (a different set of searched params) and values outside the new ranges.
With ``max_trials`` the best N (primary objective) are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UserError
from ..tracking import tags
from ..tracking.runs import child_runs, find_parent_runs
from .searcher import CONSTRAINT_ATTR, constraint_values, optuna_space
from .space import SearchSpace

WARM_ATTR = "scoretune.warm_start_run"  # user attr of a warm-started Optuna trial: its MLflow run


class WarmStartError(UserError):
    """The warm-start source does not exist or holds nothing usable."""


@dataclass
class WarmStart:
    """What a warm start found: the Optuna trials to add and where they came from."""

    source: str                    # "search 'quickstart'" / "experiment 'x'"
    parent_run_ids: list[str]
    trials: list[Any] = field(default_factory=list)   # optuna FrozenTrial s
    skipped: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in self.skipped.items() if n)
        return (f"warm start from {self.source}: {len(self.trials)} finished trial(s) added to the Optuna study"
                + (f"; skipped {why}" if why else ""))


def _parents(cl: Any, name: str) -> tuple[str, list[Any]]:
    runs = find_parent_runs(cl, name)
    if runs:
        return f"search '{name}'", runs[:1]
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        flt = f"tags.`{tags.KIND}` = 'search'"
        runs = list(cl.search_runs([exp.experiment_id], filter_string=flt, max_results=100))
        if runs:
            return f"experiment '{name}'", runs
    return "", []


def _value(spec: Any, text: str) -> Any:
    """An MLflow param string back as a value of ``spec`` (None: not one of its values)."""
    if spec.kind == "choice":
        return next((c for c in spec.choice if str(c) == text), None)
    try:
        v = float(text)
    except ValueError:
        return None
    if spec.kind == "int":
        v = int(v) if v == int(v) else v
    return v if spec.contains(v) else None


def collect(cl: Any, space: SearchSpace, source: str, *, max_trials: int | None = None) -> WarmStart:
    """The finished trials of ``source`` that fit ``space`` (see the module docstring)."""
    import optuna

    label, parents = _parents(cl, source)
    if not parents:
        known = sorted({r.data.tags.get(tags.SEARCH, "") for r in find_parent_runs_any(cl)} - {""})
        raise WarmStartError(f"warm_start.from: no search or MLflow experiment called '{source}' in this tracking store"
                             + (f"; known searches: {', '.join(known[:10])}" if known else "; run that search first"))
    ws = WarmStart(source=label, parent_run_ids=[p.info.run_id for p in parents])
    skipped = {"failed or unfinished": 0, "without a value": 0, "from another space": 0,
               "outside the new ranges": 0, "over max_trials": 0}
    names = set(space.params)
    dists = optuna_space(space)
    rows = []
    for parent in parents:
        searched = {k[len("space."):] for k in parent.data.params if k.startswith("space.")}
        for run in child_runs(cl, parent):
            t = run.data.tags
            if t.get(tags.KIND) != "trial":
                continue
            if t.get(tags.STATUS) in (None, "failed", "running") or tags.SUPERSEDED in t or run.info.status != "FINISHED":
                skipped["failed or unfinished"] += 1
                continue
            if searched != names:
                skipped["from another space"] += 1
                continue
            values = [run.data.metrics.get(f"best_{o.metric}") for o in space.objective]
            if any(v is None or not math.isfinite(v) for v in values):
                skipped["without a value"] += 1
                continue
            point = {n: _value(space.params[n], run.data.params.get(n, "")) for n in names}
            if any(v is None for v in point.values()):
                skipped["outside the new ranges"] += 1
                continue
            rows.append((run, point, values))
    p = space.primary
    rows.sort(key=lambda r: -r[2][0] if p.mode == "max" else r[2][0])
    if max_trials is not None and len(rows) > max_trials:
        skipped["over max_trials"] = len(rows) - max_trials
        rows = rows[:max_trials]
    for run, point, values in rows:
        user = {WARM_ATTR: run.info.run_id}
        constraints = None
        if space.constraints:
            best_epoch = run.data.metrics.get("best_epoch")
            metrics = {c.metric: _metric_at(cl, run, c.metric, best_epoch) for c in space.constraints}
            user[CONSTRAINT_ATTR] = metrics
            constraints = constraint_values(space.constraints, metrics)
        kw = {"values": values} if space.multi_objective else {"value": values[0]}
        ws.trials.append(optuna.trial.create_trial(params=point, distributions=dists, user_attrs=user,
                                                   constraints=constraints, **kw))
    ws.skipped = skipped
    return ws


def find_parent_runs_any(cl: Any) -> list[Any]:
    from ..tracking.runs import all_parent_runs

    return all_parent_runs(cl)


def _metric_at(cl: Any, run: Any, metric: str, epoch: float | None) -> float | None:
    """``metric`` of ``run`` at step ``epoch`` (the trial's best epoch), else its last value."""
    if epoch is not None:
        for m in cl.get_metric_history(run.info.run_id, metric):
            if int(m.step) == int(epoch):
                return float(m.value)
    v = run.data.metrics.get(metric)
    return float(v) if v is not None else None


def warm_start_trials(cl: Any, space: SearchSpace, out: Callable[[str], None] = print) -> WarmStart | None:
    """The space's warm start (None without one), with its one line printed."""
    if space.warm_start is None:
        return None
    ws = collect(cl, space, space.warm_start.from_, max_trials=space.warm_start.max_trials)
    out(ws.line())
    return ws
