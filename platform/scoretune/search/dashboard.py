"""Serving a search's Optuna study with optuna-dashboard (``scoretune dashboard``), on 127.0.0.1.

:func:`find_storage` finds the study storage the way the search chose it; :func:`serve` checks the port
first (a port in use is one error line naming it) and runs optuna-dashboard's server in this process,
so stopping this process (Ctrl-C, or its PID) stops the dashboard.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import unquote

from ..errors import UserError
from ..tracking import resolve_tracking_uri, tags
from .study_storage import open_storage, study_storage_url


class DashboardError(UserError):
    """The dashboard cannot start: no study storage, an unknown search, a port in use."""


def find_storage(*, search: str | None, storage: str | None, tracking_uri: str | None) -> tuple[str, str]:
    """(storage URL, a note line or '')."""
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
        from .study_storage import study_exists

        if study_exists(storage, search):
            path = f"dashboard/studies/{storage.get_study_id_from_name(search)}"
    print(f"optuna-dashboard for {url} on http://{host}:{port}/{path} (Ctrl-C to stop)", flush=True)
    run_server(storage, host=host, port=port)
