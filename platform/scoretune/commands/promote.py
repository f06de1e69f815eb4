"""``scoretune promote --search NAME``: register a search's best model and give it an alias."""

from __future__ import annotations

import argparse

HELP = "register the best model of a search in the MLflow Model Registry and set an alias (champion)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search", required=True, help="the search name (as given to `scoretune search`)")
    p.add_argument("--metric", default=None,
                   help="rank the search's trials by this metric (any logged metric, e.g. aa_acc); default: the "
                        "confirmation's ranking (mean AutoAttack accuracy, the median seed's model) when the search "
                        "ran one, else val_pgd_acc")
    p.add_argument("--mode", default="max", choices=("max", "min"), help="max (accuracies) or min (losses)")
    p.add_argument("--alias", default="champion", help="the alias to point at the new version (default champion)")
    p.add_argument("--model-name", default=None, help="registered model name (default scoretune-<search>)")
    p.add_argument("--allow-infeasible", action="store_true",
                   help="also consider trials that broke the search's constraints (refused by default)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")


def run(args: argparse.Namespace) -> int:
    from ..tracking.promote import promote

    res = promote(args.search, metric=args.metric, mode=args.mode, alias=args.alias, model_name=args.model_name,
                  tracking_uri=args.tracking_uri, allow_infeasible=args.allow_infeasible)
    print(f"promoted trial {res.trial_id} (run {res.run_id}, {res.metric}={res.value:.4f}) as "
          f"{res.model_name} version {res.version}")
    print(res.uri)
    return 0
