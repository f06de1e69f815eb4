"""``scoretune train CONFIG.yaml``: one adversarial training, with checkpoints and MLflow logging."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

HELP = "train one model (single process, or Ray Train with --workers) and log it to MLflow"

COLUMNS = [
    ("epoch", "epoch", "{:>5.0f}"),
    ("lr", "lr", "{:>8.4f}"),
    ("train_loss", "loss", "{:>7.4f}"),
    ("train_madry_kl", "R_Madry", "{:>7.4f}"),
    ("train_adv_acc", "tr_adv", "{:>6.3f}"),
    ("val_clean_acc", "val_cln", "{:>7.3f}"),
    ("val_pgd_acc", "val_pgd", "{:>7.3f}"),
    ("test_clean_acc", "tst_cln", "{:>7.3f}"),
    ("test_pgd_acc", "tst_pgd", "{:>7.3f}"),
    ("epoch_time", "sec", "{:>6.1f}"),
]


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
                   help="early-stopping rule (overrides early_stop.rule): 'floor' stops once train_madry_kl "
                        "stays below --floor for --patience epochs (SCORE Corollary 1)")
    p.add_argument("--floor", type=float, default=None, metavar="F",
                   help="the floor (C^l1)^2/2 printed by `scoretune bound` (overrides early_stop.floor)")
    p.add_argument("--patience", type=int, default=None, metavar="N",
                   help="epochs below the floor before stopping (overrides early_stop.patience)")


def format_header() -> str:
    return " ".join(f"{title:>{len(fmt.format(0.0))}}" for _, title, fmt in COLUMNS)


def format_row(row: dict[str, Any]) -> str:
    cells = []
    for key, title, fmt in COLUMNS:
        width = len(fmt.format(0.0))
        v = row.get(key)
        cells.append(fmt.format(v) if isinstance(v, (int, float)) else f"{'-':>{width}}")
    return " ".join(cells)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config

    cfg = load_config(args.config, list(args.set) + early_stop_overrides(args))
    if args.workers is not None:
        from ..errors import UserError

        try:
            from trainables.train_loop import run_distributed
        except ImportError as e:  # pragma: no cover - the module ships with the package
            raise UserError(f"Ray Train support is not installed: {e}") from None
        return run_distributed(cfg, args)
    from ..stopping import build_stopper

    train_single_process(cfg, tracking_uri=args.tracking_uri, experiment=args.experiment,
                         resume=args.resume, use_mlflow=not args.no_mlflow, stopper=build_stopper(cfg.early_stop))
    return 0


def early_stop_overrides(args: argparse.Namespace) -> list[str]:
    """``--early-stop/--floor/--patience`` as ``--set`` overrides (applied after the user's ``--set``)."""
    out = []
    for flag, key in (("early_stop", "rule"), ("floor", "floor"), ("patience", "patience")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"early_stop.{key}={value}")
    return out


def train_single_process(
    cfg: Any,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    resume: bool = False,
    use_mlflow: bool = True,
    out: Callable[[str], None] = print,
    stopper: Any = None,
) -> dict[str, Any]:
    """Train ``cfg`` in this process; returns a summary (best row, paths, MLflow run id).

    Every epoch writes ``last.pt`` (and ``best.pt`` when the validation robust accuracy
    improves) under ``cfg.output_dir/cfg.name``; a failure (e.g. NaN loss) marks the MLflow
    run FAILED and leaves the finished epochs' checkpoints in place.
    ``stopper`` (optional) has ``should_stop(row) -> bool`` and ``reason``.
    """
    from ..engine import Trainer, selection_metric
    from ..tracking import RunLogger

    run_dir = Path(cfg.output_dir) / cfg.name
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    trainer = Trainer(cfg)
    if resume and last.exists():
        trainer.resume(last)
        out(f"resumed from {last} at epoch {trainer.epoch + 1}")
    logger = None
    if use_mlflow:
        logger = RunLogger(tracking_uri, experiment or cfg.name, run_name=cfg.name,
                           tags={"scoretune.kind": "train", "scoretune.dataset": cfg.data.name})
        logger.log_params(cfg.flat())
        logger.log_text(cfg.model_dump_json(indent=2), "config.json")
        for i, row in enumerate(trainer.history):  # resumed epochs
            logger.log_metrics(row, step=i + 1)
        out(f"MLflow run {logger.run_id} in {logger.uri}")
    best_score = max((selection_metric(r) for r in trainer.history), default=float("-inf"))
    best_row: dict[str, Any] | None = max(trainer.history, key=selection_metric, default=None)
    stop_reason = "completed"
    out(format_header())
    try:
        while trainer.epoch < cfg.epochs:
            row = trainer.train_one_epoch()
            trainer.save(last)
            score = selection_metric(row)
            if score > best_score:
                best_score, best_row = score, row
                trainer.save(best)
            if logger:
                logger.log_metrics({**row, "best_val_metric": best_score}, step=trainer.epoch)
            out(format_row(row))
            if stopper is not None and stopper.should_stop(row):
                stop_reason = getattr(stopper, "reason", "early_stopped")
                out(f"early stop after epoch {trainer.epoch}: {stop_reason}")
                break
    except BaseException as e:
        if logger:
            logger.set_tags({"scoretune.status": "failed", "scoretune.error": f"{type(e).__name__}: {e}"})
            logger.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if trainer.epoch:
            print(f"kept {trainer.epoch} finished epoch(s) in {last}; rerun with --resume to continue",
                  file=sys.stderr)
        raise
    summary: dict[str, Any] = {"best": best_row, "last": str(last), "best_checkpoint": str(best),
                               "epochs": trainer.epoch, "stop_reason": stop_reason}
    if logger:
        from ..engine import model_from_checkpoint

        logger.set_tags({"scoretune.status": stop_reason})
        logger.log_artifact(best if best.exists() else last, "checkpoints")
        net, _ = model_from_checkpoint(best if best.exists() else last)
        example = next(iter(trainer.val_loader or trainer.test_loader))[0][:2].cpu().numpy()
        summary["model_uri"] = logger.log_model(net, example)
        logger.end("FINISHED")
        summary["run_id"] = logger.run_id
        out(f"logged model {summary['model_uri']} (run {logger.run_id})")
    if best_row:
        out("best epoch {:.0f}: val_clean_acc={:.4f} val_pgd_acc={:.4f}".format(
            best_row["epoch"], best_row.get("val_clean_acc", float("nan")), best_row.get("val_pgd_acc", float("nan"))))
    return summary
