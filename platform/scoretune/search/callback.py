"""The search's two Ray Tune callbacks, both run in the driver.

* :class:`MlflowSearchCallback` keeps one nested child run per trial (tags ``mlflow.parentRunId`` and
  ``scoretune.trial_id``): params (the trial's flat experiment config + the sampled values), per-epoch
  metrics (the engine's row, ``R_Madry`` = train_r_madry, the ``floor`` value, and
  ``best_<objective>`` / ``best_epoch``: the values at the trial's best epoch by the primary
  objective), and how the trial ended (tag ``scoretune.status``: completed / stopped_asha /
  stopped_floor / stopped_plateau / failed, with ``scoretune.stop_reason`` or ``scoretune.error``).
  A resumed search finds existing child runs by their trial id tag (see :mod:`.resume` for the runs it
  will not continue).
* :class:`ProgressCallback` prints one line per event: a trial starts, a new best appears, a trial
  ends (with the running counts).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ray.tune import Callback

from ..engine import ENGINE_METRICS
from ..tracking import PARAM_MAX, finite_metrics, tags
from ..tracking.buffer import open_writer
from .ranking import EARLY, best_values, better, classify_trial
from .space import SearchSpace
from .summary import point_label

_SKIP_KEYS = {
    "training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore", "timestamp",
    "timesteps_total", "timesteps_since_restore", "episodes_total", "iterations_since_restore",
    "pid", "done", "trial_id", "experiment_tag", "should_checkpoint", "selection_score",
}


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of a Tune result worth logging (the engine's row; Tune's bookkeeping dropped)."""
    return {k: v for k, v in finite_metrics(result).items() if k not in _SKIP_KEYS}


def floor_stop_tags(trial_id: str, stoppers: Sequence[Any]) -> dict[str, Any]:
    """The tags of a trial the floor stopper stopped (epoch, the watched value, the floor, the metric); {} else."""
    for s in stoppers or ():
        if getattr(s, "floor", None) is not None and trial_id in getattr(s, "reasons", {}):
            value = getattr(s, "stop_values", {}).get(trial_id)
            return {tags.FLOOR_STOP_EPOCH: str(s.stopped_epochs.get(trial_id)), tags.FLOOR_VALUE: f"{s.floor:.6g}",
                    tags.FLOOR_STOP_VALUE: "" if value is None else f"{value:.6g}", tags.FLOOR_METRIC: s.metric}
    return {}


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


