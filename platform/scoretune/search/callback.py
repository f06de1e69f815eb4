"""The search's two Ray Tune callbacks, both run in the driver, and the parent run they write under.

* :class:`MlflowSearchCallback`: one nested child run per trial (tag ``scoretune.trial_id``), laid out
  for the MLflow UI: the searched values and a few identifying constants as params (the full config
  as ``config.json``); per-epoch curves under the engine's names (the scheduled lr as ``lr_sched``);
  when the trial ends, its best-epoch summary, how it ended (``scoretune.status`` and the reason; the
  run name starts with the status) and the path of its best checkpoint, kept out of Ray's pruning.
  A diverged trial is FAILED in MLflow whatever stopped it; a resumed search finds its runs by tag.
* :class:`ProgressCallback` prints one line per event: a trial starts, a new best appears, a trial
  ends (with the running counts).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ray.tune import Callback

from ..engine import ENGINE_METRICS
from ..stopping import Stop
from ..tracking import RunLogger, finite_metrics, get_or_create_experiment, param_value, tags
from ..tracking import client as mlflow_client
from ..tracking.buffer import open_writer
from .report import (
    EARLY,
    best_values,
    better,
    classify_trial,
    config_id,
    divergence,
    finite,
    point_label,
    status_label,
    stop_of,
    trial_summary_metrics,
)
from .space import SearchSpace

_SKIP_KEYS = {
    "training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore", "timestamp",
    "timesteps_total", "timesteps_since_restore", "episodes_total", "iterations_since_restore",
    "pid", "done", "trial_id", "experiment_tag", "should_checkpoint", "selection_score",
}


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of a Tune result worth logging (the engine's row; Tune's bookkeeping dropped)."""
    return {k: v for k, v in finite_metrics(result).items() if k not in _SKIP_KEYS}


def floor_stop_tags(stop: Stop | None) -> dict[str, Any]:
    """The tags of a trial the floor rule stopped (epoch, the watched value, the floor, the metric); {} else."""
    if stop is None or stop.kind != "floor":
        return {}
    return {tags.FLOOR_STOP_EPOCH: str(stop.epoch), tags.FLOOR_VALUE: f"{stop.floor:.6g}",
            tags.FLOOR_STOP_VALUE: "" if stop.value is None else f"{stop.value:.6g}", tags.FLOOR_METRIC: stop.metric}


RENAMED = {"lr": "lr_sched"}  # per-epoch metric -> its MLflow name (the `lr` param keeps the name `lr`)
R_MADRY_SOURCES = ("train_r_madry", "train_madry_kl")  # logged again as `R_Madry`: the first one a row has


def identity_params(cfg: Any) -> dict[str, Any]:
    """The constants that identify a trial next to its searched values (the rest is in config.json)."""
    return {"method": cfg.objective.method, "model": cfg.model.name, "data": cfg.data.name,
            "eps": cfg.attack.eps, "norm": cfg.attack.norm, "epochs": cfg.epochs,
            "workers": cfg.scaling.workers}


def num_classes_of(cfg: Any) -> int | None:
    """The class count of a trial's dataset (for the chance-accuracy test), None when it cannot be read."""
    try:
        from ..data import load_dataset

        return int(load_dataset(cfg.data.name, root=cfg.data.root, val_size=cfg.data.val_size, seed=cfg.seed,
                                **cfg.data.options).info.num_classes)
    except Exception:
        return None


def checkpoint_rows(trial: Any) -> list[dict[str, float]]:
    """The engine rows in the history of the checkpoint Tune restores ``trial`` from ([] when none): a
    resumed trial may go on from a checkpoint newer than the snapshot's rows."""
    from trainables.ray_checkpoint import read_history, storage_fs

    ckpt = getattr(trial, "checkpoint", None)
    if ckpt is None:
        return []
    fs, path = storage_fs(ckpt.path)
    return [{k: float(v) for k, v in row.items() if (k in ENGINE_METRICS or k == "epoch") and finite(v)}
            for row in read_history(fs, path) or [] if isinstance(row, dict) and finite(row.get("epoch"))]


