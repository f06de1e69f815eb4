"""MLflow for a search, written by the search driver only (one writer, so concurrent trials never
race on a SQLite store; a remote ``--tracking-uri`` works the same).

* :func:`start_parent_run` -- one parent run per search (tags ``scoretune.kind=search``,
  ``scoretune.search_name``, ``scoretune.ray_path``; the space YAML as an artifact; the search
  settings as params).
* :class:`MlflowSearchCallback` -- a ``ray.tune.Callback`` that keeps one nested child run per trial
  (tags ``mlflow.parentRunId`` and ``scoretune.trial_id``): params (the trial's flat experiment
  config + the sampled values), per-epoch metrics (the engine's row, ``R_Madry`` = train_madry_kl,
  the ``floor`` value, and ``best_<objective>`` / ``best_epoch``: the values at the trial's best epoch
  by the primary objective), and how the trial ended (tag ``scoretune.status``: completed /
  stopped_asha / stopped_floor / stopped_plateau / failed, with ``scoretune.stop_reason`` or
  ``scoretune.error``). A resumed search finds existing child runs by their trial id tag; a failed
  trial that ``--resume`` restarts gets a new trial id (Tune's restart) and a new child run, and the
  failed attempt's run is kept, tagged ``scoretune.superseded``.
* :func:`finalize_search` -- after the search: log the best checkpoints of the top-k trials as MLflow
  PyTorch models, plot learning curves / objective vs params / Pareto front on the parent run,
  build the results table.

How a trial ended: a stopper's ``reasons`` holds it -> stopped_floor / stopped_plateau; it reached
its epoch budget -> completed; otherwise (terminated early by the scheduler) -> stopped_asha.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ray.tune import Callback

from .search_space import ENGINE_METRICS, SearchSpace
from .tracking import RunLogger, client as mlflow_client, finite_metrics, get_or_create_experiment, tags
from .tracking.runs import child_runs, find_parent_runs

TAG_KIND, TAG_SEARCH, TAG_RAY_PATH, TAG_TRIAL = tags.KIND, tags.SEARCH, tags.RAY_PATH, tags.TRIAL
TAG_STATUS, TAG_REASON, TAG_ERROR = tags.STATUS, tags.REASON, tags.ERROR
TAG_BEST_CKPT, TAG_MODEL_URI, TAG_MODEL_EPOCH = tags.BEST_CKPT, tags.MODEL_URI, tags.MODEL_EPOCH
TAG_PARENT, TAG_SUPERSEDED = tags.PARENT, tags.SUPERSEDED

STATUSES = ("completed", "stopped_asha", "stopped_floor", "stopped_plateau", "failed")
EARLY = ("stopped_asha", "stopped_floor", "stopped_plateau")

_SKIP_KEYS = {
    "training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore", "timestamp",
    "timesteps_total", "timesteps_since_restore", "episodes_total", "iterations_since_restore",
    "pid", "done", "trial_id", "experiment_tag", "should_checkpoint", "selection_score",
}


# ----------------------------------------------------------------------------- pure helpers


def better(a: float, b: float, mode: str) -> bool:
    """True when ``a`` is strictly better than ``b`` under ``mode`` ('max' or 'min')."""
    return a > b if mode == "max" else a < b


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def best_row(rows: Iterable[Mapping[str, Any]], metric: str, mode: str) -> Mapping[str, Any] | None:
    """The first row with the best finite ``metric`` (the trial's best epoch), or None."""
    best = None
    for row in rows:
        v = row.get(metric)
        if _finite(v) and (best is None or better(float(v), float(best[metric]), mode)):
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
    out = {f"best_{o.metric}": float(row[o.metric]) for o in objectives if _finite(row.get(o.metric))}
    if _finite(row.get("epoch")):
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


def trial_error_message(trial: Any) -> str:
    """``ExceptionType: message`` of a failed trial (one line)."""
    err = None
    try:
        err = trial.get_pickled_error()
    except Exception:
        err = None
    cause = getattr(err, "cause", None) or err
    if cause is not None and not type(cause).__name__.startswith(("RayTaskError", "TuneError")):
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        return f"{type(cause).__name__}: {first}"[:500]
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else str(err or "")
    except OSError:
        text = str(err or "")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ":" in ln and not ln.startswith(("File ", "^", "~")):
            return re.sub(r"^(?:\w+\.)+(\w+:)", r"\1", ln)[:500]
    return (lines[-1] if lines else "unknown error")[:500]


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of a Tune result worth logging (the engine's row; Tune's bookkeeping dropped)."""
    return {k: v for k, v in finite_metrics(result).items() if k not in _SKIP_KEYS}


def log_metrics(cl: Any, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Log the finite numeric entries of ``metrics`` at ``step`` in one batch."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, v, ts, int(step)) for k, v in finite_metrics(metrics).items()]
    for i in range(0, len(items), 500):
        cl.log_batch(run_id, metrics=items[i: i + 500])


def point_label(point: Mapping[str, Any]) -> str:
    """``beta=3.21 lr=0.05 loss=se`` (4 significant digits)."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


# ----------------------------------------------------------------------------- parent run


def start_parent_run(space: SearchSpace, *, name: str, ray_path: str, tracking_uri: str | None,
                     space_text: str | None = None) -> RunLogger:
    """Create the search's parent run; returns its logger."""
    logger = RunLogger(tracking_uri, space.experiment_name, run_name=name,
                       tags={TAG_KIND: "search", TAG_SEARCH: name, TAG_RAY_PATH: ray_path})
    logger.log_params(space.summary())
    logger.log_text(space_text or json.dumps(space.model_dump(by_alias=True, exclude_none=True), indent=2),
                    "search_space.yaml")
    logger.log_text(json.dumps(space.model_dump(by_alias=True, exclude_none=True), indent=2),
                    "search_space_resolved.json")
    return logger


# ----------------------------------------------------------------------------- the Tune callback


class MlflowSearchCallback(Callback):
    """Driver-side MLflow logging of every trial of a search (see the module docstring).

    Picklable (Tune stores it with the experiment); the MLflow client is created on first use.
    ``get_state``/``set_state`` keep the per-trial records (run id, epoch rows) in Tune's
    experiment snapshot, so a resumed search goes on where the snapshot left off.
    """

    def __init__(self, space: SearchSpace, *, tracking_uri: str, parent_run_id: str, experiment_id: str,
                 stoppers: Sequence[Any] = (), floor: float | None = None):
        self.space = space
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.stoppers = list(stoppers)
        self.floor = floor
        self.trials: dict[str, dict[str, Any]] = {}
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    def get_state(self) -> dict[str, Any]:
        return {"trials": self.trials}

    def set_state(self, state: dict[str, Any]) -> None:
        self.trials = dict(state.get("trials") or {})
        for rec in self.trials.values():  # MLflow may be ahead of the snapshot: re-read it on first use
            rec["synced"] = False

    # -- records
    def _find_child(self, trial_id: str) -> Any | None:
        flt = f"tags.`{TAG_PARENT}` = '{self.parent_run_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'"
        runs = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=5)
        return runs[0] if runs else None

    def record(self, trial: Any) -> dict[str, Any]:
        """The trial's record (its MLflow child run is found by tag, else created)."""
        tid = trial.trial_id
        rec = self.trials.get(tid)
        if rec is not None and rec.get("run_id") and rec.get("synced", True):
            return rec
        rec = rec or {"rows": [], "logged_epoch": 0, "status": "running"}
        rec["synced"] = True
        from trainables.tune_trainable import sampled_point, trial_experiment

        point = sampled_point(trial.config)
        found = self._find_child(tid)
        if found is not None:
            rec["run_id"] = found.info.run_id
            rec["logged_epoch"] = max(int(rec.get("logged_epoch", 0)), int(found.data.metrics.get("epoch", 0)))
            self.client.update_run(found.info.run_id, status="RUNNING")
        else:
            logger = RunLogger(self.tracking_uri, self.space.experiment_name, parent_run_id=self.parent_run_id,
                               run_name=f"{tid} {point_label(point)}"[:240],
                               tags={TAG_KIND: "trial", TAG_TRIAL: tid, TAG_SEARCH: trial.config.get("scoretune", {}).get("search", ""),
                                     TAG_STATUS: "running"})
            try:
                params = trial_experiment(trial.config, tid).flat()
            except Exception:  # an invalid point: the trial will fail and say why
                params = {}
            params.update(point)
            if self.floor is not None:
                params["search.floor"] = self.floor
            logger.log_params(params)
            rec["run_id"] = logger.run_id
        rec["point"] = point
        rec["budget"] = self.space.epoch_budget(point)
        self.trials[tid] = rec
        return rec

    def _tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v)[:5000])

    # -- Tune hooks
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rec = self.record(trial)
        rec["status"] = "running"
        self._tags(rec["run_id"], {TAG_STATUS: "running"})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        rec = self.record(trial)
        metrics = result_metrics(result)
        epoch = int(metrics.get("epoch", result.get("training_iteration", 0)))
        metrics["epoch"] = float(epoch)
        if epoch not in {int(r["epoch"]) for r in rec["rows"]}:
            rec["rows"].append({k: metrics[k] for k in metrics if k in ENGINE_METRICS or k == "epoch"})
            rec["rows"].sort(key=lambda r: r["epoch"])
        best = best_values(rec["rows"], self.space.objective)
        if epoch > int(rec["logged_epoch"]):
            extra = dict(best)
            if "train_madry_kl" in metrics:
                extra["R_Madry"] = metrics["train_madry_kl"]
            if self.floor is not None:
                extra["floor"] = self.floor
            log_metrics(self.client, rec["run_id"], {**metrics, **extra}, step=epoch)
            rec["logged_epoch"] = epoch
        path = result.get("checkpoint_path")  # Ray Train trials (TuneReportCallback)
        if isinstance(path, str):
            self._checkpoint(rec, epoch, path, best)

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        rec = self.record(trial)
        epoch = int((trial.last_result or {}).get("epoch", 0))
        self._checkpoint(rec, epoch, checkpoint.path, best_values(rec["rows"], self.space.objective))

    def _checkpoint(self, rec: dict[str, Any], epoch: int, path: str, best: Mapping[str, float]) -> None:
        if int(best.get("best_epoch", -1)) == epoch:
            self._tags(rec["run_id"], {TAG_BEST_CKPT: path})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rec = self.record(trial)
        last = max([float(r["epoch"]) for r in rec["rows"]] + [float(rec.get("logged_epoch", 0)),
                    float((trial.last_result or {}).get("epoch", 0) or 0)])
        status, reason = classify_trial(trial.trial_id, last, rec["budget"], self.stoppers, self.space.scheduler.type)
        rec["status"] = status
        self._tags(rec["run_id"], {TAG_STATUS: status, TAG_REASON: reason})
        self.client.set_terminated(rec["run_id"], status="FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rec = self.record(trial)
        rec["status"] = "failed"
        self._tags(rec["run_id"], {TAG_STATUS: "failed", TAG_ERROR: trial_error_message(trial)})
        self.client.set_terminated(rec["run_id"], status="FAILED")


# ----------------------------------------------------------------------------- after the search


@dataclass
class TrialSummary:
    """One row of the results table."""

    trial_id: str
    run_id: str | None
    status: str
    point: dict[str, Any]
    epochs: int
    best: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    model_uri: str | None = None

    def value(self, metric: str) -> float | None:
        v = self.best.get(f"best_{metric}")
        return v if _finite(v) else None


@dataclass
class SearchSummary:
    name: str
    trials: list[TrialSummary]
    pareto: list[TrialSummary]
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    ray_path: str
    objectives: list[Any]
    space: Any = None

    @property
    def best(self) -> TrialSummary | None:
        ranked = [t for t in self.trials if t.value(self.objectives[0].metric) is not None]
        return ranked[0] if ranked else None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.status] = out.get(t.status, 0) + 1
        return out


