"""Running a search: a Ray Tune ``Tuner`` with Optuna behind a concurrency limit, ASHA on ``epoch``,
SCORE's floor stopper, driver-side MLflow logging and live progress lines.

    space = load_space("search_spaces/quickstart.yaml")
    summary = run_search(space)                      # or run_search(space, resume=True)

* Searcher: :class:`BestEpochOptunaSearch` (Ray's ``OptunaSearch`` with a seeded, multivariate
  ``TPESampler``; several objectives make it multi-objective: ``metric=[...], mode=[...]``) that
  tells Optuna each trial's best-epoch values rather than its last epoch's, wrapped in a
  ``ConcurrencyLimiter``. Tune saves the searcher (the Optuna study included) in the experiment
  directory, so ``--resume`` continues the same study.
* Scheduler: ``ASHAScheduler(time_attr="epoch")`` on the primary objective, or FIFO.
* Stoppers: ``trainables.stoppers.FloorStopper`` (floor rule) and a plateau ``RuleStopper``.
* Trials: :func:`trainables.tune_trainable.scoretune_trial`. A failing trial (NaN loss, OOM, a bad
  value) is marked failed with its error and the search goes on.
* Resume: ``Tuner.restore(path, resume_unfinished=True, restart_errored=True)``; the MLflow parent run
  and the child runs are found again by their tags, so nothing is logged twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from .errors import UserError
from .search_space import ObjectiveSpec, SearchSpace
from .search_tracking import (
    EARLY,
    MlflowSearchCallback,
    SearchSummary,
    best_values,
    better,
    classify_trial,
    experiment_id_for,
    finalize_search,
    format_table,
    point_label,
    result_metrics,
    start_parent_run,
    trial_error_message,
)

STATE_FILE = "scoretune_search.json"
"""Written into the Ray experiment directory: the resolved space, tracking URI, parent run id, floor."""


def trial_name(trial: Any) -> str:
    """Trial (and trial directory) names: ``trial_<id>`` (short, and the id is what MLflow tags carry)."""
    return f"trial_{trial.trial_id}"


# ----------------------------------------------------------------------------- searcher


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
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = space.sampler
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=space.seed)
    if s.type == "grid":
        return optuna.samplers.GridSampler({n: list(p.choice or []) for n, p in space.params.items()},
                                           seed=space.seed)
    n_startup = s.n_startup_trials or max(2, min(10, space.total_samples // 3))
    import warnings

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
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = space.scheduler
    if s.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", metric=space.primary.metric, mode=space.primary.mode,
                         max_t=s.max_t or space.max_epochs(), grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def build_stoppers(space: SearchSpace, floor: float | None) -> list[Any]:
    """The Tune stoppers of the space (each has ``reasons[trial_id]``)."""
    import functools

    out: list[Any] = []
    if space.stoppers.floor is not None and floor is not None:
        from trainables.stoppers import FloorStopper

        f = space.stoppers.floor
        out.append(FloorStopper(floor=floor, patience=f.patience, metric=f.metric))
    if space.stoppers.plateau is not None:
        from trainables.stoppers import RuleStopper

        from .stopping import PlateauRule

        p = space.stoppers.plateau
        out.append(RuleStopper(functools.partial(PlateauRule, p.metric, p.mode, p.patience, p.min_delta)))
    return out


def combined_stopper(stoppers: list[Any]):
    if not stoppers:
        return None
    if len(stoppers) == 1:
        return stoppers[0]
    from ray.tune.stopper import CombinedStopper

    return CombinedStopper(*stoppers)


def resolve_floor(space: SearchSpace, out: Callable[[str], None] = print) -> float | None:
    """The floor (C^l1)^2/2 of the floor stopper: the given value, or estimated (Corollary 1 of Pang et al.
    2022) from the exact toy posterior or from a proxy checkpoint's posterior."""
    f = space.stoppers.floor
    if f is None:
        return None
    if f.value is not None:
        return float(f.value)
    import torch

    from .bounds import estimate_C, madry_floor
    from .data import load_dataset, to_float, toy_posterior

    base = space.base_config()
    if f.proxy_checkpoint is None:
        if base.data.name != "toy":
            raise UserError("stoppers.floor.estimate needs toy data or stoppers.floor.proxy_checkpoint")
        ds = load_dataset("toy", val_size=base.data.val_size, seed=base.seed, **base.data.options)
        xs = to_float(ds.train.x[: f.samples]).double()
        c = estimate_C(toy_posterior, xs, base.attack.eps, base.attack.norm, "l1", grid=401, keep_values=False)
        source = f"toy: exact posterior, exact (grid) inner max, mean over {xs.shape[0]} samples"
    else:
        from .engine import model_from_checkpoint

        net, _ = model_from_checkpoint(f.proxy_checkpoint)
        ds = load_dataset(base.data.name, root=base.data.root, val_size=base.data.val_size, seed=base.seed,
                          **base.data.options)
        split = ds.val if len(ds.val) else ds.train
        xs = to_float(split.x[: f.samples])
        gen = torch.Generator().manual_seed(space.seed)
        c = estimate_C(net, xs, base.attack.eps, base.attack.norm, "l1", restarts=2, steps=20,
                       pixel_range=ds.info.pixel_range, logits=True, generator=gen, keep_values=False)
        source = f"proxy {f.proxy_checkpoint}"
    floor = madry_floor(c)
    out(f"floor (C^l1)^2/2 = {floor:.4g} (C^l1 = {c}, {source})")
    return floor


