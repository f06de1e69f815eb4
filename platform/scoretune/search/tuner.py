"""The Tune side of a search: the searcher over the Optuna study, the scheduler, the stoppers and the
trainable with the settings every trial shares.

* :class:`StudySearcher` is a Tune ``Searcher`` on Optuna's ask-and-tell API. It tells Optuna each
  trial's values at its best epoch (checkpoints are selected there), sets the ``constraints`` on the
  trial before telling it, and starts from the warm-start trials and ``points_to_evaluate``.
* Scheduler: ``ASHAScheduler(time_attr="epoch")`` on the primary objective, or FIFO.
* Stoppers: ``trainables.stoppers.FloorStopper`` (SCORE's floor rule) and a plateau ``RuleStopper``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
from pathlib import Path
from typing import Any, Sequence

from ray.tune.search import ConcurrencyLimiter, Searcher

from ..config import pin_data_paths
from ..tracking import finite
from .report import best_values
from .space import ObjectiveSpec, SearchSpace
from .study import ABANDONED_ATTR, CONSTRAINT_ATTR, build_sampler, constraint_values, optuna_space


class StudySearcher(Searcher):
    """Tune's searcher for one Optuna study, through Optuna's public ask-and-tell API.

    Optuna is told a finished trial's values at its best epoch by the primary objective, not its last
    epoch's. The study lives in ``storage`` (an RDB storage: what ``scoretune dashboard`` shows; None:
    in memory, pickled with the searcher). Tune pickles the searcher (:meth:`save`), so ``--resume``
    goes on with the same study; since the database runs ahead of that pickle (a kill lands between
    saves), :meth:`restore` reconciles the two:

    * a trial the database already finished is not told again when Tune restarts it;
    * a trial the killed attempt asked for and Tune never saved (RUNNING in the database, in no Tune
      trial) is handed to the next trial Tune asks for, so the resumed search runs it.
    """

    def __init__(self, *, distributions: dict[str, Any], objectives: Sequence[Any], sampler: Any,
                 constraints: Sequence[Any] = (), storage: Any = None, study_name: str | None = None,
                 warm_trials: Sequence[Any] = (), points_to_evaluate: Sequence[dict[str, Any]] = ()):
        import optuna

        multi = len(objectives) > 1
        super().__init__(metric=[o.metric for o in objectives] if multi else objectives[0].metric,
                         mode=[o.mode for o in objectives] if multi else objectives[0].mode)
        self._distributions = dict(distributions)
        self._objectives = [(o.metric, o.mode) for o in objectives]
        self._constraints = list(constraints)
        self._storage = storage if storage is not None else optuna.storages.InMemoryStorage()
        self.study = optuna.create_study(
            storage=self._storage, sampler=sampler, study_name=study_name, load_if_exists=True,
            directions=["maximize" if mode == "max" else "minimize" for _, mode in self._objectives])
        if not self.study.trials:
            self.study.add_trials(list(warm_trials))  # before the first ask: TPE's start-up counts them
            for point in points_to_evaluate:
                self.study.enqueue_trial(dict(point))
        self._numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self._rows: dict[str, list[dict[str, float]]] = {}  # Tune trial id -> its watched metrics per epoch
        self._done: set[str] = set()  # Tune trial ids told (or finished in the database before a restore)
        self._orphans: list[int] = []  # Optuna trial numbers a killed attempt asked for, in no Tune trial
        self._live: dict[str, Any] = {}  # Tune trial id -> its optuna.Trial (not pickled: made again on use)

    # --- the study's trials by Tune trial id
    def _trial(self, trial_id: str):
        """The live ``optuna.Trial`` of a Tune trial: the one ``ask`` gave, or (a restored searcher, an
        orphan handed on) one made by number through Optuna's public ``Trial`` constructor."""
        import optuna

        if trial_id not in self._live:
            sid = self._storage.get_study_id_from_name(self.study.study_name)
            self._live[trial_id] = optuna.Trial(self.study, self._storage.get_trial_id_from_study_id_trial_number(
                sid, self._numbers[trial_id]))
        return self._live[trial_id]

    def params_of(self, trial_id: str) -> dict[str, Any]:
        """The params Optuna gave the Tune trial ``trial_id`` (from its live trial: no read of the study)."""
        return dict(self._trial(trial_id).params)

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._numbers:
            if self._orphans:
                self._numbers[trial_id] = self._orphans.pop(0)
            else:
                self._live[trial_id] = self.study.ask(fixed_distributions=self._distributions)
                self._numbers[trial_id] = self._live[trial_id].number
        return self.params_of(trial_id)

    def _remember(self, trial_id: str, result: dict | None) -> None:
        if result:
            watched = [m for m, _ in self._objectives] + [c.metric for c in self._constraints]
            row = {m: result[m] for m in watched if m in result}
            row["epoch"] = result.get("epoch", result.get("training_iteration", 0))
            rows = self._rows.setdefault(trial_id, [])
            if all(r["epoch"] != row["epoch"] for r in rows):
                rows.append(row)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._remember(trial_id, result)
        metric, _ = self._objectives[0]
        if trial_id in self._done or len(self._objectives) > 1 or not finite(result.get(metric)):
            return
        self._trial(trial_id).report(float(result[metric]), int(result.get("training_iteration", 0)))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        self._remember(trial_id, result)
        rows = self._rows.pop(trial_id, [])
        if trial_id in self._done or trial_id not in self._numbers:
            return  # the database has its values from before a kill
        self._done.add(trial_id)
        values = None
        if result and not error:
            best = best_values(rows, [ObjectiveSpec(metric=m, mode=mode) for m, mode in self._objectives])
            values = [best.get(f"best_{m}", result.get(m)) for m, _ in self._objectives]
        if values is None or any(v is None for v in values):  # errored, or stopped before any value
            state, values = (TrialState.FAIL if error else TrialState.PRUNED), None
        elif not all(finite(v) for v in values):  # NaN or inf: Optuna takes no such value
            state, values = TrialState.FAIL, None
        else:
            state, values = TrialState.COMPLETE, [float(v) for v in values]
            if self._constraints:
                at = next((r for r in rows if r.get("epoch") == best.get("best_epoch")), result)
                measured = {c.metric: float(at[c.metric]) if finite(at.get(c.metric)) else None
                            for c in self._constraints}
                trial = self._trial(trial_id)
                trial.set_user_attr(CONSTRAINT_ATTR, measured)
                for key, v in constraint_values(self._constraints, measured).items():
                    trial.set_constraint(key, v)
        try:
            self.study.tell(self._numbers[trial_id], values, state=state)
        except RuntimeError as e:  # the grid sampler stops the study after its last point, which Optuna refuses
            if "Study.stop" not in str(e):  # outside optimize(); the trial is told all the same
                raise
        self._live.pop(trial_id, None)

    # --- Tune's save and restore of the searcher (the experiment folder), and the reconciliation
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({k: v for k, v in self.__dict__.items() if k != "_live"}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        self._live = {}
        self._reconcile()

    def _reconcile(self) -> None:
        """Match the restored searcher with its database (see the class docstring)."""
        import optuna
        from optuna.trial import TrialState

        if isinstance(self._storage, optuna.storages.InMemoryStorage):
            return  # the pickle is the study
        trials = self.study.get_trials(deepcopy=False)
        finished = {t.number for t in trials if t.state.is_finished()}
        self._done |= {tid for tid, n in self._numbers.items() if n in finished}
        mapped = set(self._numbers.values()) | set(self._orphans)
        sid = self._storage.get_study_id_from_name(self.study.study_name)
        for t in trials:
            if t.state != TrialState.RUNNING or t.number in mapped:
                continue
            if set(t.params) == set(self._distributions):
                self._orphans.append(t.number)
            else:  # killed while its params were being sampled: nothing to hand on
                tid = self._storage.get_trial_id_from_study_id_trial_number(sid, t.number)
                self._storage.set_trial_user_attr(tid, ABANDONED_ATTR, "killed while it was being sampled")
                self.study.tell(t.number, state=TrialState.FAIL)


def build_searcher(space: SearchSpace, *, storage: Any = None, study_name: str | None = None,
                   warm_trials: Sequence[Any] = ()) -> ConcurrencyLimiter:
    """``ConcurrencyLimiter(StudySearcher(...), max_concurrent)``; the study ``study_name`` in
    ``storage`` (an ``optuna.storages.BaseStorage``; None: in memory), started from ``warm_trials``
    (``optuna.trial.FrozenTrial`` s, see :mod:`.study`)."""
    searcher = StudySearcher(
        distributions=optuna_space(space), objectives=list(space.objective), sampler=build_sampler(space),
        constraints=list(space.constraints), storage=storage, study_name=study_name, warm_trials=warm_trials,
        points_to_evaluate=[dict(p) for p in space.points_to_evaluate if not _ran(p, warm_trials)])
    return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)


