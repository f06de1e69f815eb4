"""``scoretune report --search NAME``: a paper-style table of a search from MLflow.

Trials that differ only in the params left out of ``--by`` (by default only ``seed``) form one row;
each column is mean ± std (n) over them: clean accuracy (the AutoAttack evaluation's, else validation
at the best epoch), PGD (the best-epoch objective) and AutoAttack accuracy. ``--stage confirm`` tables
the confirmation stage's runs instead of the search's.
"""

from __future__ import annotations

import argparse

HELP = "print a paper-style table of a search (configurations over seeds: mean ± std) from MLflow"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search", required=True, help="the search name (as given to `scoretune search`)")
    p.add_argument("--by", default=None,
                   help="comma-separated params that make a row (default: every searched param except seed)")
    p.add_argument("--stage", default="search", choices=("search", "confirm"),
                   help="the search's trials (default) or its confirmation stage's runs (`confirm:` in the space)")
    p.add_argument("--format", default="md", choices=("md", "csv", "latex"), help="table format (default md)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..search.report import SEED, format_groups, group_by_config
    from ..tracking import client, resolve_tracking_uri
    from ..tracking.runs import find_parent_runs, search_trials

    uri = resolve_tracking_uri(args.tracking_uri)
    cl = client(uri)
    parents = find_parent_runs(cl, args.search)
    if not parents:
        raise UserError(f"--search: no search '{args.search}' in {uri} (pass --tracking-uri, or run "
                        "`scoretune ui` to list the searches)")
    trials = search_trials(cl, parents[0], args.stage)
    searched = sorted({k for t in trials for k in t["point"]})
    by = [b.strip() for b in args.by.split(",") if b.strip()] if args.by else [k for k in searched if k != SEED]
    unknown = [b for b in by if b not in searched]
    if unknown:
        raise UserError(f"--by: {', '.join(unknown)} is not a searched param of '{args.search}' "
                        f"(searched: {', '.join(searched) or 'none'})")
    if not trials:
        raise UserError(f"--search: search '{args.search}' has no finished {'confirmation run' if args.stage == 'confirm' else 'trial'} yet"
                        + (" (add confirm: to its space to run a confirmation stage)" if args.stage == "confirm" else ""))
    print(format_groups(group_by_config(trials, by), by, args.format))
    return 0