def rank_trials(trials: list[TrialSummary], objectives: Sequence[Any]) -> list[TrialSummary]:
    """Trials with a value first, best primary objective first; then the others by status."""
    primary = objectives[0]
    with_value = [t for t in trials if t.value(primary.metric) is not None]
    without = [t for t in trials if t.value(primary.metric) is None]
    sign = -1.0 if primary.mode == "max" else 1.0
    with_value.sort(key=lambda t: sign * float(t.value(primary.metric)))  # type: ignore[arg-type]
    return with_value + sorted(without, key=lambda t: t.status)


def front_of(trials: Sequence[TrialSummary], objectives: Sequence[Any]) -> list[TrialSummary]:
    """The Pareto front of the trials that have a value for every objective."""
    cand = [t for t in trials if t.status != "failed" and all(t.value(o.metric) is not None for o in objectives)]
    pts = [[float(t.value(o.metric)) for o in objectives] for t in cand]  # type: ignore[arg-type]
    return [cand[i] for i in pareto_front(pts, [o.mode for o in objectives])]


def _trial_id_of(result: Any) -> str | None:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    name = Path(str(result.path)).name  # trial_<id> (see search.trial_name)
    return name[len("trial_"):] if name.startswith("trial_") else None


def finalize_search(space: SearchSpace, results: Any, *, name: str, tracking_uri: str, parent_run_id: str,
                    ray_path: str, out: Callable[[str], None] = print) -> SearchSummary:
    """Bring MLflow in line with the finished search: terminal status for every trial, orphan child runs
    (trials a killed driver started but the resumed search never knew) deleted, the top-k (single
    objective) or Pareto-front (multi-objective) trials' best checkpoints logged as MLflow models,
    plots and a results table on the parent run. Idempotent: a rerun logs nothing twice."""
    from trainables.tune_trainable import sampled_point

    cl = mlflow_client(tracking_uri)
    parent = cl.get_run(parent_run_id)
    by_trial = {r.data.tags.get(TAG_TRIAL): r for r in child_runs(cl, parent)}
    result_of = {}
    for res in results:
        tid = _trial_id_of(res)
        if tid:
            result_of[tid] = res
    for tid, run in list(by_trial.items()):
        if tid in result_of:
            continue
        by_trial.pop(tid)
        if run.data.tags.get(TAG_STATUS) == "failed":  # an errored trial that --resume restarted under a new id
            cl.set_tag(run.info.run_id, TAG_SUPERSEDED, "true")
            continue
        cl.delete_run(run.info.run_id)
        out(f"deleted orphan MLflow run {run.info.run_id} (trial {tid} was lost when the driver stopped; "
            "the search re-ran its slot)")
    trials: list[TrialSummary] = []
    for tid, res in result_of.items():
        run = by_trial.get(tid)
        tags = run.data.tags if run else {}
        status = tags.get(TAG_STATUS, "failed" if res.error else "completed")
        if run is not None and status == "running":  # ended without a callback (e.g. restored as finished)
            status = "failed" if res.error else "completed"
            cl.set_tag(run.info.run_id, TAG_STATUS, status)
            if res.error:
                cl.set_tag(run.info.run_id, TAG_ERROR, f"{type(res.error).__name__}: {str(res.error)[:300]}")
            cl.set_terminated(run.info.run_id, status="FAILED" if res.error else "FINISHED")
        metrics = run.data.metrics if run else {}
        trials.append(TrialSummary(
            trial_id=tid, run_id=run.info.run_id if run else None, status=status,
            point=sampled_point(res.config or {}), epochs=int(metrics.get("epoch", 0)),
            best={k: v for k, v in metrics.items() if k.startswith("best_")},
            reason=tags.get(TAG_ERROR) or tags.get(TAG_REASON, ""), model_uri=tags.get(TAG_MODEL_URI),
        ))
    trials = rank_trials(trials, space.objective)
    pareto = front_of(trials, space.objective) if space.multi_objective else []
    summary = SearchSummary(name=name, trials=trials, pareto=pareto, parent_run_id=parent_run_id,
                            experiment_id=parent.info.experiment_id, tracking_uri=tracking_uri,
                            ray_path=ray_path, objectives=list(space.objective), space=space)
    chosen = (pareto if space.multi_objective else [t for t in trials if t.value(space.primary.metric) is not None])
    for t in chosen[: space.top_k]:
        if t.model_uri or t.run_id is None:
            continue
        try:
            t.model_uri = log_trial_model(cl, tracking_uri, t, result_of[t.trial_id], space)
            out(f"logged model of trial {t.trial_id}: {t.model_uri}")
            if space.autoattack.version != "none":
                aa = cl.get_run(t.run_id).data.metrics.get("aa_acc")
                out(f"  AutoAttack ({space.autoattack.version}, {space.autoattack.split}): "
                    + (f"aa_acc={aa:.4f}" if aa is not None else "failed (see the run's scoretune.autoattack_error tag)"))
        except Exception as e:  # a missing checkpoint must not lose the rest of the summary
            out(f"could not log the model of trial {t.trial_id}: {type(e).__name__}: {e}")
    log_plots(cl, summary, space)
    _log_parent_summary(cl, summary, space)
    return summary


