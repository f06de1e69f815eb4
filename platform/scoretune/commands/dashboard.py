"""``scoretune dashboard``: optuna-dashboard on a search's Optuna study, on 127.0.0.1.

The study storage is found as the search keeps it (:mod:`scoretune.search.study`): ``--storage``,
else the ``scoretune.optuna_storage`` tag of search ``--search NAME``'s parent run, else the SQLite file
beside the MLflow store. It shows a running search live (trials, intermediate values, importance,
Pareto front) and a finished one after it ends.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from urllib.parse import unquote

from ..errors import UserError
from ..tracking import resolve_tracking_uri, tags

HELP = "open optuna-dashboard (the searches' Optuna studies, live) on http://127.0.0.1:PORT"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search", default=None, help="the search whose study to show (default: every study in the store)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: the search's, else "
                   "sqlite:///optuna.db beside the MLflow store)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; use an SSH tunnel to share)")


def run(args: argparse.Namespace) -> int:
    url, note = find_storage(search=args.search, storage=args.storage, tracking_uri=args.tracking_uri)
    if note:
        print(note)
    serve(url, host=args.host, port=args.port, search=args.search)
    return 0


class DashboardError(UserError):
    """The dashboard cannot start: no study storage, an unknown search, a port in use."""


def find_storage(*, search: str | None, storage: str | None, tracking_uri: str | None) -> tuple[str, str]:
    """(storage URL, a note line or '')."""
    from ..search.study import study_storage_url

    if storage:
        return storage, ""
    uri = resolve_tracking_uri(tracking_uri)
    if search:
        from ..tracking import client
        from ..tracking.runs import find_parent_runs

        runs = find_parent_runs(client(uri), search)
        if not runs:
            raise DashboardError(f"--search: no search '{search}' in {uri} (run `scoretune status` for the searches, "
                                 "or pass --tracking-uri)")
        url = runs[0].data.tags.get(tags.OPTUNA_STORAGE)
        if not url:
            raise DashboardError(f"--search: search '{search}' kept its Optuna study only inside Ray's experiment "
                                 "folder (it predates the study storage); rerun it to watch it live")
        return url, ""
    url = study_storage_url(uri, "ray_results")
    if url is None:  # pragma: no cover  (a local storage_path always gives one)
        raise DashboardError("--storage: give the Optuna storage URL (the space's study_storage)")
    return url, f"Optuna studies of {uri}: {url}"


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def serve(url: str, *, host: str = "127.0.0.1", port: int = 8080, search: str | None = None) -> None:
    """Run optuna-dashboard on ``url`` until interrupted."""
    from ..search.study import open_storage, study_exists

    if url.startswith("sqlite:///") and not Path(unquote(url[len("sqlite:///"):])).exists():
        raise DashboardError(f"--storage: no Optuna study storage at {url[len('sqlite:///'):]}: run a search first "
                             "(its study is kept there), or pass --storage / --search")
    if not 0 < port < 65536:
        raise DashboardError(f"--port: {port} is not a port number (1-65535)")
    if not port_free(host, port):
        raise DashboardError(f"--port: {port} is already in use on {host}; pass another --port (e.g. --port {port + 1}) "
                             "or stop what listens there")
    from optuna_dashboard import run_server

    storage = open_storage(url)
    path = ""
    if search:
        if study_exists(storage, search):
            path = f"dashboard/studies/{storage.get_study_id_from_name(search)}"
    print(f"optuna-dashboard for {url} on http://{host}:{port}/{path} (Ctrl-C to stop)", flush=True)
    run_server(storage, host=host, port=port)
