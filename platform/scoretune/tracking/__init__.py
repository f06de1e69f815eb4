"""MLflow at the edge: one writer (the driver process) logs runs through ``MlflowClient``.

The default store is a SQLite file ``mlflow.db`` in the working directory; a tracking URI
from ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` overrides it (a file path, a
``sqlite:///`` URI or an ``http://`` MLflow server).

Fail fast, and safely:

* An ``http(s)://`` server is probed with one TCP connect (5 s) before the first client for it is
  made; an unreachable one is a one-line :class:`TrackingUnreachable` naming the URI. Then one read
  request with the credentials MLflow sends (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``
  from the environment, as ``scoretune launch`` passes them to a job): a server with authentication
  (``--app-name basic-auth``) that refuses them is a one-line :class:`TrackingAuthError`.
* Writes that must survive a server outage go through :mod:`scoretune.tracking.buffer`. MLflow's own
  retries are bounded (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 2, backoff factor 1, timeout 30 s, set
  with ``os.environ.setdefault`` at import, so a user's own settings win) instead of ~5 minutes.
* The first client of a local SQLite store is created under a file lock on ``<db>.lock``, so
  processes starting together on a new file do not race on its schema (alembic "table already
  exists"); :func:`get_or_create_experiment` tolerates another process creating the experiment.
* :func:`forbid_pickle` sets ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``: nothing loaded from a
  store is unpickled (see :mod:`scoretune.tracking.model_refs`).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

import numpy as np

from ..errors import UserError

PARAM_MAX = 6000  # MLflow's limit on a param value
CONNECT_TIMEOUT_S = 5.0
for _k, _v in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}.items():
    os.environ.setdefault(_k, _v)
_REACHED: set[str] = set()


class TrackingUnreachable(UserError):
    """The MLflow tracking server does not answer."""


class TrackingStoreError(UserError):
    """A tracking store scoretune refuses to log to (e.g. one that keeps nothing)."""


class TrackingAuthError(UserError):
    """The MLflow tracking server refuses this client's credentials (HTTP 401/403)."""


def forbid_pickle() -> None:
    """Make MLflow refuse pickle deserialization (its default in 3.x allows it)."""
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"


def mlflow_error(e: BaseException) -> str:
    """The first line of an MLflow error (at most 200 characters)."""
    msg = str(getattr(e, "message", None) or e).strip().splitlines()
    return msg[0][:200] if msg else type(e).__name__


def unreachable_hint(uri: str, reason: str) -> str:
    return (f"cannot reach the MLflow tracking server at {uri} ({reason}); start it (mlflow server / "
            "scoretune ui) or pass --tracking-uri (or MLFLOW_TRACKING_URI) naming a running server or a "
            "sqlite:///PATH.db store")


def check_reachable(uri: str) -> None:
    """For an ``http(s)://`` URI: one TCP connect within ``CONNECT_TIMEOUT_S``, else :class:`TrackingUnreachable`."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or uri in _REACHED:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or type(e).__name__)
        raise TrackingUnreachable(unreachable_hint(uri, reason)) from None
    check_credentials(uri)
    _REACHED.add(uri)


def check_credentials(uri: str) -> None:
    """One read request to an ``http(s)://`` server with the credentials MLflow will send
    (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``); a server with
    authentication (``mlflow server --app-name basic-auth``) that answers 401/403 is a one-line
    :class:`TrackingAuthError` naming the variables, not a failure at the first write."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        resp = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                            max_retries=0, timeout=10, raise_on_status=False, params={"max_results": 1})
    except Exception:  # noqa: BLE001 - reachability was checked; the first real request will say more
        return
    if resp.status_code in (401, 403):
        who = os.environ.get("MLFLOW_TRACKING_USERNAME")
        what = (f"refused user {who!r} (HTTP {resp.status_code}): check MLFLOW_TRACKING_PASSWORD" if who else
                f"requires a login (HTTP {resp.status_code}): export MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (scoretune launch passes them on to the cluster job)")
        raise TrackingAuthError(f"the MLflow server at {masked(uri)} {what}")


def uri_has_credentials(uri: str | None) -> bool:
    """Whether ``uri`` carries a user name or password (``http://user:pw@host``, ``postgresql://u:p@h/db``)."""
    if not uri or "://" not in uri:
        return False
    try:
        parts = urlsplit(uri)
        return bool(parts.username or parts.password)
    except ValueError:  # e.g. a port out of range
        return "@" in uri.split("://", 1)[1].split("/", 1)[0]


def masked(uri: str) -> str:
    """``uri`` with its credentials replaced by ``***`` (``http://***@host:5000``): what messages and logs show."""
    if not uri_has_credentials(uri):
        return uri
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if rest in ("", ":memory:") else Path(rest)