# ----------------------------------------------------------------------------- trials


def pin_paths(base: dict[str, Any]) -> dict[str, Any]:
    """Trials run in their own working directory: make the base's data paths absolute."""
    import copy

    base = copy.deepcopy(base)
    data = base.setdefault("data", {})
    root = data.get("root") or os.environ.get("SCORETUNE_DATA")
    if root and "://" not in root:
        data["root"] = str(Path(root).expanduser().absolute())
    if data.get("ddpm_path") and "://" not in data["ddpm_path"]:
        data["ddpm_path"] = str(Path(data["ddpm_path"]).expanduser().absolute())
    return base


def trial_settings(space: SearchSpace, *, name: str, ray_path: str) -> dict[str, Any]:
    """The constant part of every trial's config (see :mod:`trainables.tune_trainable`)."""
    return {
        "search": name, "base": pin_paths(space.base), "targets": space.targets,
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


# ----------------------------------------------------------------------------- live progress


class ProgressCallback(Callback):
    """One line per event: a trial starts, a new best appears, a trial ends (with the running counts)."""

    def __init__(self, space: SearchSpace, stoppers: list[Any], out: Callable[[str], None] = print):
        self.space = space
        self.stoppers = stoppers
        self.out = out
        self.status: dict[str, str] = {}
        self.last_epoch: dict[str, float] = {}
        self.best: tuple[float, str, int] | None = None

    def get_state(self) -> dict[str, Any]:
        return {"status": self.status, "last_epoch": self.last_epoch, "best": self.best}

    def set_state(self, state: dict[str, Any]) -> None:
        self.status = dict(state.get("status") or {})
        self.last_epoch = dict(state.get("last_epoch") or {})
        self.best = state.get("best")

    def _say(self, text: str) -> None:
        self.out(f"[{time.strftime('%H:%M:%S')}] {text}")

    def _counts(self, trials: list) -> str:
        current = {t.trial_id for t in trials}
        vals = [v for k, v in self.status.items() if k in current]
        running = vals.count("running")
        early = sum(vals.count(s) for s in EARLY) + vals.count("stopped_early")
        return (f"running {running}, completed {vals.count('completed')}, stopped early {early}, "
                f"failed {vals.count('failed')} of {self.space.total_samples}")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from trainables.tune_trainable import sampled_point

        self.status[trial.trial_id] = "running"
        self._say(f"start         {trial.trial_id}  {point_label(sampled_point(trial.config))}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        m = result_metrics(result)
        p = self.space.primary
        epoch = int(m.get("epoch", 0))
        self.last_epoch[trial.trial_id] = epoch
        v = m.get(p.metric)
        if v is not None and (self.best is None or better(v, self.best[0], p.mode)):
            self.best = (float(v), trial.trial_id, epoch)
            self._say(f"best          {trial.trial_id}  {p.metric}={v:.4f} at epoch {epoch}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from trainables.tune_trainable import sampled_point

        budget = self.space.epoch_budget(sampled_point(trial.config))
        last = self.last_epoch.get(trial.trial_id, (trial.last_result or {}).get("epoch", 0))
        status, reason = classify_trial(trial.trial_id, last, budget, self.stoppers, self.space.scheduler.type)
        self.status[trial.trial_id] = status
        self._say(f"{status:<13} {trial.trial_id}  after epoch {int(last or 0)}/{budget}"
                  + ("" if status == "completed" else f": {reason}") + f"  | {self._counts(trials)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.status[trial.trial_id] = "failed"
        self._say(f"failed        {trial.trial_id}  {trial_error_message(trial)}  | {self._counts(trials)}")
        self.out(f"           traceback: {trial.path}/error.txt")


# ----------------------------------------------------------------------------- the driver


def ensure_ray(address: str | None, out: Callable[[str], None] = print) -> None:
    """Connect to ``address`` (a cluster: 'auto', host:port, ray://...), or start a local Ray; a Ray
    already initialised in this process is used as is."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    try:
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    except ConnectionError as e:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {e} (start it with `ray start --head`, "
                        "or leave --address out to run locally)") from None
    res = ray.cluster_resources()
    out(f"Ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")


@contextlib.contextmanager
def _quiet_tune():
    """Our progress lines replace Tune's: its status tables, per-failure tracebacks (the failed line
    names the error; the traceback stays in the trial's error.txt) and snapshot warnings are muted."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    names = ("ray.tune.execution.tune_controller", "ray.tune.tune", "ray.tune.execution.experiment_state")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _read_state(ray_path: str) -> dict[str, Any]:
    """The search's own state file in the Ray experiment directory (local path or storage URI)."""
    if "://" in ray_path:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(f"{ray_path}/{STATE_FILE}")
        try:
            with fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            raise UserError(f"{ray_path} is not a scoretune search (no {STATE_FILE}); start it without --resume") from None
    p = Path(ray_path) / STATE_FILE
    if not p.is_file():
        raise UserError(f"{ray_path} is not a scoretune search (no {STATE_FILE}); start it without --resume")
    return json.loads(p.read_text())


def _write_state(ray_path: str, state: dict[str, Any]) -> None:
    text = json.dumps(state, indent=1)
    if "://" in ray_path:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(f"{ray_path}/{STATE_FILE}")
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
        return
    p = Path(ray_path)
    p.mkdir(parents=True, exist_ok=True)
    tmp = p / (STATE_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p / STATE_FILE)


def _interrupted(results: Any) -> bool:
    """True when the Tuner returned before every trial ended (Ctrl-C)."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []
    return any(t.status not in ("TERMINATED", "ERROR") for t in trials)


def run_search(space: SearchSpace, *, name: str | None = None, resume: bool = False, tracking_uri: str | None = None,
               address: str | None = None, space_text: str | None = None,
               out: Callable[[str], None] = print) -> SearchSummary | None:
    """Run (or with ``resume`` continue) the search; returns its summary (None when interrupted).

    The Ray experiment lives at ``space.storage_path/NAME``; a fresh search refuses to overwrite an
    existing one (resume it, or pick another ``name``).
    """
    from ray import tune

    from .tracking import client, resolve_tracking_uri

    name = name or space.name
    storage = space.storage_path if "://" in space.storage_path else str(Path(space.storage_path).absolute())
    ray_path = f"{storage}/{name}"
    if resume:
        if not tune.Tuner.can_restore(ray_path):
            raise UserError(f"nothing to resume: no search '{name}' in {storage} (run it without --resume first)")
        state = _read_state(ray_path)
        space = SearchSpace.model_validate(state["space"])
        uri = state["tracking_uri"]
        if tracking_uri and resolve_tracking_uri(tracking_uri) != uri:
            raise UserError(f"search '{name}' logs to {uri}; resume it there (drop --tracking-uri or pass that URI)")
        parent_run_id = state["parent_run_id"]
        ensure_ray(address, out)
        out(f"resuming search '{name}' from {ray_path} (its saved space is used)")
        client(uri).update_run(parent_run_id, status="RUNNING")
        tuner = tune.Tuner.restore(ray_path, trainable=trainable_for(space), resume_unfinished=True,
                                   restart_errored=True)
    else:
        if tune.Tuner.can_restore(ray_path):
            raise UserError(f"search '{name}' already exists in {ray_path}: add --resume to continue it, pass "
                            f"--name {name}-2 to start another, or delete that folder")
        uri = resolve_tracking_uri(tracking_uri or space.tracking_uri)
        floor = resolve_floor(space, out)
        ensure_ray(address, out)
        parent = start_parent_run(space, name=name, ray_path=ray_path, tracking_uri=uri, space_text=space_text)
        parent_run_id = parent.run_id
        _write_state(ray_path, {"space": space.model_dump(by_alias=True, exclude_none=True), "tracking_uri": uri,
                                "parent_run_id": parent_run_id, "floor": floor, "name": name})
        tuner = build_tuner(space, name=name, storage=storage, ray_path=ray_path, tracking_uri=uri,
                            parent_run_id=parent_run_id, floor=floor, out=out)
    out(f"MLflow: {uri}  experiment '{space.experiment_name}'  parent run {parent_run_id}")
    out(f"Ray results: {ray_path}")
    with _quiet_tune():
        results = tuner.fit()
    if _interrupted(results):
        client(uri).set_terminated(parent_run_id, status="KILLED")
        out(f"search '{name}' interrupted; continue it with --resume")
        return None
    return finalize_search(space, results, name=name, tracking_uri=uri, parent_run_id=parent_run_id,
                           ray_path=ray_path, out=out)


def build_tuner(space: SearchSpace, *, name: str, storage: str, ray_path: str, tracking_uri: str,
                parent_run_id: str, floor: float | None, out: Callable[[str], None] = print):
    """The ``Tuner`` of a fresh search (searcher, scheduler, stoppers, MLflow + progress callbacks)."""
    from ray import tune

    stoppers = build_stoppers(space, floor)
    mlflow_cb = MlflowSearchCallback(space, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                                     experiment_id=experiment_id_for(tracking_uri, space.experiment_name),
                                     stoppers=stoppers, floor=floor)
    p = space.primary
    run_config = tune.RunConfig(
        name=name, storage_path=storage, stop=combined_stopper(stoppers),
        callbacks=[mlflow_cb, ProgressCallback(space, stoppers, out)],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=space.keep_checkpoints, checkpoint_score_attribute=p.metric,
                                                checkpoint_score_order=p.mode),
        failure_config=tune.FailureConfig(max_failures=0), verbose=0,
    )
    tune_config = tune.TuneConfig(
        search_alg=build_searcher(space), scheduler=build_scheduler(space), num_samples=space.total_samples,
        reuse_actors=True, trial_name_creator=trial_name, trial_dirname_creator=trial_name,
    )
    from trainables.tune_trainable import SETTINGS_KEY

    return tune.Tuner(trainable_for(space), param_space={SETTINGS_KEY: trial_settings(space, name=name, ray_path=ray_path)},
                      tune_config=tune_config, run_config=run_config)


def format_report(summary: SearchSummary, space: SearchSpace) -> str:
    """The end-of-search report: the table, the Pareto front, where things are."""
    space = summary.space or space
    lines = ["", format_table(summary, list(space.params))]
    counts = summary.counts()
    lines.append("")
    lines.append(", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    best = summary.best
    if best is not None:
        v = best.value(space.primary.metric)
        lines.append(f"best trial {best.trial_id}: {space.primary.metric}={v:.4f} ({point_label(best.point)}); "
                     f"MLflow run {best.run_id}" + (f"; model {best.model_uri}" if best.model_uri else ""))
    if space.multi_objective:
        lines.append(f"Pareto front ({len(summary.pareto)} trials, marked *): "
                     + ", ".join(t.trial_id for t in summary.pareto))
    lines.append(f"MLflow: {summary.tracking_uri}  experiment {summary.experiment_id}  parent run "
                 f"{summary.parent_run_id}")
    lines.append(f"Ray results: {summary.ray_path}")
    lines.append(f"next: scoretune promote --search {summary.name}   |   scoretune ui")
    return "\n".join(lines)
