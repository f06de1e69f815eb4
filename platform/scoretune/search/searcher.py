"""How a search picks and stops trials: the Optuna searcher, the scheduler and the stoppers.

* Searcher: :class:`BestEpochOptunaSearch` (Ray's ``OptunaSearch`` with a seeded, multivariate
  ``TPESampler``; several objectives make it multi-objective: ``metric=[...], mode=[...]``) that
  tells Optuna each trial's best-epoch values rather than its last epoch's, wrapped in a
  ``ConcurrencyLimiter``. The study lives in an RDB storage (:mod:`.study_storage`; one study per
  search name, what ``scoretune dashboard`` shows); Tune also saves the searcher in the experiment
  directory, so ``--resume`` continues the same study. A warm start (:mod:`.warm_start`) adds an
  earlier search's finished trials to the study before it samples; each ``constraints`` entry is set
  on the trial (Optuna 5's ``Trial.set_constraint``, <= 0 feasible) before it is told, so the TPE
  sampler's constrained mode and ``study.best_trial`` / ``best_trials`` use them.
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

    With an RDB study the database runs ahead of that pickle (Tune saves the searcher every few
    seconds; a kill lands in between), so :meth:`restore` reconciles the two:

    * a trial the database already finished that Tune still runs (it completed after the last save;
      Tune restarts it from its checkpoint) is not reported or told again (Optuna would refuse:
      ``UpdateFinishedTrialError``);
    * a trial the killed attempt asked for that Tune never saved (RUNNING in the database, in no
      Tune trial) is handed, params and all, to the next trial Tune asks for, so the study holds no
      trial stuck RUNNING and the resumed search runs what the killed one had sampled; one left
      over when the search ends is failed by :func:`abandon_running`.
    """

    def __init__(self, *args: Any, objectives: list[Any], constraints: list[Any] = (),
                 warm_trials: list[Any] = (), **kwargs: Any):
        self._objectives = [(o.metric, o.mode) for o in objectives]
        self._constraints = list(constraints)
        self._warm_trials = list(warm_trials)
        self._rows: dict[str, list[dict[str, float]]] = {}
        self._told_before: set[str] = set()  # Tune trial ids the database finished before the last save
        self._orphans: list[int] = []  # Optuna trial ids asked by a killed attempt, in no Tune trial
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: Any) -> None:
        super()._setup_study(mode)
        for t in self._warm_trials:  # before the first ask: TPE's start-up counts them
            self._ot_study.add_trial(t)
        self._warm_trials = []

    def _remember(self, trial_id: str, result: dict | None) -> None:
        if result:
            watched = [m for m, _ in self._objectives] + [c.metric for c in self._constraints]
            row = {m: result[m] for m in watched if m in result}
            row["epoch"] = result.get("epoch", result.get("training_iteration", 0))
            rows = self._rows.setdefault(trial_id, [])
            if all(r["epoch"] != row["epoch"] for r in rows):
                rows.append(row)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.__dict__.setdefault("_told_before", set())
        self.__dict__.setdefault("_orphans", [])
        self._reconcile()

    def _reconcile(self) -> None:
        """Match the restored searcher with its RDB study (see the class docstring)."""
        import optuna
        from optuna.trial import TrialState

        if isinstance(getattr(self._ot_study, "_storage", None), optuna.storages.InMemoryStorage):
            return  # the pickle is the study
        frozen = {t._trial_id: t for t in self._ot_study.get_trials(deepcopy=False)}
        mapped = {t._trial_id for t in self._ot_trials.values()}
        self._told_before |= {tid for tid, t in self._ot_trials.items()
                              if tid not in self._completed_trials and t._trial_id in frozen
                              and frozen[t._trial_id].state.is_finished()}
        storage = self._ot_study._storage
        for t in sorted(frozen.values(), key=lambda t: t.number):
            if t.state != TrialState.RUNNING or t._trial_id in mapped or t._trial_id in self._orphans:
                continue
            if set(t.params) == set(self._space):
                self._orphans.append(t._trial_id)
            else:  # killed while its params were being sampled: nothing to hand on
                storage.set_trial_user_attr(t._trial_id, ABANDONED_ATTR, "killed while it was being sampled")
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials and self._orphans and not callable(self._space):
            import optuna

            self._ot_trials[trial_id] = optuna.Trial(self._ot_study, self._orphans.pop(0))
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._remember(trial_id, result)
        if trial_id not in self._told_before:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._remember(trial_id, result)
        rows = self._rows.pop(trial_id, [])
        if trial_id in self._told_before:  # the database has its values from before the kill
            self._told_before.discard(trial_id)
            self._completed_trials.add(trial_id)
            return
        if result and not error:
            best = best_values(rows, [ObjectiveSpec(metric=m, mode=mode) for m, mode in self._objectives])
            result = {**result, **{m: best[f"best_{m}"] for m, _ in self._objectives if f"best_{m}" in best}}
            if self._constraints and trial_id in self._ot_trials:
                at = next((r for r in rows if r.get("epoch") == best.get("best_epoch")), result)
                values = {c.metric: _num(at.get(c.metric)) for c in self._constraints}
                ot_trial = self._ot_trials[trial_id]
                ot_trial.set_user_attr(CONSTRAINT_ATTR, values)
                for key, v in constraint_values(self._constraints, values).items():
                    ot_trial.set_constraint(key, v)
        super().on_trial_complete(trial_id, result, error)


