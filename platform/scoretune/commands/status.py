"""``scoretune status NAME``: a launched search's Ray job state and its best trial so far.

Jobs come from the cluster's dashboard (``JobSubmissionClient.list_jobs``, those with metadata
``scoretune_search=NAME`` or submission id ``scoretune-NAME-<ts>``); trials from MLflow: the parent
run tagged ``scoretune.search_name=NAME`` and its nested child runs, ranked by the best value of
``--metric`` (default ``val_pgd_acc``) over each child's epochs.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

HELP = "show a launched search's Ray job state and its best trial so far (from MLflow)"



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the search name (scoretune launch/search --name)")
    p.add_argument("--address", default=None,
                   help="Ray dashboard URL (default $RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--metric", default="val_pgd_acc", help="trial metric to rank by (default val_pgd_acc)")
    p.add_argument("--mode", choices=("max", "min"), default="max", help="whether higher or lower --metric is better")
    p.add_argument("--no-jobs", action="store_true", help="skip the Ray dashboard (MLflow only)")


# ----------------------------------------------------------------------------- pure helpers
@dataclass
class JobRow:
    submission_id: str
    status: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    message: str = ""


def search_jobs(jobs: Iterable[Any], name: str) -> list[JobRow]:
    """The Ray jobs (``JobDetails``) of search ``name``, oldest first."""
    from ..launch import is_search_job

    rows = []
    for j in jobs:
        if not is_search_job(getattr(j, "submission_id", None), getattr(j, "metadata", None), name):
            continue
        status = getattr(j.status, "value", str(j.status))
        ms = lambda t: t / 1000.0 if t else None  # noqa: E731  (Ray reports milliseconds)
        rows.append(JobRow(j.submission_id or "", status, ms(j.start_time), ms(j.end_time), j.message or ""))
    return sorted(rows, key=lambda r: r.start_time or 0.0)


@dataclass
class Trial:
    run_id: str
    run_name: str
    status: str
    score: float | None  # best value of the metric over the trial's epochs
    params: dict[str, str] = field(default_factory=dict)


def best_trial(trials: Sequence[Trial], mode: str = "max") -> Trial | None:
    """The trial with the best score (``mode`` 'max' or 'min'); None when no trial has reported one."""
    scored = [t for t in trials if t.score is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda t: t.score)


def best_value(values: Iterable[float], mode: str = "max") -> float | None:
    vals = [float(v) for v in values]
    return None if not vals else (max(vals) if mode == "max" else min(vals))


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


# ----------------------------------------------------------------------------- queries
def query_jobs(address: str, name: str) -> list[JobRow]:
    from .launch import job_client

    return search_jobs(job_client(address).list_jobs(), name)


def query_runs(tracking_uri: str | None, name: str, metric: str = "val_pgd_acc",
               mode: str = "max") -> tuple[list[Any], list[Trial]]:
    """(parent runs, child trials) of search ``name`` in every active MLflow experiment."""
    from mlflow.entities import ViewType

    from ..tracking import client, tags
    from ..tracking.runs import search_by_tags

    cl = client(tracking_uri)
    exp_ids = [e.experiment_id for e in cl.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not exp_ids:
        return [], []
    tagged = search_by_tags(cl, exp_ids, {tags.SEARCH: name}, max_results=1000)
    parents = [r for r in tagged if tags.PARENT not in r.data.tags]
    trials: dict[str, Trial] = {}
    for parent in parents:
        # the parent logs the space as params ``space.<name>``: show each trial's searched values only
        searched = {k[len("space."):] for k in parent.data.params if k.startswith("space.")}
        children = search_by_tags(cl, [parent.info.experiment_id], {tags.PARENT: parent.info.run_id}, max_results=5000)
        for r in children:
            try:
                history = [m.value for m in cl.get_metric_history(r.info.run_id, metric)]
            except Exception:  # a store without history: the latest value
                history = [r.data.metrics[metric]] if metric in r.data.metrics else []
            trials[r.info.run_id] = Trial(r.info.run_id, r.info.run_name or r.info.run_id, r.info.status,
                                          best_value(history, mode),
                                          {k: v for k, v in r.data.params.items() if not searched or k in searched})
    return parents, sorted(trials.values(), key=lambda t: t.run_name)


# ----------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..launch import DASHBOARD_PORT, dashboard_url
    from ..names import validate_name
    from ..tracking import resolve_tracking_uri, tags

    name = validate_name(args.name, flag="search name")
    found = False
    if not args.no_jobs:
        address = args.address or _env_address() or dashboard_url(DASHBOARD_PORT)
        if "://" not in address:
            address = f"http://{address}"
        try:
            jobs = query_jobs(address, name)
        except Exception as e:
            print(f"Ray jobs: {e}" if isinstance(e, UserError) else
                  f"Ray jobs: dashboard {address} unreachable ({type(e).__name__}); "
                  "forward a cluster's with `ray dashboard cluster/X.yaml` or pass --address")
        else:
            found |= bool(jobs)
            print(f"Ray jobs of search {name!r} at {address}: {len(jobs) or 'none'}")
            for j in jobs:
                line = f"  {j.submission_id}  {j.status:<9}  started {_when(j.start_time)}  ended {_when(j.end_time)}"
                if j.status in ("FAILED", "STOPPED") and j.message:
                    line += f"  ({j.message.strip().splitlines()[-1][:200]})"
                print(line)

    uri = resolve_tracking_uri(args.tracking_uri)
    parents, trials = query_runs(uri, name, args.metric, args.mode)
    found |= bool(parents)
    if not parents:
        print(f"MLflow ({uri}): no run tagged {tags.SEARCH}={name} yet")
    else:
        states: dict[str, int] = {}
        for t in trials:
            states[t.status] = states.get(t.status, 0) + 1
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "none yet"
        p = parents[0]
        print(f"MLflow ({uri}): search run {p.info.run_id} ({p.info.status}), {len(trials)} trials: {counts}")
        best = best_trial(trials, args.mode)
        if best is None:
            print(f"best trial: none has reported {args.metric} yet")
        else:
            print(f"best trial so far: {best.run_name} (run {best.run_id}, {best.status}) "
                  f"{args.metric}={best.score:.4f}")
            if best.params:
                print("  params: " + ", ".join(f"{k}={v}" for k, v in sorted(best.params.items())[:20]))
    if not found:
        raise UserError(f"no Ray job and no MLflow run found for search {name!r}: check the name, --address "
                        "and --tracking-uri")
    return 0


def _env_address() -> str | None:
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        v = os.environ.get(var, "")
        if v.startswith(("http://", "https://")):
            return v
    return None