class MlflowSearchCallback(Callback):
    """Driver-side MLflow logging of every trial of a search (see the module docstring).

    Picklable (Tune stores it with the experiment); the MLflow client is created on first use: the
    buffered writer of :mod:`scoretune.tracking.buffer` for ``journal`` (shared with the driver), so a
    tracking server that goes away costs no trial and no metric.
    ``get_state``/``set_state`` keep the per-trial records (run id, epoch rows) in Tune's
    experiment snapshot, so a resumed search goes on where the snapshot left off.
    """

    def __init__(self, space: SearchSpace, *, tracking_uri: str, parent_run_id: str, experiment_id: str,
                 stoppers: Sequence[Any] = (), floor: float | None = None, journal: str | None = None):
        self.space = space
        self.journal = journal
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.stoppers = list(stoppers)
        self.floor = floor
        self.trials: dict[str, dict[str, Any]] = {}
        self._client = None
        self._children: dict[str, Any] | None = None
        self._dirty: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_children"] = None
        state["_dirty"] = set()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_children", None)
        self.__dict__.setdefault("_dirty", set())

    @property
    def client(self):
        if self._client is None:
            from ..tracking.buffer import default_journal

            self._client = open_writer(self.tracking_uri, getattr(self, "journal", None) or
                                       default_journal(self.parent_run_id),
                                       experiments={self.experiment_id: self.space.experiment_name})
        return self._client

    def get_state(self) -> dict[str, Any]:
        return {"trials": self.trials}

    def set_state(self, state: dict[str, Any]) -> None:
        self.trials = dict(state.get("trials") or {})
        for rec in self.trials.values():  # MLflow may be ahead of the snapshot: re-read it on first use
            rec["synced"] = False
            rec.pop("flushed_at", None)
            if rec.get("run_id") and (rec.get("pending_metrics") or rec.get("pending_tags")):
                self._dirty.add(rec["run_id"])  # writes the stopped driver had not made yet

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
        found = self._existing_child(tid)
        if found is not None:
            rec["run_id"] = found.info.run_id
            rec["logged_epoch"] = max(int(rec.get("logged_epoch", 0)), int(found.data.metrics.get("epoch", 0)))
            self.client.update_run(found.info.run_id, status="RUNNING")
            rec["status_tag"] = found.data.tags.get(tags.STATUS)
        else:
            from mlflow.entities import Param

            search = trial.config.get("scoretune", {}).get("search", "")
            run = self.client.create_run(
                self.experiment_id, run_name=f"{tid} {point_label(point)}"[:240],
                tags={tags.PARENT: self.parent_run_id, tags.KIND: "trial", tags.TRIAL: tid, tags.SEARCH: search,
                      tags.STATUS: "running"})
            try:
                params = trial_experiment(trial.config, tid).flat()
            except Exception:  # an invalid point: the trial will fail and say why
                params = {}
            params.update(point)
            if self.floor is not None:
                params["search.floor"] = self.floor
            items = [Param(k, str(v) if len(str(v)) <= PARAM_MAX else str(v)[: PARAM_MAX - 3] + "...")
                     for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run.info.run_id, params=items[i: i + 100])
            rec["run_id"] = run.info.run_id
            rec["status_tag"] = "running"
            if self._children is not None:
                self._children[tid] = run
        rec["point"] = point
        rec["budget"] = self.space.epoch_budget(point)
        self.trials[tid] = rec
        return rec

    # -- writes: a trial's metrics and tags wait in its record and go to MLflow in one log_batch at most
    # every FLUSH_S seconds (the first result at once, the rest by on_step_end), and with how it ended
    FLUSH_S = 1.0

    def _queue(self, rec: dict[str, Any], metrics: Mapping[str, Any] | None = None, step: int = 0,
               run_tags: Mapping[str, Any] | None = None) -> None:
        if metrics:
            rec.setdefault("pending_metrics", []).append([int(step), int(time.time() * 1000), finite_metrics(metrics)])
        if run_tags:
            rec.setdefault("pending_tags", {}).update({k: str(v)[:5000] for k, v in run_tags.items()})
        self._dirty.add(rec["run_id"])
        if time.monotonic() - rec.get("flushed_at", float("-inf")) >= self.FLUSH_S:
            self._flush(rec)

    def _flush(self, rec: dict[str, Any]) -> None:
        """Write the record's waiting metrics (each at its own step and time) and tags in one call (MLflow
        takes 1,000 metrics and 100 tags a call; more go in further calls)."""
        from mlflow.entities import Metric, RunTag

        rows, run_tags = rec.pop("pending_metrics", []), rec.pop("pending_tags", {})
        self._dirty.discard(rec["run_id"])
        rec["flushed_at"] = time.monotonic()
        metrics = [Metric(k, v, ts, step) for step, ts, values in rows for k, v in values.items()]
        tag_list = [RunTag(k, v) for k, v in run_tags.items()]
        for i in range(0, max(len(metrics), 10 * len(tag_list)), 1000):
            self.client.log_batch(rec["run_id"], metrics=metrics[i: i + 1000], tags=tag_list[i // 10: i // 10 + 100])

    def _flush_due(self, every: float) -> None:
        now = time.monotonic()
        by_run = {rec.get("run_id"): rec for rec in self.trials.values()}
        for run_id in list(self._dirty):
            rec = by_run.get(run_id)
            if rec is None:
                self._dirty.discard(run_id)
            elif now - rec.get("flushed_at", float("-inf")) >= every:
                self._flush(rec)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self._dirty:
            self._flush_due(self.FLUSH_S)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._flush_due(0.0)

    # -- Tune hooks
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rec = self.record(trial)
        rec["status"] = "running"
        if rec.get("status_tag") != "running":  # a new run was created with it
            self._queue(rec, run_tags={tags.STATUS: "running"})
            rec["status_tag"] = "running"

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        rec = self.record(trial)
        metrics = result_metrics(result)
        epoch = int(metrics.get("epoch", result.get("training_iteration", 0)))
        metrics["epoch"] = float(epoch)
        if epoch not in {int(r["epoch"]) for r in rec["rows"]}:
            rec["rows"].append({k: metrics[k] for k in metrics if k in ENGINE_METRICS or k == "epoch"})
            rec["rows"].sort(key=lambda r: r["epoch"])
        best = best_values(rec["rows"], self.space.objective)
        path = result.get("checkpoint_path")  # Ray Train trials (TuneReportCallback)
        if isinstance(path, str):
            self._checkpoint(rec, epoch, path, best)
        if epoch > int(rec["logged_epoch"]):
            extra = dict(best)
            if "train_r_madry" in metrics:
                extra["R_Madry"] = metrics["train_r_madry"]
            if self.floor is not None:
                extra["floor"] = self.floor
            self._queue(rec, {**metrics, **extra}, step=epoch)
            rec["logged_epoch"] = epoch

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        rec = self.record(trial)
        epoch = int((trial.last_result or {}).get("epoch", 0))
        self._checkpoint(rec, epoch, checkpoint.path, best_values(rec["rows"], self.space.objective))

    def _checkpoint(self, rec: dict[str, Any], epoch: int, path: str, best: Mapping[str, float]) -> None:
        """A checkpoint of the trial's best epoch so far: its path goes into the ``scoretune.best_checkpoint``
        tag with the run's next write (the next metrics, or how the trial ended)."""
        if int(best.get("best_epoch", -1)) == epoch:
            self._queue(rec, run_tags={tags.BEST_CKPT: path})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rec = self.record(trial)
        last = max([float(r["epoch"]) for r in rec["rows"]] + [float(rec.get("logged_epoch", 0)),
                    float((trial.last_result or {}).get("epoch", 0) or 0)])
        status, reason = classify_trial(trial.trial_id, last, rec["budget"], self.stoppers, self.space.scheduler.type)
        rec["status"] = status
        rec.setdefault("pending_tags", {}).update({tags.STATUS: status, tags.REASON: reason,
                                                   **floor_stop_tags(trial.trial_id, self.stoppers)})
        self._flush(rec)
        self.client.set_terminated(rec["run_id"], status="FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rec = self.record(trial)
        rec["status"] = "failed"
        rec.setdefault("pending_tags", {}).update({tags.STATUS: "failed", tags.ERROR: trial_error_message(trial)[:5000]})
        self._flush(rec)
        self.client.set_terminated(rec["run_id"], status="FAILED")


class ProgressCallback(Callback):
    """One line per event: a trial starts, a new best appears, a trial ends (with the running counts)."""

    def __init__(self, space: SearchSpace, stoppers: list[Any], out: Callable[[str], None] = print):
        self.space = space
        self.stoppers = stoppers
        self.out = out
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
