"""``scoretune sync FILE``: replay a tracking journal into MLflow.

A search whose MLflow server did not come back finishes anyway and keeps every write it could not
deliver in a journal (``<ray_path>/tracking-journal.jsonl``; the search's last line names it). This
replays it, in order, into ``--tracking-uri`` (default ``$MLFLOW_TRACKING_URI``): into the same server
nothing is doubled (runs are found again by id or by their ``scoretune.write_key`` tag, metrics are
keyed by run, metric, step and timestamp); into a fresh server the experiments and runs are created and
the journal's run ids mapped to the new ones. See :mod:`scoretune.tracking.buffer`.
"""

from __future__ import annotations

import argparse

HELP = "replay a tracking journal (left by a search whose MLflow server was unreachable) into MLflow"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the journal file the search named (e.g. ray_results/NAME/tracking-journal.jsonl)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow server or store to replay into (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to keep retrying while the server does not answer (default 60)")
    p.add_argument("--keep", action="store_true", help="keep the journal after a complete replay (default: delete it)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UserError
    from ..tracking import check_reachable, masked, resolve_tracking_uri
    from ..tracking.buffer import replay_journal

    uri = resolve_tracking_uri(args.tracking_uri)
    check_reachable(uri)
    report = replay_journal(args.file, uri, timeout=args.timeout)
    if report.unsent:
        raise UserError(f"{report.unsent} write(s) of {args.file} did not reach {masked(uri)} within "
                        f"{args.timeout:.0f} s (it stopped answering); run scoretune sync again, nothing is doubled")
    print(f"replayed {report.writes} writes ({report.runs} runs) from {args.file} into {masked(uri)}")
    if report.errors:
        raise UserError(f"MLflow refused {len(report.errors)} write(s) of {args.file}, skipped (first: "
                        f"{report.errors[0]}); the journal is kept for inspection: fix or delete those lines and "
                        "sync again (nothing is doubled)")
    if not args.keep:
        Path(args.file).unlink()
        print(f"deleted {args.file} (everything in it is in MLflow)")
    return 0
