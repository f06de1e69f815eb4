"""``scoretune dashboard``: optuna-dashboard on a search's Optuna study, on 127.0.0.1.

The study storage is found as the search keeps it (:mod:`scoretune.search.study_storage`): ``--storage``,
else the ``scoretune.optuna_storage`` tag of search ``--search NAME``'s parent run, else the SQLite file
beside the MLflow store. It shows a running search live (trials, intermediate values, importance,
Pareto front) and a finished one after it ends.
"""

from __future__ import annotations

import argparse

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
    from ..search.dashboard import find_storage, serve

    url, note = find_storage(search=args.search, storage=args.storage, tracking_uri=args.tracking_uri)
    if note:
        print(note)
    serve(url, host=args.host, port=args.port, search=args.search)
    return 0
