"""How a search picks and stops trials: the Optuna searcher, the scheduler and the stoppers.

* Searcher: :class:`BestEpochOptunaSearch` (Ray's ``OptunaSearch`` with a seeded, multivariate
  ``TPESampler``; several objectives make it multi-objective: ``metric=[...], mode=[...]``) that
  tells Optuna each trial's best-epoch values rather than its last epoch's, wrapped in a
  ``ConcurrencyLimiter``. Tune saves the searcher (the Optuna study included) in the experiment
  directory, so ``--resume`` continues the same study.
* Scheduler: ``ASHAScheduler(time_attr="epoch")`` on the primary objective, or FIFO.
* Stoppers: ``trainables.stoppers.FloorStopper`` (SCORE's floor rule) and a plateau ``RuleStopper``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from .ranking import best_values
from .space import ObjectiveSpec, SearchSpace


class BestEpochOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that reports each finished trial's values at its best epoch (by the primary
    objective) instead of its last reported epoch; everything else is Ray's ``OptunaSearch``.

    The remembered rows are part of the searcher's pickled state, so they survive a resume.
    """

    def __init__(self, *args: Any, objectives: list[Any], **kwargs: Any):
        self._objectives = [(o.metric, o.mode) for o in objectives]
        self._rows: dict[str, list[dict[str, float]]] = {}
        super().__init__(*args, **kwargs)

    def _remember(self, trial_id: str, result: dict | None) -> None:
        if result:
            row = {m: result[m] for m, _ in self._objectives if m in result}
            row["epoch"] = result.get("epoch", result.get("training_iteration", 0))
            rows = self._rows.setdefault(trial_id, [])
            if all(r["epoch"] != row["epoch"] for r in rows):
                rows.append(row)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._remember(trial_id, result)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._remember(trial_id, result)
        rows = self._rows.pop(trial_id, [])
        if result and not error:
            best = best_values(rows, [ObjectiveSpec(metric=m, mode=mode) for m, mode in self._objectives])
            result = {**result, **{m: best[f"best_{m}"] for m, _ in self._objectives if f"best_{m}" in best}}
        super().on_trial_complete(trial_id, result, error)


def build_sampler(space: SearchSpace):
    """The space's Optuna sampler: seeded TPE (multivariate; constant liar when trials overlap),
    random, or grid over the ``choice`` params."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = space.sampler
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=space.seed)
    if s.type == "grid":
        return optuna.samplers.GridSampler({n: list(p.choice or []) for n, p in space.params.items()},
                                           seed=space.seed)
    n_startup = s.n_startup_trials or max(2, min(10, space.total_samples // 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=space.seed, multivariate=True, n_startup_trials=n_startup,
                                          constant_liar=space.max_concurrent > 1)


def build_searcher(space: SearchSpace):
    """``ConcurrencyLimiter(BestEpochOptunaSearch(...), max_concurrent)``."""
    from ray.tune.search import ConcurrencyLimiter

    objs = space.objective
    metric = [o.metric for o in objs] if space.multi_objective else objs[0].metric
    mode = [o.mode for o in objs] if space.multi_objective else objs[0].mode
    searcher = BestEpochOptunaSearch(
        space={n: p.optuna_distribution() for n, p in space.params.items()},
        metric=metric, mode=mode, sampler=build_sampler(space),
        points_to_evaluate=[dict(p) for p in space.points_to_evaluate] or None,
        objectives=list(objs),
    )
    return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)


def build_scheduler(space: SearchSpace):
    """ASHA on ``epoch`` (the primary objective; ``max_t`` defaults to the largest epoch budget), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = space.scheduler
    if s.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", metric=space.primary.metric, mode=space.primary.mode,
                         max_t=s.max_t or space.max_epochs(), grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def build_stoppers(space: SearchSpace, floor: float | None) -> list[Any]:
    """The Tune stoppers of the space (each has ``reasons[trial_id]``)."""
    out: list[Any] = []
    if space.stoppers.floor is not None and floor is not None:
        from trainables.stoppers import FloorStopper

        f = space.stoppers.floor
        out.append(FloorStopper(floor=floor, patience=f.patience, metric=f.metric))
    if space.stoppers.plateau is not None:
        from trainables.stoppers import RuleStopper

        from ..stopping import PlateauRule

        p = space.stoppers.plateau
        out.append(RuleStopper(functools.partial(PlateauRule, p.metric, p.mode, p.patience, p.min_delta)))
    return out


def combined_stopper(stoppers: list[Any]):
    """One Tune stopper of several (None for none)."""
    if not stoppers:
        return None
    if len(stoppers) == 1:
        return stoppers[0]
    from ray.tune.stopper import CombinedStopper

    return CombinedStopper(*stoppers)
