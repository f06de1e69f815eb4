"""The one training driver: ``scoretune train`` in this process, or on Ray Train workers.

    summary = train(cfg)                          # in this process
    summary = train(cfg, workers=4, address=...)  # Ray Train DDP (see :mod:`scoretune.drivers.ray_train`)

Both go through :class:`~scoretune.drivers.training_run.TrainingRun` (the MLflow run, the epoch table,
failure handling, the final checkpoint and model).
"""

from __future__ import annotations

from typing import Any

from ..engine import selection_metric
from ..names import inside, validate_name
from .training_run import Out, TrainingRun


def with_workers(cfg: Any, workers: int | None) -> Any:
    """``cfg`` with ``scaling.workers`` overridden by ``--workers`` (the global batch is unchanged)."""
    from ..config import build_config
    from ..errors import UserError

    if workers is None:
        return cfg
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers must be an integer >= 1, got {workers!r}")
    data = cfg.model_dump()
    data["scaling"]["workers"] = int(workers)
    return build_config(data, source="--workers")


def train(cfg: Any, *, workers: int | None = None, address: str | None = None, tracking_uri: str | None = None,
          experiment: str | None = None, resume: bool = False, use_mlflow: bool = True, stopper: Any = None,
          out: Out = print) -> dict[str, Any]:
    """Train ``cfg``: in this process, or (``workers`` given) on Ray Train workers; returns a summary
    (best row, epochs, stop reason, MLflow run id and model URI, checkpoint paths)."""
    validate_name(cfg.name, flag="name")
    if use_mlflow:  # a store scoretune refuses (e.g. in memory) is said before any work
        from ..tracking import resolve_tracking_uri

        resolve_tracking_uri(tracking_uri)
    cfg = resolve_auto_floor(cfg, out)
    if workers is not None:
        from .ray_train import train_on_ray

        return train_on_ray(with_workers(cfg, workers), address=address, tracking_uri=tracking_uri,
                            experiment=experiment, use_mlflow=use_mlflow, resume=resume, out=out)
    return train_in_process(cfg, tracking_uri=tracking_uri, experiment=experiment, resume=resume,
                            use_mlflow=use_mlflow, stopper=stopper, out=out)


def resolve_auto_floor(cfg: Any, out: Out = print) -> Any:
    """``cfg`` with ``early_stop.floor: auto`` / ``objective.clip: auto`` estimated
    (:func:`scoretune.floor_estimate.resolve_auto`; proxies cached under ``output_dir/floor_cache``)."""
    from pathlib import Path

    from ..floor_estimate import needs_floor, resolve_auto

    if not needs_floor(cfg):
        return cfg
    cfg, _ = resolve_auto(cfg, cache_dir=Path(cfg.output_dir).expanduser() / "floor_cache", out=out)
    return cfg


def train_in_process(cfg: Any, *, tracking_uri: str | None = None, experiment: str | None = None,
                     resume: bool = False, use_mlflow: bool = True, stopper: Any = None,
                     out: Out = print) -> dict[str, Any]:
    """The engine in this process. Every epoch writes ``last.pt`` (and ``best.pt`` when the validation
    robust accuracy improves) under ``cfg.output_dir/cfg.name``; ``stopper`` (default: from
    ``cfg.early_stop``) has ``should_stop(row) -> bool`` and ``reason``."""
    from ..engine import Trainer
    from ..stopping import build_stopper, replay_history

    run_dir = inside(cfg.output_dir, cfg.name)
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    stopper = stopper if stopper is not None else build_stopper(cfg.early_stop)
    trainer = Trainer(cfg)
    continuing = bool(resume and last.exists())
    if continuing:
        trainer.resume(last)
        out(f"resumed from {last} at epoch {trainer.epoch + 1}")
    with TrainingRun(cfg, str(run_dir), tracking_uri=tracking_uri, experiment=experiment, use_mlflow=use_mlflow,
                     continuing=continuing, out=out) as run:
        run.table.add(trainer.history)
        status = replay_history(stopper, trainer.history) or "completed"
        while trainer.epoch < cfg.epochs and status == "completed":
            row = trainer.train_one_epoch()
            trainer.save(last)
            if selection_metric(row) > run.table.best_score:  # the best epoch so far: keep its checkpoint
                trainer.save(best)
            run.table.add([row])
            if stopper is not None and stopper.should_stop(row):
                status = stopper.reason or "early_stopped"
                out(f"early stop after epoch {trainer.epoch}: {status}")
        summary = run.finish(status, best if best.exists() else last)
    return {**summary, "last": str(last), "best_checkpoint": str(best)}