def merge_rows(rows: list[dict[str, float]], more: list[dict[str, float]]) -> list[dict[str, float]]:
    """``rows`` plus the rows of ``more`` for epochs it lacks, by epoch."""
    have = {int(r["epoch"]) for r in rows}
    return sorted(rows + [r for r in more if int(r["epoch"]) not in have], key=lambda r: r["epoch"])


def trial_run_name(trial_id: str, point: Mapping[str, Any], status: str = "running",
                   epoch: int | None = None) -> str:
    """``[asha@3] 5f2e07c5 beta=3.2 lr=0.05 loss=se``: status first, so the runs table says it at a glance."""
    return f"{status_label(status, epoch)} {trial_id} {point_label(point)}"[:240]


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


@dataclass
class TrialRecord:
    """What the MLflow callback keeps of one trial; part of Tune's experiment snapshot, so a resumed
    search goes on from it (``synced`` False: MLflow may be ahead, read it again on first use)."""

    run_id: str | None = None
    point: dict[str, Any] = field(default_factory=dict)  # the searched values
    budget: int = 0  # its epoch budget
    data: str = ""  # its dataset (for the chance-accuracy test)
    rows: list[dict[str, float]] = field(default_factory=list)  # the engine's metrics per epoch
    logged_epoch: int = 0  # the last epoch MLflow has
    status: str = "running"  # how this callback judged it
    status_tag: str | None = None  # the status tag MLflow has
    reason: str = ""
    synced: bool = True


