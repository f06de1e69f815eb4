"""The search's small MLflow writers, shared by the driver, the callback and finalize: the parent run
(one per search), the experiment id, and batched metric logging.

MLflow for a search is written by the search driver only (one writer, so concurrent trials never race
on a SQLite store; a remote ``--tracking-uri`` works the same).
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from ..tracking import RunLogger, finite_metrics, get_or_create_experiment, tags
from ..tracking import client as mlflow_client
from .space import SearchSpace


def start_parent_run(space: SearchSpace, *, name: str, ray_path: str, tracking_uri: str | None,
                     space_text: str | None = None) -> RunLogger:
    """Create the search's parent run (tags ``scoretune.kind=search``, ``scoretune.search_name``,
    ``scoretune.ray_path``; the space YAML as an artifact; the search settings as params); returns its
    logger."""
    logger = RunLogger(tracking_uri, space.experiment_name, run_name=name,
                       tags={tags.KIND: "search", tags.SEARCH: name, tags.RAY_PATH: ray_path})
    logger.log_params(space.summary())
    resolved = json.dumps(space.model_dump(by_alias=True, exclude_none=True), indent=2)
    logger.log_text(space_text or resolved, "search_space.yaml")
    logger.log_text(resolved, "search_space_resolved.json")
    return logger


def experiment_id_for(tracking_uri: str, experiment: str) -> str:
    """The id of MLflow experiment ``experiment`` (created when missing)."""
    return get_or_create_experiment(mlflow_client(tracking_uri), experiment)


def log_metrics(cl: Any, run_id: str, metrics: Mapping[str, Any], step: int, model_id: str | None = None) -> None:
    """Log the finite numeric entries of ``metrics`` at ``step`` in batches of 500 (attached to the
    LoggedModel ``model_id`` too when given, so the Models tab shows them)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, v, ts, int(step), model_id=model_id) for k, v in finite_metrics(metrics).items()]
    for i in range(0, len(items), 500):
        cl.log_batch(run_id, metrics=items[i: i + 500])