def _checkpoint_for(tags: Mapping[str, str], result: Any, metric: str, mode: str) -> tuple[Any, int | None]:
    """The trial's best checkpoint (``ray.tune.Checkpoint``) and its epoch: the tagged best one when it
    is still on storage, else the best one Tune kept."""
    from ray.tune import Checkpoint

    path = tags.get(TAG_BEST_CKPT)
    if path and (("://" in path) or Path(path).exists()):
        return Checkpoint(path), None
    kept = [(c, m) for c, m in (getattr(result, "best_checkpoints", None) or []) if _finite(m.get(metric))]
    if kept:
        c, m = max(kept, key=lambda cm: (cm[1][metric] if mode == "max" else -cm[1][metric], -cm[1].get("epoch", 0)))
        return c, int(m.get("epoch", 0)) or None
    if getattr(result, "checkpoint", None) is not None:
        return result.checkpoint, None
    raise FileNotFoundError("no checkpoint of this trial is left on storage")


def log_trial_model(cl: Any, tracking_uri: str, t: TrialSummary, result: Any, space: SearchSpace) -> str:
    """Load the trial's best checkpoint (state.pt), log its network as an MLflow PyTorch model into the
    trial's child run, tag the run with the model URI/epoch and log the checkpoint epoch's metrics as
    ``model_<metric>``."""
    from trainables.ray_checkpoint import load_state
    from trainables.train_driver import example_input

    from .engine import model_from_checkpoint
    from .tracking import log_torch_model

    run = cl.get_run(t.run_id)
    ckpt, _ = _checkpoint_for(run.data.tags, result, space.primary.metric, space.primary.mode)
    state = load_state(ckpt)
    net, _cfg = model_from_checkpoint(state)
    spec = json.loads(state["model_spec"])
    uri = log_torch_model(tracking_uri, t.run_id, net, example_input(spec, 2))
    epoch = int(state.get("epoch", 0))
    row = next((r for r in state.get("history", []) if int(r.get("epoch", 0)) == epoch), {})
    cl.set_tag(t.run_id, TAG_MODEL_URI, uri)
    cl.set_tag(t.run_id, TAG_MODEL_EPOCH, str(epoch))
    log_metrics(cl, t.run_id, {f"model_{k}": v for k, v in row.items() if k in ENGINE_METRICS}, step=epoch)
    if space.autoattack.version != "none":
        try:
            autoattack_trial(cl, t.run_id, net, _cfg, space, epoch)
        except Exception as e:  # an evaluation problem must not cost the logged model
            cl.set_tag(t.run_id, "scoretune.autoattack_error", f"{type(e).__name__}: {str(e)[:300]}")
    cl.set_terminated(t.run_id, status="FINISHED")
    return uri


