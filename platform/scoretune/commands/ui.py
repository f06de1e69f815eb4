"""``scoretune ui``: the MLflow UI for the tracking store, on 127.0.0.1, with deep links to a search.

It prints (``--open``: opens) a link into the model-training view of the newest search (or
``--search NAME``): its trials' runs table sorted by the best objective, with the searched params,
the best-epoch metrics and the stop reasons as columns (the run names start with the status:
``[asha@3]``, ``[floor@7]``, ``[diverged]``); the parent run, whose description is the summary
table; the Chart view of the top-k trials; the logged models; the registered model of the search
(once promoted), else the Model Registry. See :mod:`scoretune.tracking.ui_links`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..tracking.ui_links import SearchLinks

HELP = "open the MLflow UI (runs, metrics, plots, registered models) on http://127.0.0.1:PORT"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; use an SSH tunnel to share)")
    p.add_argument("--search", default=None, help="the search to link to (default: the newest one in the store)")
    p.add_argument("--top-k", type=int, default=3, help="trials on the compare page (default 3)")
    p.add_argument("--open", action="store_true", help="open the search's link in a browser once the UI is up")
    p.add_argument("--print-command", action="store_true", help="print the mlflow command instead of running it")


def ui_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line for a store."""
    import sys

    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port)]


def find_links(uri: str, base_url: str, search: str | None, top_k: int) -> SearchLinks | None:
    """The search's links (publishing its view on the experiment); None when the store has no search yet.
    A ``--search`` that names no search is a UserError (raised before anything is printed)."""
    from ..errors import UserError
    from ..tracking import client
    from ..tracking.ui_links import search_links

    links = search_links(client(uri), base_url, search=search, top_k=top_k)
    if links is None and search:
        raise UserError(f"--search: no search named '{search}' in {uri} (scoretune ui without --search "
                        "links the newest one)")
    return links


def print_links(links: SearchLinks | None, base_url: str) -> str | None:
    """Print the links of :func:`find_links`; returns the runs-table link."""
    if links is None:
        print(f"{base_url}/#/?workflowType=machine_learning  (no search in this store yet)")
        return None
    print(f"search '{links.search}': trials best first, with params, best-epoch metrics and stop reasons:")
    print(f"  {links.runs}")
    print(f"  summary (parent run):  {links.parent}")
    if links.compare:
        print(f"  compare the top {len(links.top)}:     {links.compare}")
    print(f"  logged models:         {links.logged_models}")
    # the promoted model's page, else (nothing of this search promoted yet) the registry's list
    print(f"  {'registered model: ' if links.promoted else 'registered models:'}     {links.models}")
    return links.runs


def _open_when_up(url: str, host: str, port: int) -> None:
    """A detached helper process that opens ``url`` in a browser once the server answers."""
    import subprocess
    import sys

    code = ("import socket,time,webbrowser,sys\n"
            "for _ in range(240):\n"
            "    try:\n"
            f"        socket.create_connection(({host!r}, {port}), timeout=1).close(); break\n"
            "    except OSError: time.sleep(0.5)\n"
            f"webbrowser.open({url!r})\n")
    subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(args: argparse.Namespace) -> int:
    import os

    from ..errors import UserError
    from ..tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):
        links = find_links(uri, uri, args.search, args.top_k)
        print(f"{uri} is an MLflow server already: open it in a browser")
        print_links(links, uri)
        return 0
    if uri.startswith("sqlite:///"):
        from pathlib import Path

        db = Path(uri[len("sqlite:///"):])
        if not db.exists():
            raise UserError(f"no MLflow store at {db}: run a search or a training first, or pass --tracking-uri")
    cmd = ui_command(uri, args.host, args.port)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{shown}:{args.port}"
    links = find_links(uri, base, args.search, args.top_k)  # a bad --search fails before the header is printed
    print(f"MLflow UI for {uri} on {base} (Ctrl-C to stop)", flush=True)
    link = print_links(links, base)
    print("", flush=True)
    if args.open and link:
        _open_when_up(link, shown, args.port)
    # MLflow's background job runner (GenAI evaluation jobs) is not needed to browse runs and models
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(cmd[0], cmd)  # this process becomes `mlflow ui`: signals reach it (and its workers) directly
    return 0  # pragma: no cover
