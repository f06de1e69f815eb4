"""The search's Optuna study: where it lives, its sampler, warm start, constraints and importance.

Where it lives: an RDB storage, one study per search name.

* ``study_storage:`` in the space (any SQLAlchemy URL Optuna accepts, e.g. the cluster's
  ``postgresql://user@db-host/optuna``) wins;
* else, for a local MLflow store, a SQLite file beside it: ``sqlite:///DIR/mlflow.db`` ->
  ``sqlite:///DIR/optuna.db``; ``file:///DIR/mlruns`` -> ``sqlite:///DIR/optuna.db``;
* else, for an MLflow store in PostgreSQL (``postgresql://...``), the same database with Optuna's
  tables in their own schema ``optuna`` (``?options=-csearch_path=optuna``; created on first use):
  MLflow and Optuna both keep an ``alembic_version`` table, so they cannot share a schema;
* else (a tracking server, whose database the client does not see) ``optuna.db`` in the local Ray
  ``storage_path``; on a cluster give the server's PostgreSQL as ``study_storage`` (its own database or
  a URL with ``options=-csearch_path=optuna``). With a tracking server *and* remote Ray storage
  (``s3://``) and no ``study_storage`` there is no place for it: the study stays in memory (and in
  Ray's searcher checkpoint) as before, and the driver says so in one line.

``scoretune dashboard`` opens the same URL (:func:`study_storage_url`).

The study is named after the search (``--name``), so ``--resume`` (Ray restores the pickled searcher,
whose study points at the same URL) and the dashboard find it; a fresh search refuses a study of its
name that is already there (delete it or pick another name).

After the search, :func:`mark_feasibility` rates each trial against the constraints at its best epoch.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import parse_qs, quote, unquote, urlparse

from ..errors import UserError
from ..tracking import file_lock, tags
from ..tracking.runs import SEARCH_STAGE, child_runs, find_parent_runs, search_by_tags
from .space import SearchSpace

STUDY_FILE = "optuna.db"
SCHEMA = "optuna"


class StudyStorageError(UserError):
    """The Optuna study storage cannot be opened or already holds a study of this name."""


def study_storage_url(tracking_uri: str, storage_path: str, explicit: str | None = None) -> str | None:
    """The Optuna storage URL of a search (see the module docstring); None: no place for one."""
    if explicit:
        return explicit
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        db = Path(unquote(tracking_uri[len("sqlite:///"):]))
        return f"sqlite:///{db.parent / STUDY_FILE}"
    if parsed.scheme == "file":
        return f"sqlite:///{Path(unquote(parsed.path)).parent / STUDY_FILE}"
    if parsed.scheme.startswith("postgresql"):
        sep = "&" if parsed.query else "?"
        return f"{tracking_uri}{sep}options={quote(f'-csearch_path={SCHEMA}')}"
    if "://" not in storage_path:
        return f"sqlite:///{Path(storage_path).expanduser().absolute() / STUDY_FILE}"
    return None


def no_storage_note(tracking_uri: str, storage_path: str) -> str:
    return (f"note: the Optuna study is kept in memory and in Ray's searcher checkpoint only (the search logs to "
            f"{tracking_uri} and keeps Ray results in {storage_path}); set study_storage: (e.g. "
            "postgresql://user@db-host/mlflow?options=-csearch_path%3Doptuna) in the space to watch it with "
            "scoretune dashboard")


def open_storage(url: str):
    """An ``optuna.storages.RDBStorage`` for ``url`` (the SQLite folder is created); one line on failure."""
    import optuna

    sqlite = url.startswith("sqlite:///")
    lock = Path(unquote(url[len("sqlite:///"):]) + ".lock") if sqlite else None
    try:
        for attempt in range(3):
            try:
                with file_lock(lock):  # two searches sharing a storage_path start at once: one creates the tables
                    _create_schema(url)
                    return optuna.storages.RDBStorage(url, heartbeat_interval=None,
                                                      engine_kwargs={"connect_args": {"timeout": 30}} if sqlite else None)
            except Exception as e:  # another client (host) created the tables in between: they are there now
                if attempt == 2 or not any(k in f"{type(e).__name__} {e}" for k in ("IntegrityError", "already exists")):
                    raise
                time.sleep(0.5 * (attempt + 1))
    except Exception as e:  # bad URL, missing driver, unreachable server
        raise StudyStorageError(f"study_storage: cannot open {url}: {type(e).__name__}: {str(e).splitlines()[0][:200]} "
                                "(check the URL, or leave study_storage out for a SQLite file beside the MLflow store)") from None


def _create_schema(url: str) -> None:
    """``CREATE SCHEMA IF NOT EXISTS`` for a PostgreSQL URL whose ``options`` set a ``search_path``."""
    parsed = urlparse(url)
    if not parsed.scheme.startswith("postgresql"):
        return
    opts = " ".join(parse_qs(parsed.query).get("options", []))
    schema = next((o.split("=", 1)[1] for o in opts.split() if o.startswith("-csearch_path=")), None)
    if not schema or not schema.isidentifier():
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    finally:
        engine.dispose()


def study_exists(storage, name: str) -> bool:
    return any(s.study_name == name for s in storage.get_all_studies())


def refuse_existing(storage, url: str, name: str) -> None:
    """A fresh search must not append to another search's study of the same name. A study left by a start
    that never ran a trial (only warm-start trials, or none) is deleted and started again."""
    if study_exists(storage, name):
        import optuna

        sid = storage.get_study_id_from_name(name)
        own = [t for t in storage.get_all_trials(sid, deepcopy=False) if "scoretune.warm_start_run" not in t.user_attrs]
        if not own:
            optuna.delete_study(study_name=name, storage=storage)
            return
        raise StudyStorageError(f"--name: an Optuna study '{name}' already exists in {url} (from an earlier search "
                                f"whose Ray folder is gone); pass --name {name}-2, or delete it with `optuna delete-study "
                                f"--study-name {name} --storage {url}`")


# ----------------------------------------------------------------------------- parameter importance (PED-ANOVA)
METHOD = "PED-ANOVA"


def param_importances(study: Any, objectives: Sequence[Any], *, feasible_only: bool = False) -> dict[str, dict[str, float]]:
    """Objective metric -> {param: importance} (largest first); {} when there are too few trials."""
    import optuna

    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if feasible_only:
        trials = [t for t in trials if all(c <= 0 for c in t.constraints.values())]
    if len(trials) < 3:
        return {}
    out: dict[str, dict[str, float]] = {}
    quantile = min(0.5, max(0.1, 3 / len(trials)))
    ev = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
    view = _TrialsView(study, trials)
    for i, o in enumerate(objectives):
        sign = -1.0 if o.mode == "max" else 1.0  # PED-ANOVA ranks params by how they reach *low* targets

        def target(t: Any, i: int = i, sign: float = sign) -> float:
            return sign * float(t.values[i])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                imp = optuna.importance.get_param_importances(view, evaluator=ev, target=target, normalize=True)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue
        out[o.metric] = {k: float(v) for k, v in sorted(imp.items(), key=lambda kv: -kv[1]) if math.isfinite(v)}
    return out


class _TrialsView:
    """A read-only stand-in for a study that shows only ``trials`` (what ``get_param_importances`` reads)."""

    def __init__(self, study: Any, trials: list[Any]):
        self._study = study
        self._trials = trials

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[Any]:
        return [t for t in self._trials if states is None or t.state in states]

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[Any]:
        return self.get_trials(deepcopy, states)

    @property
    def trials(self) -> list[Any]:
        return list(self._trials)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def importance_metrics(imp: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``importance.<metric>.<param>`` -> value (the parent run's metrics)."""
    return {f"importance.{m}.{p}": v for m, d in imp.items() for p, v in d.items()}