def autoattack_trial(cl: Any, run_id: str, net: Any, cfg: Any, space: SearchSpace, epoch: int) -> dict[str, float]:
    """AutoAttack (``space.autoattack``) on a trial's best model, on its held-out split at its own eps and
    norm; logs ``clean_acc``, ``aa_<version>_acc``, per-attack accuracies and ``aa_acc`` to the trial's run
    and AutoAttack's check warnings as ``aa_check.*`` tags."""
    from .data import load_dataset, to_float
    from .engine import resolve_device
    from .robustness import evaluate

    aa = space.autoattack
    ds = load_dataset(cfg.data.name, root=cfg.data.root, val_size=cfg.data.val_size, seed=cfg.seed,
                      **cfg.data.options)
    if ds.info.pixel_range is None:
        raise ValueError(f"AutoAttack needs inputs in [0, 1]; {cfg.data.name} has unbounded inputs "
                         "(set autoattack.version: none in the search space)")
    split = ds.val if aa.split == "val" and len(ds.val) else ds.test
    n = min(aa.n_ex, len(split))
    result = evaluate(net, to_float(split.x[:n]), split.y[:n], attack=f"aa-{aa.version}", eps=cfg.attack.eps,
                      norm=cfg.attack.norm, batch_size=aa.batch_size, device=resolve_device("auto"), seed=cfg.seed,
                      pixel_range=ds.info.pixel_range)
    metrics = {**result.metrics(), "aa_acc": result.robust_acc}
    log_metrics(cl, run_id, metrics, step=epoch)
    for k, v in {**result.check_tags(), "eval.aa_acc.attack": f"aa-{aa.version}", "eval.aa_acc.n_ex": str(n),
                 "eval.aa_acc.split": aa.split}.items():
        cl.set_tag(run_id, k, v)
    return metrics