def _ran(point: dict[str, Any], trials: Any) -> bool:
    """``point`` is one of the (warm-start) ``trials``' params: no need to evaluate it again."""
    return any(t.params == dict(point) for t in trials)


def build_trial_scheduler(space: SearchSpace):
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


@contextlib.contextmanager
def quiet_tune():
    """Our progress lines replace Tune's: its status tables, per-failure tracebacks (the failed line
    names the error; the traceback stays in the trial's error.txt) and snapshot warnings are muted, and
    its per-trial result loggers are off (MLflow has every result)."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # MLflow is the search's record: Tune's per-trial JSON/CSV/TensorBoard loggers cost the driver ~7% of
    # its time per result (benchmarks/driver_scale.py); TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0 brings them back
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    names = ("ray.tune.execution.tune_controller", "ray.tune.tune", "ray.tune.execution.experiment_state",
             "ray.tune.analysis.experiment_analysis")  # "no result.json": the loggers are off
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def interrupted(results: Any, path: str, expected: int) -> bool:
    """True when the Tuner at ``path`` returned before its ``expected`` trials all ended (Ctrl-C). The
    ResultGrid alone cannot say: Tune stops the running trials after its last snapshot (they come back
    TERMINATED) and never creates the trials it had not started, so the snapshot is read: an unfinished
    trial there, or fewer than ``expected`` trials, is an interrupted experiment."""
    from .resume import saved_trials

    if results.num_terminated + results.num_errors < len(results):
        return True
    saved = saved_trials(path)
    return len(saved) < expected or any(status not in ("TERMINATED", "ERROR") for status in saved.values())


# ----------------------------------------------------------------------------- the trainable and its shared settings
PREFIX = "trial_"


def trial_name(trial: Any) -> str:
    """Trial (and trial directory) names: ``trial_<id>`` (short, and the id is what MLflow tags carry)."""
    return f"{PREFIX}{trial.trial_id}"


def trial_id_of(result: Any) -> str | None:
    """The trial id of a Tune ``Result``: its reported ``trial_id``, else read off its directory name."""
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    name = Path(str(result.path)).name
    return name[len(PREFIX):] if name.startswith(PREFIX) else None


def trial_settings(space: SearchSpace, *, name: str, ray_path: str) -> dict[str, Any]:
    """The constant part of every trial's config (see :mod:`trainables.tune_trainable`); the base's
    data paths are made absolute (the default root included), as trials run in their own directory."""
    return {
        "search": name, "base": pin_data_paths(space.base), "targets": space.targets,
        "workers": space.resources.workers, "cpus": space.resources.cpus, "gpus": space.resources.gpus,
        "train_storage": f"{ray_path}/train_runs",
    }


def trainable_for(space: SearchSpace):
    """The trial function with its resources: ``cpus``/``gpus`` for an in-process trial; for Ray Train
    trials the Train workers hold the resources and the trial itself takes a sliver of a CPU."""
    from ray import tune

    from trainables.tune_trainable import scoretune_trial

    r = space.resources
    if r.workers > 1:
        return tune.with_resources(scoretune_trial, {"cpu": 0.01})
    res = {"cpu": r.cpus}
    if r.gpus > 0:
        res["gpu"] = r.gpus
    return tune.with_resources(scoretune_trial, res)