def single_writer_storage(storage: Any):
    """``storage`` (an ``RDBStorage``) behind :class:`SingleWriterStorage`; anything else as it is."""
    import optuna

    if isinstance(storage, optuna.storages.RDBStorage):
        return SingleWriterStorage(storage)
    return storage


def _single_writer_class():
    from optuna.storages import _CachedStorage

    class _SingleWriterStorage(_CachedStorage):
        """Optuna's RDB cache for a study with one writer: the search driver.

        Optuna's own cache (``_CachedStorage``) reads every unfinished trial back from the database on
        every read, because another process may have changed it; TPE reads the study 3-4 times per
        suggestion, so with 32 trials running each ``ask`` re-read ~100 trials with their params, attrs and
        intermediate values (benchmarks/driver_scale.py: 59 ms CPU per suggestion at 300 trials on SQLite,
        against 5 ms in memory). Here nothing but this searcher writes the study's trials (Tune's trials
        never talk to Optuna; the dashboard only reads; ``--resume`` unpickles a fresh cache, see
        ``__setstate__``), so after one full read the study is served from memory: every write still goes
        to the database first (the dashboard sees it at once) and is then applied to the cached trial; a
        trial that finishes is read back once, so the cache holds exactly what the database holds.
        """

        def __init__(self, backend: Any) -> None:
            super().__init__(backend)
            self._loaded: set[int] = set()

        _CACHE = ("_studies", "_trial_id_to_study_id_and_number", "_study_id_and_number_to_trial_id", "_loaded")

        def __getstate__(self) -> dict[str, Any]:
            # Tune snapshots the searcher every few seconds: not the cache, which grows with the study (a
            # restored one reads the database again anyway)
            return {k: v for k, v in super().__getstate__().items() if k not in self._CACHE}

        def __setstate__(self, state: dict[str, Any]) -> None:
            super().__setstate__(state)  # a restored searcher: the database may be ahead, read it again
            self._studies, self._trial_id_to_study_id_and_number = {}, {}
            self._study_id_and_number_to_trial_id, self._loaded = {}, set()

        def _read_trials_from_remote_storage(self, study_id: int) -> None:
            if study_id not in self._loaded:
                super()._read_trials_from_remote_storage(study_id)
                with self._lock:
                    self._loaded.add(study_id)

        def _cached(self, trial_id: int):
            where = self._trial_id_to_study_id_and_number.get(trial_id)
            return None if where is None else self._studies[where[0]].trials.get(where[1])

        def get_trial(self, trial_id: int):
            with self._lock:
                t = self._cached(trial_id)
            return t if t is not None else self._backend.get_trial(trial_id)

        def _merge(self, trial_id: int, **fields: dict[Any, Any]) -> None:
            """Add the entries of each of ``fields`` (params, user_attrs, ...) to the cached trial, at once,
            once the database has them."""
            with self._lock:
                t = self._cached(trial_id)
                if t is not None:
                    for field, entries in fields.items():
                        setattr(t, field, {**getattr(t, field), **entries})

        def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                            distribution: Any) -> None:
            super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
            self._merge(trial_id, params={param_name: distribution.to_external_repr(param_value_internal)},
                        distributions={param_name: distribution})

        def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
            super().set_trial_intermediate_value(trial_id, step, intermediate_value)
            self._merge(trial_id, intermediate_values={step: intermediate_value})

        def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
            super().set_trial_user_attr(trial_id, key, value)
            self._merge(trial_id, user_attrs={key: value})

        def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
            super().set_trial_system_attr(trial_id, key, value)
            self._merge(trial_id, system_attrs={key: value})

        def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
            changed = super().set_trial_state_values(trial_id, state, values)
            with self._lock:
                where = self._trial_id_to_study_id_and_number.get(trial_id)
            if where is not None:  # state, values and times exactly as the database has them
                fresh = self._backend.get_trial(trial_id)
                with self._lock:
                    self._studies[where[0]].trials[where[1]] = fresh
            return changed

    _SingleWriterStorage.__name__ = _SingleWriterStorage.__qualname__ = "SingleWriterStorage"
    _SingleWriterStorage.__module__ = __name__
    return _SingleWriterStorage


