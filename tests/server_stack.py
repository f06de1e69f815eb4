"""A real team tracking stack for the tests: PostgreSQL (initdb + pg_ctl in a temp dir, a free loopback
port) and ``mlflow server --app-name basic-auth`` on it, started through :mod:`scoretune.tracking.server`
(the code ``scoretune server`` runs) and stopped by pid. Plus the search subprocesses that use it."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scoretune.tracking.server import MlflowServer, Postgres, free_port

ADMIN = "admin"


@dataclass
class Stack:
    root: Path
    pg: Postgres
    password: str
    secret_key: str
    servers: list[MlflowServer] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The server's environment: the admin password and Flask key come from here only."""
        return {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": self.password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key}

    @property
    def client_env(self) -> dict[str, str]:
        """What a user exports to log to the server (and scoretune launch passes on to a job)."""
        return {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": self.password}

    def launch(self, database: str, port: int | None = None, workers: int = 2) -> MlflowServer:
        """An MLflow server on ``database`` (and ``<database>_auth``), launched, not yet waited for."""
        for db in (database, f"{database}_auth"):
            self.pg.create_database(db)
        srv = MlflowServer(self.pg.uri(database), self.pg.uri(f"{database}_auth"), self.root / database,
                           port=port or free_port(), workers=workers)
        srv.launch(self.env, self.pg.env())
        self.servers.append(srv)
        return srv

    def restart(self, srv: MlflowServer) -> MlflowServer:
        """The same server (database, port, settings) started again after a crash."""
        again = MlflowServer(srv.backend_uri, srv.auth_db_uri, srv.state_dir, host=srv.host, port=srv.port,
                             workers=srv.workers)
        again.launch(self.env, self.pg.env())
        self.servers.append(again)
        return again

    def client(self, srv: MlflowServer):
        from mlflow.tracking import MlflowClient

        return MlflowClient(srv.url)

    def stop(self) -> None:
        for srv in self.servers:
            srv.kill()  # by its process group's pid; nothing to save in a test server
        self.pg.stop()


def start_stack() -> Stack:
    root = Path(tempfile.mkdtemp(prefix="st-srv-", dir="/tmp"))  # short path; PostgreSQL's socket must fit
    os.chmod(root, 0o711)  # as root, PostgreSQL runs as 'postgres' and must pass through
    pg = Postgres(root / "pg" / "data")
    pg.init()
    pg.start(fast=True)
    return Stack(root=root, pg=pg, password=secrets.token_urlsafe(18), secret_key=secrets.token_hex(32))


def remove(stack: Stack) -> None:
    stack.stop()
    shutil.rmtree(stack.root, ignore_errors=True)


# ----------------------------------------------------------------------------- searches against it
EPOCHS = 3


EXPERIMENT = "team"


def space_file(tmp: Path, name: str, url: str, *, trials: int, concurrent: int, **fields) -> Path:
    """A tiny search: digits, small CNN, 1-step attacks, ``EPOCHS`` epochs, half a CPU per trial (so 4 run
    at once on the 2 CPUs of a local Ray), no models or AutoAttack at the end (unless ``fields``, top-level
    space fields, say otherwise); every search of the tests logs into one experiment, as a team's searches do."""
    raw = {"name": name, "experiment": EXPERIMENT,
           "base": {"data": {"name": "digits", "val_size": 0.1}, "model": {"name": "small_cnn"},
                    "attack": {"eps": 0.1, "steps": 1}, "eval": {"pgd_steps": 1, "max_samples": 64, "test": False},
                    "epochs": EPOCHS, "batch_size": 128, "device": "cpu"},
           "params": {"lr": {"loguniform": [0.05, 0.3]}, "beta": {"uniform": [1.0, 6.0]}},
           "num_samples": trials, "max_concurrent": concurrent, "top_k": 0, "scheduler": {"type": "none"},
           "resources": {"workers": 1, "cpus": 0.5, "gpus": 0},
           "autoattack": {"version": "none"}, "storage_path": str(tmp / "ray"), "tracking_uri": url, **fields}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_search(space: Path, log: Path, env: dict[str, str], **extra_env: str) -> subprocess.Popen:
    """``scoretune search SPACE`` as a user runs it (its own local Ray), output in ``log``."""
    full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    full.update({**env, **extra_env, "PYTHONUNBUFFERED": "1"})
    return subprocess.Popen([sys.executable, "-m", "scoretune.cli", "search", str(space)], cwd=space.parent,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=full, start_new_session=True)


def stop_search(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def has_epoch(cl, experiment: str, name: str) -> bool:
    """Whether some trial of search ``name`` in ``experiment`` has logged an epoch (the experiment holds
    other searches' runs too); False while the server does not answer."""
    try:
        exp = cl.get_experiment_by_name(experiment)
        return bool(exp and cl.search_runs([exp.experiment_id], f"tags.`scoretune.search_name` = '{name}' and "
                                           "metrics.epoch >= 1", max_results=1))
    except Exception:
        return False


def kill_at_first_epoch(servers: dict, experiment: str, timeout: float, procs=()) -> dict[str, float]:
    """``servers``: search name -> (client, MLflowServer). Kill each server as soon as its own search has
    logged an epoch, watching them all at once (one search must not run to its end while the test waits
    for another); returns search name -> time.monotonic() of the kill."""
    killed: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(killed) < len(servers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no epoch of {sorted(set(servers) - set(killed))} logged within {timeout:.0f} s")
        assert all(p.poll() is None for p in procs), "a search ended before its server was killed"
        for name, (cl, srv) in servers.items():
            if name not in killed and has_epoch(cl, experiment, name):
                srv.kill()
                killed[name] = time.monotonic()
        time.sleep(0.3)
    return killed


def search_runs(cl, experiment: str, name: str):
    """``(parents, children)`` of search ``name``: its parent runs, and the child runs of the first."""
    from mlflow.entities import ViewType

    exp = cl.get_experiment_by_name(experiment)
    runs = cl.search_runs([exp.experiment_id], f"tags.`scoretune.search_name` = '{name}'",
                          run_view_type=ViewType.ALL, max_results=500)
    parents = [r for r in runs if r.data.tags.get("scoretune.kind") == "search"]
    children = [r for r in runs if parents and r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents, children
