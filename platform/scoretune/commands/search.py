"""``scoretune search SPACE.yaml``: a Ray Tune + Optuna search with early stopping, logged to MLflow."""

from __future__ import annotations

import argparse

HELP = "search beta / lr / loss / clip (Ray Tune + Optuna, ASHA, floor stopper), one MLflow run per trial"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", help="search space YAML (e.g. search_spaces/quickstart.yaml)")
    p.add_argument("--address", default=None,
                   help="Ray cluster: 'auto', host:port or ray://host:10001 (default: a local Ray)")
    p.add_argument("--name", default=None, help="search name (default: the space's name); names the MLflow "
                   "parent run and the Ray results folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search (finished trials are kept, the Optuna study goes on)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: the space's tracking_uri, else sqlite:///mlflow.db)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a space field, e.g. --set num_samples=4 --set base.epochs=2 "
                        "--set params.lr.choice=[0.1,0.05]")
    p.add_argument("--warm-start", default=None, metavar="NAME",
                   help="start the Optuna study from the finished trials of an earlier search NAME (or of the "
                        "searches in MLflow experiment NAME); same as warm_start: {from: NAME} in the space")
    p.add_argument("--num-samples", type=int, default=None, help="number of trials (overrides the space)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once (overrides the space)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..search import format_report, load_space, run_search
    from ..search.study import format_importance

    overrides = list(args.set)
    if args.num_samples is not None:
        overrides.append(f"num_samples={args.num_samples}")
    if args.max_concurrent is not None:
        overrides.append(f"max_concurrent={args.max_concurrent}")
    if args.warm_start is not None:
        overrides.append(f"warm_start.from={json.dumps(args.warm_start)}")
    space = load_space(args.space, overrides)
    if args.resume and overrides:
        print("note: --resume continues the search as it was started; --set/--num-samples/--max-concurrent "
              "are ignored")
    summary = run_search(space, name=args.name, resume=args.resume, tracking_uri=args.tracking_uri,
                         address=args.address, space_text=Path(args.space).read_text())
    if summary is None:
        return 130
    print(format_report(summary, space))
    if summary.importance:
        print(format_importance(summary.importance))
    return 0 if any(t.status != "failed" for t in summary.trials) else 1