SingleWriterStorage = _single_writer_class()  # module-level, so the pickled searcher finds it by name


CONSTRAINT_ATTR = "scoretune.constraint_metrics"  # user attr: the constraint metrics at the best epoch
ABANDONED_ATTR = "scoretune.abandoned"  # user attr: why a trial was failed without running


def abandon_running(storage: Any, study_name: str) -> int:
    """Fail the trials of ``study_name`` still RUNNING once its search has ended (asked by an attempt
    that was killed, never run): the dashboard shows no trial stuck running. Returns how many."""
    from optuna.trial import TrialState

    sid = storage.get_study_id_from_name(study_name)
    stuck = storage.get_all_trials(sid, deepcopy=False, states=(TrialState.RUNNING,))
    for t in stuck:
        storage.set_trial_user_attr(t._trial_id, ABANDONED_ATTR, "asked by a killed search attempt, never run")
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(stuck)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def constraint_values(constraints: list[Any], metrics: dict[str, float | None]) -> dict[str, float]:
    """Optuna constraint name (``val_clean_acc >= 0.8``) -> value, <= 0 when satisfied."""
    return {c.describe(): c.violation(metrics.get(c.metric)) for c in constraints}


def n_startup_trials(space: SearchSpace) -> int:
    """TPE's random start-up: ``sampler.n_startup_trials``, else trials/3 between 2 and 10."""
    return space.sampler.n_startup_trials or max(2, min(10, space.total_samples // 3))


def build_sampler(space: SearchSpace):
    """The space's Optuna sampler: seeded TPE (multivariate; constant liar when trials overlap;
    constrained by the trials' constraint values when the space has ``constraints``), random, or grid
    over the ``choice`` params."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = space.sampler
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=space.seed)
    if s.type == "grid":
        return optuna.samplers.GridSampler({n: list(p.choice or []) for n, p in space.params.items()},
                                           seed=space.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=space.seed, multivariate=True, n_startup_trials=n_startup_trials(space),
                                          constant_liar=space.max_concurrent > 1)


def build_searcher(space: SearchSpace, *, storage: Any = None, study_name: str | None = None,
                   warm_trials: list[Any] = ()):
    """``ConcurrencyLimiter(BestEpochOptunaSearch(...), max_concurrent)``; the study ``study_name`` in
    ``storage`` (an ``optuna.storages.BaseStorage``; None: in memory), started from ``warm_trials``
    (``optuna.trial.FrozenTrial`` s, see :mod:`.warm_start`)."""
    from ray.tune.search import ConcurrencyLimiter

    objs = space.objective
    metric = [o.metric for o in objs] if space.multi_objective else objs[0].metric
    mode = [o.mode for o in objs] if space.multi_objective else objs[0].mode
    searcher = BestEpochOptunaSearch(
        space=optuna_space(space),
        metric=metric, mode=mode, sampler=build_sampler(space),
        points_to_evaluate=[dict(p) for p in space.points_to_evaluate if not _ran(p, warm_trials)] or None,
        objectives=list(objs), constraints=list(space.constraints), warm_trials=list(warm_trials),
        storage=single_writer_storage(storage), study_name=study_name,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)


def _ran(point: dict[str, Any], trials: Any) -> bool:
    """``point`` is one of the (warm-start) ``trials``' params: no need to evaluate it again."""
    return any(t.params == dict(point) for t in trials)


def optuna_space(space: SearchSpace) -> dict[str, Any]:
    """Searched name -> Optuna distribution."""
    return {n: p.optuna_distribution() for n, p in space.params.items()}


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
        out.append(FloorStopper(floor=floor, patience=f.patience, metric=f.metric, refine=f.refine))
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