class MlflowSearchCallback(Callback):
    """Driver-side MLflow logging of every trial of a search (see the module docstring).

    Writes go through the search's buffered writer (:mod:`scoretune.tracking.buffer`, shared with the
    driver), so a tracking server that goes away costs no trial and no metric. The writer is held for
    the length of each Tune step: what one step writes to a run (a result's metrics and the tag of the
    checkpoint it brought) goes in one ``log_batch``. Picklable (Tune stores it with the experiment).
    """

    stage: str | None = None  # (a class default too: a callback pickled before stages existed has none)

    def __init__(self, space: SearchSpace, *, tracking_uri: str, parent_run_id: str, experiment_id: str,
                 stoppers: Sequence[Any] = (), floor: float | None = None, journal: str | None = None,
                 stage: str | None = None):
        self.space = space
        self.stage = stage  # "confirm": the runs are tagged scoretune.stage and scoretune.config_id
        self.journal = journal
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.stoppers = list(stoppers)
        self.floor = floor
        self.refined: tuple[float, int] | None = None  # the refined floor last logged on the parent, and its step
        self.trials: dict[str, TrialRecord] = {}
        self.classes: dict[str, int | None] = {}
        self._client = None
        self._children: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_children": None}

    @property
    def client(self):
        if self._client is None:
            from ..tracking.buffer import default_journal

            self._client = open_writer(self.tracking_uri, self.journal or default_journal(self.parent_run_id),
                                       experiments={self.experiment_id: self.space.experiment_name})
        return self._client

    def get_state(self) -> dict[str, Any]:
        return {"trials": self.trials}

    def set_state(self, state: dict[str, Any]) -> None:
        self.trials = dict(state.get("trials") or {})
        for rec in self.trials.values():
            rec.synced = False

    # -- records
    def _existing_child(self, trial_id: str) -> Any | None:
        """The child run already logged for ``trial_id`` (a resumed search), else None. The parent's
        child runs are listed once per callback object and kept by trial id: this callback is the only
        writer, so one listing stays true, and a search of 1,000 trials makes one query, not one each."""
        if self._children is None:
            from ..tracking.runs import child_runs

            try:
                parent = self.client.get_run(self.parent_run_id)
                self._children = {r.data.tags.get(tags.TRIAL): r for r in child_runs(self.client, parent)}
            except Exception:  # the server is away: a new run (the writer buffers it), listed again next time
                return None
        return self._children.get(trial_id)

    def record(self, trial: Any) -> TrialRecord:
        """The trial's record (its MLflow child run is found by tag, else created)."""
        tid = trial.trial_id
        rec = self.trials.get(tid)
        if rec is not None and rec.run_id and rec.synced:
            return rec
        rec = rec or TrialRecord()
        rec.synced = True
        from trainables.tune_trainable import sampled_point, trial_experiment

        point = sampled_point(trial.config)
        found = self._existing_child(tid)
        if found is not None:
            rec.run_id = found.info.run_id
            rec.logged_epoch = max(rec.logged_epoch, int(found.data.metrics.get("epoch", 0)))
            rec.rows = merge_rows(rec.rows, checkpoint_rows(trial))
            self.client.update_run(found.info.run_id, status="RUNNING")
            rec.status_tag = found.data.tags.get(tags.STATUS)
        else:
            from mlflow.entities import Param

            search = trial.config.get("scoretune", {}).get("search", "")
            run = self.client.create_run(
                self.experiment_id, run_name=trial_run_name(tid, point),
                tags={tags.PARENT: self.parent_run_id, tags.KIND: "trial", tags.TRIAL: tid, tags.SEARCH: search,
                      tags.STATUS: "running", **self.stage_tags(point)})
            params: dict[str, Any] = dict(point)
            try:
                cfg = trial_experiment(trial.config, tid)
            except Exception:  # an invalid point: the trial will fail and say why
                cfg = None
            if cfg is not None:
                params.update({k: v for k, v in identity_params(cfg).items() if k not in point})
                self.client.log_text(run.info.run_id, json.dumps(cfg.model_dump(), indent=2, sort_keys=True,
                                                                 default=str), "config.json")
                if cfg.data.name not in self.classes:
                    self.classes[cfg.data.name] = num_classes_of(cfg)
                rec.data = cfg.data.name
            if self.floor is not None:
                params["floor"] = self.floor
            self.client.log_batch(run.info.run_id, params=[Param(k, param_value(v)) for k, v in params.items()])
            rec.run_id = run.info.run_id
            rec.status_tag = "running"
            if self._children is not None:
                self._children[tid] = run
        rec.point = point
        rec.budget = self.space.epoch_budget(point)
        self.trials[tid] = rec
        return rec

    def stage_tags(self, point: Mapping[str, Any]) -> dict[str, str]:
        """``scoretune.stage`` and ``scoretune.config_id`` of a confirmation run ({} in the search)."""
        if self.stage is None:
            return {}
        return {tags.STAGE: self.stage, tags.CONFIG_ID: config_id(point)}

    def _write(self, run_id: str, metrics: Mapping[str, Any] | None = None, step: int = 0,
               run_tags: Mapping[str, Any] | None = None) -> None:
        """One ``log_batch`` of finite ``metrics`` at ``step`` and ``run_tags`` (sent at the step's end)."""
        from mlflow.entities import Metric, RunTag

        ts = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, ts, int(step)) for k, v in finite_metrics(metrics or {}).items()],
                              tags=[RunTag(k, str(v)[:5000]) for k, v in (run_tags or {}).items()])

    # -- Tune hooks
    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self.client.hold()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.client.release()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.client.release()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rec = self.record(trial)
        rec.status = "running"
        if rec.status_tag != "running":  # a new run was created with it
            self._write(rec.run_id, run_tags={tags.STATUS: "running"})
            rec.status_tag = "running"

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        rec = self.record(trial)
        metrics = result_metrics(result)
        epoch = int(metrics.get("epoch", result.get("training_iteration", 0)))
        metrics["epoch"] = float(epoch)
        rec.rows = merge_rows(rec.rows, [{k: v for k, v in metrics.items() if k in ENGINE_METRICS or k == "epoch"}])
        best = best_values(rec.rows, self.space.objective)
        path = result.get("checkpoint_path")  # Ray Train trials (TuneReportCallback)
        if isinstance(path, str):
            self._checkpoint(rec, epoch, path, best)
        if epoch > rec.logged_epoch:
            extra = {}
            src = next((k for k in R_MADRY_SOURCES if k in metrics), None)
            if src is not None:
                extra["R_Madry"] = metrics[src]
            self._write(rec.run_id, {**{RENAMED.get(k, k): v for k, v in metrics.items()}, **extra}, step=epoch)
            rec.logged_epoch = epoch
        self._log_refined_floor()

    def _log_refined_floor(self) -> None:
        """A floor stopper with ``refine`` that has just lowered the floor (the stoppers saw the result
        first): ``floor_refined`` / ``floor_refined_c_l1`` on the parent run (step: the n-th change) and
        the tag ``scoretune.floor.refined`` saying which trial's model it came from."""
        for s in self.stoppers:
            refiner = getattr(s, "refiner", None)
            if refiner is None or refiner.c_l1 is None:
                continue
            if self.refined is not None and self.refined[0] == refiner.floor:
                return
            step = 1 if self.refined is None else self.refined[1] + 1
            self.refined = (refiner.floor, step)
            self._write(self.parent_run_id, {"floor_refined": refiner.floor, "floor_refined_c_l1": refiner.c_l1},
                        step=step, run_tags={tags.FLOOR_REFINED: refiner.describe()})
            return

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        rec = self.record(trial)
        epoch = int((trial.last_result or {}).get("epoch", 0))
        self._checkpoint(rec, epoch, checkpoint.path, best_values(rec.rows, self.space.objective))

    def _checkpoint(self, rec: TrialRecord, epoch: int, path: str, best: Mapping[str, float]) -> None:
        """A checkpoint of the trial's best epoch so far is copied (hard links where possible) out of Ray's
        pruning; the copy's path goes into the ``scoretune.best_checkpoint`` tag."""
        if int(best.get("best_epoch", -1)) != epoch:
            return
        from trainables.ray_checkpoint import preserve_checkpoint

        try:
            kept = preserve_checkpoint(path)
        except OSError:  # storage trouble: the original is still there for now; finalize re-checks the tag
            kept = path
        self._write(rec.run_id, run_tags={tags.BEST_CKPT: kept})

    def _end(self, trial: Any, rec: TrialRecord, status: str, run_status: str, extra_tags: Mapping[str, str]) -> None:
        """The trial's summary metrics, status tags and status-first run name; the run ends now."""
        last = max([int(r["epoch"]) for r in rec.rows] + [rec.logged_epoch,
                    int((trial.last_result or {}).get("epoch", 0) or 0)])
        rec.status = status
        summary = {**trial_summary_metrics(rec.rows, self.space.objective), "epochs_run": float(last)}
        name = trial_run_name(trial.trial_id, rec.point, status, last)
        # the name rides in the last log_batch (MLflow renames the run for that tag): 2 writes, not 4
        self._write(rec.run_id, summary, step=last, run_tags={tags.STATUS: status, tags.RUN_NAME: name, **extra_tags})
        self.client.set_terminated(rec.run_id, status=run_status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rec = self.record(trial)
        last = max([float(r["epoch"]) for r in rec.rows] + [float(rec.logged_epoch),
                    float((trial.last_result or {}).get("epoch", 0) or 0)])
        stop = stop_of(trial.trial_id, self.stoppers)
        status, reason = classify_trial(stop, last, rec.budget, self.space.scheduler.type)
        why = divergence(rec.rows, self.classes.get(rec.data))
        if why is not None:
            status, reason = "diverged", f"{why}; {reason}"
        rec.reason = reason
        self._end(trial, rec, status, "FAILED" if status == "diverged" else "FINISHED",
                  {tags.REASON: reason, **floor_stop_tags(stop)})

    def verdict(self, trial_id: str) -> tuple[str, str] | None:
        """``(status, reason)`` of an ended trial as this callback judged it (None while it runs)."""
        rec = self.trials.get(trial_id)
        if rec is None or rec.status == "running":
            return None
        return rec.status, rec.reason

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rec = self.record(trial)
        self._end(trial, rec, "failed", "FAILED", {tags.ERROR: trial_error_message(trial)[:5000]})


class ProgressCallback(Callback):
    """One line per event: a trial starts, a new best appears, a trial ends (with the running counts)."""

    def __init__(self, space: SearchSpace, stoppers: list[Any], out: Callable[[str], None] = print,
                 judge: Callable[[str], tuple[str, str] | None] | None = None):
        self.space = space
        self.stoppers = stoppers
        self.out = out
        self.judge = judge  # e.g. MlflowSearchCallback.verdict (runs first): says 'diverged' where it applies
        self.status: dict[str, str] = {}
        self.last_epoch: dict[str, float] = {}
        self.best: tuple[float, str, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks (``tuner.pkl``): a builtin ``print`` goes as None (and comes back as
        print), since pickling it by name fails once a library has patched ``builtins.print``."""
        state = dict(self.__dict__)
        if getattr(state.get("out"), "__module__", None) == "builtins":
            state["out"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.out is None:
            self.out = print

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
                f"diverged {vals.count('diverged')}, failed {vals.count('failed')} of {self.space.total_samples}")

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
        status, reason = classify_trial(stop_of(trial.trial_id, self.stoppers), last, budget,
                                        self.space.scheduler.type)
        judged = self.judge(trial.trial_id) if self.judge is not None else None
        if judged is not None:
            status, reason = judged
        self.status[trial.trial_id] = status
        self._say(f"{status:<13} {trial.trial_id}  after epoch {int(last or 0)}/{budget}"
                  + ("" if status == "completed" else f": {reason}") + f"  | {self._counts(trials)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.status[trial.trial_id] = "failed"
        self._say(f"failed        {trial.trial_id}  {trial_error_message(trial)}  | {self._counts(trials)}")
        self.out(f"           traceback: {trial.path}/error.txt")


# ----------------------------------------------------------------------------- the parent run and batched writes
def start_parent_run(space: SearchSpace, *, name: str, ray_path: str, tracking_uri: str | None,
                     space_text: str | None = None) -> RunLogger:
    """Create the search's parent run (tags ``scoretune.kind=search``, ``scoretune.search_name``,
    ``scoretune.ray_path``; the space YAML as an artifact; the search settings as params); returns its
    logger."""
    logger = RunLogger(tracking_uri, space.experiment_name, run_name=name,
                       tags={tags.KIND: "search", tags.SEARCH: name, tags.RAY_PATH: ray_path})
    logger.log_params({**space.summary(), "search.name": name})  # --name, like the tag (the space's name if none)
    resolved = json.dumps(space.model_dump(by_alias=True, exclude_none=True), indent=2)
    logger.log_text(space_text or resolved, "search_space.yaml")
    logger.log_text(resolved, "search_space_resolved.json")
    return logger


def experiment_id_for(tracking_uri: str, experiment: str) -> str:
    """The id of MLflow experiment ``experiment`` (created when missing)."""
    return get_or_create_experiment(mlflow_client(tracking_uri), experiment)


def log_metrics(cl: Any, run_id: str, metrics: Mapping[str, Any], step: int, model_id: str | None = None) -> None:
    """Log the finite numeric entries of ``metrics`` at ``step`` (attached to the LoggedModel ``model_id``
    too when given, so the Models tab shows them); MLflow's ``log_batch`` splits what exceeds its limits."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    cl.log_batch(run_id, metrics=[Metric(k, v, ts, int(step), model_id=model_id)
                                  for k, v in finite_metrics(metrics).items()])
