"""``scoretune train CONFIG.yaml``: one adversarial training, with checkpoints and MLflow logging."""

from __future__ import annotations

import argparse

HELP = "train one model (single process, or Ray Train with --workers) and log it to MLflow"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (defaults: digits, small CNN, TRADES-SE)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set objective.beta=4 --set data.name=toy")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db in the working dir)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the config's name)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/NAME/last.pt if it exists")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--workers", type=int, default=None,
                   help="run through Ray Train on N workers (DDP); without it training runs in this process")
    p.add_argument("--address", default=None,
                   help="Ray cluster to use with --workers: 'auto', ray://host:10001 or host:port")
    p.add_argument("--early-stop", choices=["none", "floor"], default=None,
                   help="early-stopping rule (overrides early_stop.rule): 'floor' stops once train_r_madry "
                        "(the robust CE at the CE-PGD point) stays below --floor for --patience epochs "
                        "(SCORE Corollary 1)")
    p.add_argument("--floor", type=floor_arg, default=None, metavar="F|auto",
                   help="the floor (C^l1)^2/2 (overrides early_stop.floor): a number from `scoretune bound`, or "
                        "'auto': estimated before training (exact for the toy, else a short proxy training at "
                        "this eps, cached under OUTPUT_DIR/floor_cache)")
    p.add_argument("--patience", type=int, default=None, metavar="N",
                   help="epochs below the floor before stopping (overrides early_stop.patience)")
    p.add_argument("--refine-floor", dest="refine", action="store_const", const="true", default=None,
                   help="refine the floor during training from the model of best val_pgd_acc so far: "
                        "min(floor, val_c_l1^2/2) (sets early_stop.refine)")


def floor_arg(text: str) -> str:
    """--floor: 'auto' or a finite number >= 0 (argparse type)."""
    import math

    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--floor takes a number >= 0 or 'auto', got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"--floor takes a finite number >= 0 or 'auto', got {text!r}")
    return text


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..drivers.train import train

    cfg = load_config(args.config, list(args.set) + early_stop_overrides(args))
    train(cfg, workers=args.workers, address=args.address, tracking_uri=args.tracking_uri,
          experiment=args.experiment, resume=args.resume, use_mlflow=not args.no_mlflow)
    return 0


def early_stop_overrides(args: argparse.Namespace) -> list[str]:
    """``--early-stop/--floor/--patience/--refine-floor`` as ``--set`` overrides (applied after the user's
    ``--set``)."""
    out = []
    for flag, key in (("early_stop", "rule"), ("floor", "floor"), ("patience", "patience"), ("refine", "refine")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"early_stop.{key}={value}")
    return out
