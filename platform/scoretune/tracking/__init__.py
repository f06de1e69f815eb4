"""MLflow at the edge: one writer (the driver process) logs runs through ``MlflowClient``.

The default store is a SQLite file ``mlflow.db`` in the working directory; a tracking URI
from ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` overrides it (a file path, a
``sqlite:///`` URI or an ``http://`` MLflow server).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

PARAM_MAX = 6000  # MLflow's limit on a param value


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``; bare paths become sqlite URIs."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if "://" not in uri and not uri.startswith("databricks"):
        p = Path(uri).expanduser().resolve()
        if p.suffix == ".db":
            return f"sqlite:///{p}"
        return p.as_uri()
    return uri


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def get_or_create_experiment(cl, name: str) -> str:
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            cl.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return cl.create_experiment(name)


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= PARAM_MAX else s[: PARAM_MAX - 3] + "..."


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numeric, finite entries only (MLflow rejects NaN on some stores)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            continue
        f = float(v)
        if math.isfinite(f):
            out[k] = f
    return out


class RunLogger:
    """A thin, explicit handle on one MLflow run (no global active-run state).

    Safe to use for many runs at once from one process, which is how the search driver
    logs its trials.
    """

    def __init__(self, tracking_uri: str | None, experiment: str, *, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
                 run_id: str | None = None):
        self.uri = resolve_tracking_uri(tracking_uri)
        self.client = client(self.uri)
        self.experiment_id = get_or_create_experiment(self.client, experiment)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id

    # -- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i: i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step or 0) for k, v in finite_metrics(metrics).items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i: i + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, _param_value(v))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_model(self, net: Any, input_example: np.ndarray, name: str = "model",
                  registered_model_name: str | None = None) -> str:
        """Log ``net`` as an MLflow PyTorch model (torch.export 'pt2' program); returns its model URI."""
        return log_torch_model(self.uri, self.run_id, net, input_example, name, registered_model_name)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def log_torch_model(tracking_uri: str, run_id: str, net: Any, input_example: np.ndarray,
                    name: str = "model", registered_model_name: str | None = None) -> str:
    """Log ``net`` (in eval mode, on CPU) into ``run_id``; returns ``models:/<model_id>``.

    MLflow 3 saves a torch.export program by default: it needs an input example and a
    model in eval mode; loading gives a GraphModule (no pickle).
    """
    import mlflow
    import mlflow.pytorch
    import torch

    net = net.to("cpu").eval()
    mlflow.set_tracking_uri(tracking_uri)
    reqs = [f"torch=={torch.__version__.split('+')[0]}", "numpy"]
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        info = mlflow.pytorch.log_model(
            net, name=name, input_example=np.asarray(input_example, dtype=np.float32),
            pip_requirements=reqs, registered_model_name=registered_model_name,
        )
    return info.model_uri

