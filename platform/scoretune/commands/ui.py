"""``scoretune ui``: the MLflow UI for the tracking store, on 127.0.0.1."""

from __future__ import annotations

import argparse

HELP = "open the MLflow UI (runs, metrics, plots, registered models) on http://127.0.0.1:PORT"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; use an SSH tunnel to share)")
    p.add_argument("--print-command", action="store_true", help="print the mlflow command instead of running it")


def ui_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line for a store."""
    import sys

    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port)]


def run(args: argparse.Namespace) -> int:
    import os

    from ..errors import UserError
    from ..tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):
        print(f"{uri} is an MLflow server already: open it in a browser")
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
    print(f"MLflow UI for {uri} on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    # MLflow's background job runner (GenAI evaluation jobs) is not needed to browse runs and models
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(cmd[0], cmd)  # this process becomes `mlflow ui`: signals reach it (and its workers) directly
    return 0  # pragma: no cover