def format_table(summary: SearchSummary, params: Sequence[str]) -> str:
    """The results table: one line per trial, best first."""
    objs = summary.objectives
    head = ["trial", "status", "ep"] + list(params) + [f"{o.metric}({o.mode})" for o in objs]
    rows = []
    front = {t.trial_id for t in summary.pareto}
    for t in summary.trials:
        cells = [t.trial_id + ("*" if t.trial_id in front else ""), t.status, str(t.epochs)]
        for p in params:
            v = t.point.get(p)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        for o in objs:
            v = t.value(o.metric)
            cells.append("-" if v is None else f"{v:.4f}")
        rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _log_parent_summary(cl: Any, summary: SearchSummary, space: SearchSpace) -> None:
    pid = summary.parent_run_id
    counts = summary.counts()
    metrics = {f"n_{s}": float(counts.get(s, 0)) for s in STATUSES}
    metrics["n_trials"] = float(len(summary.trials))
    best = summary.best
    if best is not None:
        for o in space.objective:
            v = best.value(o.metric)
            if v is not None:
                metrics[f"best_{o.metric}"] = v
        cl.set_tag(pid, "scoretune.best_trial_id", best.trial_id)
        cl.set_tag(pid, "scoretune.best_run_id", best.run_id or "")
    if summary.pareto:
        cl.set_tag(pid, "scoretune.pareto_trials", ",".join(t.trial_id for t in summary.pareto))
    log_metrics(cl, pid, metrics, step=0)
    cl.log_text(pid, format_table(summary, list(space.params)), "trials.txt")
    cl.set_terminated(pid, status="FINISHED")


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _history(cl: Any, run_id: str, metric: str) -> tuple[list[float], list[float]]:
    hist = sorted(cl.get_metric_history(run_id, metric), key=lambda m: m.step)
    return [float(m.step) for m in hist], [float(m.value) for m in hist]