def format_importance(imp: Mapping[str, Mapping[str, float]]) -> str:
    """The lines printed under the summary table (empty without importances)."""
    if not imp:
        return ""
    lines = [f"parameter importance ({METHOD}: what separates the top trials from the rest; sums to 1):"]
    for m, d in imp.items():
        lines.append(f"  {m}: " + ", ".join(f"{p} {v:.2f}" for p, v in d.items()))
    return "\n".join(lines)


def importance_figure(imp: Mapping[str, Mapping[str, float]]):
    """One horizontal bar chart per objective (matplotlib Figure, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n = max(1, len(imp))
    fig = Figure(figsize=(6, 1.2 + 0.45 * max(len(d) for d in imp.values()) * n))
    for k, (m, d) in enumerate(imp.items()):
        ax = fig.add_subplot(n, 1, k + 1)
        names = list(d)[::-1]
        ax.barh(names, [d[p] for p in names], color="#3b75af")
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"importance for {m} ({METHOD})")
    fig.tight_layout()
    return fig




# ----------------------------------------------------------------------------- warm start: an earlier search's trials
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
        runs = search_by_tags(cl, [exp.experiment_id], {tags.KIND: "search"}, max_results=100)
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
        for run in child_runs(cl, parent, SEARCH_STAGE):  # a confirmation's runs repeat its configurations
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
            metrics = {c.metric: _metric_or_last(cl, run, c.metric, best_epoch) for c in space.constraints}
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


def _metric_or_last(cl: Any, run: Any, metric: str, epoch: float | None) -> float | None:
    """``metric`` of ``run`` at step ``epoch`` (the trial's best epoch), else its last value."""
    v = metric_at(cl, run.info.run_id, metric, epoch)
    if v is None:
        v = run.data.metrics.get(metric)
    return float(v) if v is not None else None


def warm_start_trials(cl: Any, space: SearchSpace, out: Callable[[str], None] = print) -> WarmStart | None:
    """The space's warm start (None without one), with its one line printed."""
    if space.warm_start is None:
        return None
    ws = collect(cl, space, space.warm_start.from_, max_trials=space.warm_start.max_trials)
    out(ws.line())
    return ws


CONSTRAINT_ATTR = "scoretune.constraint_metrics"  # user attr: the constraint metrics at the best epoch
ABANDONED_ATTR = "scoretune.abandoned"  # user attr: why a trial was failed without running


def abandon_running(storage: Any, study_name: str) -> int:
    """Fail the trials of ``study_name`` still RUNNING once its search has ended (asked by an attempt
    that was killed, never run): the dashboard shows no trial stuck running. Returns how many."""
    from optuna.trial import TrialState

    sid = storage.get_study_id_from_name(study_name)
    stuck = storage.get_all_trials(sid, deepcopy=False, states=(TrialState.RUNNING,))
    for t in stuck:
        tid = storage.get_trial_id_from_study_id_trial_number(sid, t.number)
        storage.set_trial_user_attr(tid, ABANDONED_ATTR, "asked by a killed search attempt, never run")
        storage.set_trial_state_values(tid, TrialState.FAIL)
    return len(stuck)


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


def optuna_space(space: SearchSpace) -> dict[str, Any]:
    """Searched name -> Optuna distribution."""
    return {n: p.optuna_distribution() for n, p in space.params.items()}


# ----------------------------------------------------------------------------- constraints after the search
def metric_at(cl: Any, run_id: str, metric: str, epoch: float | None) -> float | None:
    """``metric`` of a run at step ``epoch`` (None: no epoch, or not logged there)."""
    if epoch is None:
        return None
    at = [m for m in cl.get_metric_history(run_id, metric) if int(m.step) == int(epoch)]
    return float(at[-1].value) if at else None


def check(constraints: Sequence[Any], values: dict[str, float | None]) -> tuple[bool, str]:
    """(feasible, why): every constraint's violation <= 0."""
    bad = [f"{c.metric} {'-' if values.get(c.metric) is None else f'{values[c.metric]:.4g}'} (needs {c.describe()})"
           for c in constraints if c.violation(values.get(c.metric)) > 0]
    return (not bad), "; ".join(bad)


def mark_feasibility(cl: Any, trials: Sequence[Any], constraints: Sequence[Any],
                     out: Callable[[str], None] = print) -> int:
    """Set ``t.feasible`` and the runs' ``scoretune.feasible`` tags; returns the number of infeasible trials."""
    if not constraints:
        return 0
    n_bad = 0
    for t in trials:
        if t.status == "failed" or t.run_id is None:
            continue
        epoch = t.best.get("best_epoch")
        values = {c.metric: metric_at(cl, t.run_id, c.metric, epoch) for c in constraints}
        ok, why = check(constraints, values)
        t.feasible = ok
        n_bad += not ok
        cl.set_tag(t.run_id, tags.FEASIBLE, "true" if ok else f"false: {why}"[:5000])
    rated = sum(t.feasible is not None for t in trials)
    out(f"constraints ({'; '.join(c.describe() for c in constraints)}): {rated - n_bad} of {rated} trials "
        f"feasible" + ("; the best trial and the Pareto front are chosen among them" if n_bad else ""))
    return n_bad


def feasible_first(trials: list[Any]) -> list[Any]:
    """Stable reorder: feasible (or unconstrained) trials before infeasible ones."""
    return [t for t in trials if t.feasible is not False] + [t for t in trials if t.feasible is False]