@contextlib.contextmanager
def file_lock(path: Path | None) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (created with its folder) for the block; None: no lock.
    Processes that open one SQLite store (MLflow's, Optuna's) at once take it, so one creates the tables."""
    if path is None:
        yield
        return
    import filelock

    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path)):
        yield


def store_lock(uri: str) -> contextlib.AbstractContextManager[None]:
    """:func:`file_lock` on ``<db>.lock`` next to a local SQLite store (no lock otherwise)."""
    db = sqlite_path(uri)
    return file_lock(None if db is None else db.with_name(db.name + ".lock"))


def in_memory_store(uri: str) -> bool:
    """Whether ``uri`` is an SQLite database that lives in memory (``sqlite://``, ``sqlite:///``,
    ``sqlite:///:memory:``, a ``mode=memory`` URI): everything logged there is gone when the process exits."""
    parts = urlsplit(uri)
    if parts.scheme.split("+", 1)[0] != "sqlite":
        return False
    path = uri.split("://", 1)[1].split("?", 1)[0].lstrip("/")
    return path in ("", ":memory:") or path.startswith("file::memory:") or "mode=memory" in uri


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``; bare paths become sqlite URIs.
    An in-memory SQLite store is refused (:class:`TrackingStoreError`): the runs would vanish at exit."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return check_store_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    if in_memory_store(uri):
        raise TrackingStoreError(f"tracking URI {uri!r} is an in-memory SQLite store: every run logged there is lost "
                                 "when the process exits; give a file, e.g. sqlite:///mlflow.db")
    if "://" not in uri and not uri.startswith("databricks"):
        p = Path(uri).expanduser().resolve()
        if p.suffix == ".db":
            return check_store_uri(f"sqlite:///{p}")
        return p.as_uri()
    return check_store_uri(uri)


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_store_uri(uri: str) -> str:
    """``uri``, unless it cannot name a store (:class:`TrackingStoreError`, one line): a server URI whose port is
    out of range, or a local SQLite store whose file exists but is not an SQLite database."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        try:
            parts.port
        except ValueError:
            raise TrackingStoreError(f"tracking URI {masked(uri)!r}: its port is not a port (1-65535); pass "
                                     "--tracking-uri (or MLFLOW_TRACKING_URI) naming the server, e.g. "
                                     "http://localhost:5000") from None
    db = sqlite_path(uri)
    if db is not None and db.is_file():
        try:
            with db.open("rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as e:
            raise TrackingStoreError(f"the MLflow store {db} cannot be read ({e.strerror or type(e).__name__}); "
                                     "check its permissions or pass --tracking-uri naming another store") from None
        if head and head != SQLITE_MAGIC:
            raise TrackingStoreError(f"the MLflow store {db} (tracking URI {uri}) is not an SQLite database: move the "
                                     "file away, or pass --tracking-uri naming a store (e.g. sqlite:///mlflow.db)")
    return uri


def check_artifacts_writable(cl: Any, experiment_id: str) -> None:
    """Refuse (:class:`TrackingStoreError`, one line) an experiment whose local artifact folder (MLflow's
    default: ``mlruns`` in the folder where the experiment was created) cannot be written, before a run is
    created: otherwise the run dies at its first artifact and is left RUNNING. Remote locations (``s3://``,
    a server's ``mlflow-artifacts:``) are the store's to check."""
    from urllib.parse import unquote

    location = cl.get_experiment(experiment_id).artifact_location or ""
    parts = urlsplit(location)
    if parts.scheme not in ("", "file"):
        return
    path = Path(unquote(parts.path) if parts.scheme == "file" else location).expanduser()
    try:  # a real write, not os.access: right for root, read-only mounts and paths through a file
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".scoretune-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrackingStoreError(
            f"MLflow's artifact folder {path} is not writable ({e.strerror or type(e).__name__}): run in a writable "
            "folder, or pass --tracking-uri a store in one (e.g. sqlite:////tmp/scoretune/mlflow.db)") from None


def client(uri: str | None = None, *, registry_uri: str | None = None):
    """An ``MlflowClient`` for ``uri``: a server is probed first (:func:`check_reachable`), a local
    SQLite store is opened (and its schema created) under :func:`store_lock`."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(uri)
    check_reachable(uri)
    with store_lock(uri):
        return MlflowClient(tracking_uri=uri, registry_uri=registry_uri)


def get_or_create_experiment(cl, name: str) -> str:
    """The id of experiment ``name`` (restored if deleted), created if missing; when another process
    creates it at the same time, its experiment is used."""
    from mlflow.exceptions import MlflowException

    for attempt in range(5):
        exp = cl.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                cl.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return cl.create_experiment(name)
        except MlflowException:
            if attempt == 4:  # not a lost race: the experiment still does not exist
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def param_value(v: Any) -> str:
    """``v`` as an MLflow param value (at most ``PARAM_MAX`` characters)."""
    s = str(v)
    return s if len(s) <= PARAM_MAX else s[: PARAM_MAX - 3] + "..."




def finite(v: Any) -> bool:
    """A real, finite number: an int or float (numpy's too), not a bool, not NaN or inf."""
    return (isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, (bool, np.bool_))
            and math.isfinite(float(v)))


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries as floats (MLflow rejects NaN on some stores)."""
    return {k: float(v) for k, v in metrics.items() if finite(v)}


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
        check_artifacts_writable(self.client, self.experiment_id)
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
        self.client.log_batch(self.run_id, params=[Param(k, param_value(v)) for k, v in params.items()
                                                   if k not in existing])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step or 0)
                                                    for k, v in finite_metrics(metrics).items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, param_value(v))

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