def log_plots(cl: Any, summary: SearchSummary, space: SearchSpace) -> list[str]:
    """Learning curves, objective vs each searched param, and (multi-objective) the Pareto front, as
    PNG artifacts of the parent run; returns the artifact names."""
    plt = _pyplot()
    names = []
    primary = space.primary
    floor = None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for t in summary.trials:
        if not t.run_id:
            continue
        for ax, metric in zip(axes, (primary.metric, "train_madry_kl")):
            xs, ys = _history(cl, t.run_id, metric)
            if xs:
                ax.plot(xs, ys, marker=".", lw=1, alpha=0.8, label=t.trial_id)
        xs, ys = _history(cl, t.run_id, "floor")
        floor = ys[-1] if ys else floor
    axes[0].set(xlabel="epoch", ylabel=primary.metric, title=f"{primary.metric} per trial")
    axes[1].set(xlabel="epoch", ylabel="train_madry_kl (R_Madry)", title="robust KL training loss")
    if floor is not None:
        line = axes[1].axhline(floor, color="k", ls="--", lw=1, label=f"floor (C^l1)^2/2 = {floor:.3g}")
        axes[1].legend(handles=[line], fontsize=8, loc="upper right")
    if len(summary.trials) <= 12:
        axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    cl.log_figure(summary.parent_run_id, fig, "plots/learning_curves.png")
    plt.close(fig)
    names.append("plots/learning_curves.png")

    params = list(space.params)
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False)
    for ax, p in zip(axes[0], params):
        spec = space.params[p]
        pts = [(t.point.get(p), t.value(primary.metric)) for t in summary.trials if t.value(primary.metric) is not None]
        if spec.kind == "choice":
            cats = [str(c) for c in spec.choice or []]
            ax.scatter([cats.index(str(x)) for x, _ in pts if str(x) in cats],
                       [y for x, y in pts if str(x) in cats])
            ax.set_xticks(range(len(cats)), cats, rotation=45, fontsize=8)
        else:
            ax.scatter([x for x, _ in pts], [y for _, y in pts])
            if spec.kind == "loguniform":
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel=p, ylabel=f"best {primary.metric}")
    fig.tight_layout()
    cl.log_figure(summary.parent_run_id, fig, "plots/objective_vs_params.png")
    plt.close(fig)
    names.append("plots/objective_vs_params.png")

    if space.multi_objective:
        o1, o2 = space.objective[0], space.objective[1]
        fig, ax = plt.subplots(figsize=(5, 4))
        pts = [(t.value(o1.metric), t.value(o2.metric)) for t in summary.trials
               if t.value(o1.metric) is not None and t.value(o2.metric) is not None]
        ax.scatter([a for a, _ in pts], [b for _, b in pts], c="0.6", label="trials")
        front = sorted((t.value(o1.metric), t.value(o2.metric)) for t in summary.pareto)
        ax.plot([a for a, _ in front], [b for _, b in front], "o-", c="C3", label="Pareto front")
        ax.set(xlabel=f"{o1.metric} ({o1.mode})", ylabel=f"{o2.metric} ({o2.mode})")
        ax.legend()
        fig.tight_layout()
        cl.log_figure(summary.parent_run_id, fig, "plots/pareto_front.png")
        plt.close(fig)
        names.append("plots/pareto_front.png")
    return names


def experiment_id_for(tracking_uri: str, experiment: str) -> str:
    return get_or_create_experiment(mlflow_client(tracking_uri), experiment)
