"""Distributed adversarial training on Ray Train (Train V2): DDP on any number of workers or nodes,
one checkpoint per epoch, resume, and recovery from worker failures.

* :func:`train_loop_per_worker` runs on every worker: it builds the engine's
  :class:`~scoretune.engine.Trainer` for its rank (the global batch ``cfg.batch_size`` is split
  evenly; the data are sharded by rank so the union of the ranks' k-th batches is the
  single-process k-th batch), wraps the network in DDP for the training forward only (attacks and
  evaluation use the unwrapped network; metric sums are all-reduced once per epoch, so every rank
  holds the same history row), resumes from ``ray.train.get_checkpoint()`` and reports one row and
  one checkpoint (written by rank 0) per epoch.
* :func:`build_torch_trainer` maps ``cfg.scaling`` onto ``ScalingConfig`` / ``RunConfig`` /
  ``FailureConfig`` / ``CheckpointConfig``; Ray Tune trials call it with their own callbacks.
* ``scoretune train CONFIG --workers N`` drives it from :mod:`scoretune.drivers.ray_train`.

Checkpoints (see :mod:`trainables.ray_checkpoint`) live in ``STORAGE/NAME/epoch_XXXX/``.
Ray keeps the ``scaling.num_to_keep`` best by :data:`SCORE_KEY` plus the latest; the best
checkpoint of a finished run is ``result.get_best_checkpoint(SCORE_KEY, "max")``.
Rerunning with the same name and storage path continues from the latest checkpoint.

Workers never import MLflow.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

SCORE_KEY = "selection_score"
"""Reported every epoch: val_pgd_acc (val_clean_acc when no PGD evaluation runs); ranks checkpoints."""

TIME_KEYS = ("train_time", "probe_time", "epoch_time")


# ----------------------------------------------------------------------------- worker side


def ddp_wrapper(device: Any, world_size: int) -> Callable[[Any], Any] | None:
    """The ``Trainer(wrap_model=...)`` hook: DistributedDataParallel when there are several workers."""
    if world_size <= 1:
        return None

    def wrap(net):
        import torch
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return DistributedDataParallel(net, device_ids=[index], output_device=index)
        return DistributedDataParallel(net)

    return wrap


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group)."""
    import torch.distributed as dist

    if not _dist_ready():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sync_times(row: dict[str, float], device: Any) -> None:
    """Replace the per-rank wall times in ``row`` by the slowest rank's (in place), so the row is
    identical on every rank (all other entries are already global means)."""
    import torch
    import torch.distributed as dist

    keys = [k for k in TIME_KEYS if k in row]
    if not keys or not _dist_ready():
        return
    t = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    for k, v in zip(keys, t.cpu().tolist()):
        row[k] = v


def selection_score(row: dict[str, Any]) -> float:
    """:data:`SCORE_KEY` of a row: ``commands.train.selection_metric`` (-1 when there is no val split)."""
    import math

    from scoretune.engine import selection_metric

    score = selection_metric(row)
    return score if math.isfinite(score) else -1.0


def restore(trainer: Any, checkpoint: Any, rank: int, world_size: int) -> None:
    """Load a Ray checkpoint into ``trainer`` on every rank: the same weights/optimiser/schedule/history
    everywhere, and this rank's own attack-RNG stream when the worker count is unchanged (a fresh
    per-rank stream otherwise)."""
    from scoretune.engine import CheckpointError

    from .ray_checkpoint import load_state

    state = load_state(checkpoint, map_location=trainer.device)
    try:
        trainer.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot resume from {checkpoint.path}: it was written for another model/optimiser ({first}); "
            "use another run name, or delete that run folder to start over"
        ) from None
    ranks = state.get("rng_attack_ranks")
    if isinstance(ranks, list) and len(ranks) == world_size:
        trainer.generator.set_state(ranks[rank].cpu())
    else:
        trainer.generator.manual_seed(trainer.cfg.seed * 1000 + rank + 7919 * (trainer.epoch + 1))


def _worker_info(rank: int, device: Any) -> dict[str, Any]:
    import os
    import socket

    import ray

    return {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid(), "device": str(device)}


def train_loop_per_worker(config: dict) -> dict[str, Any]:
    """One Ray Train worker. ``config = {"experiment": cfg.model_dump(), ...}`` (plus optional
    test hooks, see :mod:`trainables.probes`). Returns (rank 0's value is ``result.return_value``)
    ``{"epochs": finished epochs, "stop_reason": "completed" | early-stop reason}``."""
    import ray.train
    import ray.train.torch
    import torch
    from scoretune import threads
    from scoretune.config import ExperimentConfig
    from scoretune.engine import Trainer
    from scoretune.stopping import build_stopper, replay_history

    from .probes import Probe
    from .ray_checkpoint import checkpoint_dir_name, write_checkpoint_dir

    cfg = ExperimentConfig.model_validate(config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        threads.set_torch_threads(cfg.scaling.cpus_per_worker)
    probe = Probe.from_config(config, rank)

    trainer = Trainer(cfg, rank=rank, world_size=world, device=device, wrap_model=ddp_wrapper(device, world))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        restore(trainer, checkpoint, rank, world)
    workers = gather_objects(_worker_info(rank, device))
    probe.started(trainer.epoch, workers[rank]["node_id"])
    stopper = build_stopper(cfg.early_stop)
    stop_reason = replay_history(stopper, trainer.history)

    while trainer.epoch < cfg.epochs and not stop_reason:
        probe.epoch_start(trainer.epoch + 1)
        row = trainer.train_one_epoch()  # the same dict object is trainer.history[-1]
        sync_times(row, device)
        if stopper is not None and stopper.should_stop(row):
            stop_reason = stopper.reason or "early_stopped"
        state = trainer.state_dict()
        state["rng_attack_ranks"] = [s.cpu() for s in gather_objects(trainer.generator.get_state().cpu())]
        metrics = {**row, SCORE_KEY: selection_score(row)}
        with tempfile.TemporaryDirectory(prefix="scoretune-ckpt-", ignore_cleanup_errors=True) as tmp:
            ckpt = None
            if rank == 0:
                write_checkpoint_dir(tmp, state, workers)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(trainer.epoch))
    probe.finished(trainer)
    return {"epochs": trainer.epoch, "stop_reason": stop_reason or "completed"}


# ----------------------------------------------------------------------------- driver side


def resolve_storage_path(path: str | None) -> str:
    """``s3://`` / ``gs://`` / other URIs pass through; local paths become absolute; default ``<cwd>/ray_results``."""
    if path and "://" in path:
        return path
    return str(Path(path or "ray_results").expanduser().absolute())


def scaling_config(cfg: Any):
    """``ray.train.ScalingConfig`` from ``cfg.scaling`` (a GPU count implies ``use_gpu``)."""
    from ray.train import ScalingConfig

    s = cfg.scaling
    gpus = s.gpus_per_worker if s.gpus_per_worker is not None else (1.0 if s.use_gpu else 0.0)
    resources: dict[str, float] = {"CPU": float(s.cpus_per_worker)}
    if gpus > 0:
        resources["GPU"] = float(gpus)
    return ScalingConfig(num_workers=s.workers, use_gpu=gpus > 0, resources_per_worker=resources)


def run_exists(storage_path: str, name: str) -> bool:
    """True when ``storage_path/name`` holds a Ray Train run with at least one committed checkpoint."""
    from .ray_checkpoint import latest_checkpoint_dir

    return latest_checkpoint_dir(storage_path, name) is not None


def build_torch_trainer(
    cfg: Any,
    *,
    name: str,
    storage_path: str | None = None,
    run_config_callbacks: list | None = None,
    resume: bool = True,
    extra_loop_config: dict | None = None,
):
    """A ``TorchTrainer`` running :func:`train_loop_per_worker` for ``cfg`` as run ``name``.

    ``storage_path`` (default ``cfg.scaling.storage_path``, else ``<cwd>/ray_results``) may be a
    local path or an ``s3://`` / ``gs://`` URI; on several nodes it must be shared storage.
    With ``resume=True`` an existing run of that name continues from its latest checkpoint (Ray
    Train V2 reloads its checkpoint snapshot); ``resume=False`` refuses to touch an existing run.
    ``run_config_callbacks`` go to ``RunConfig(callbacks=...)`` (e.g. Tune's ``TuneReportCallback``);
    ``extra_loop_config`` is merged into the loop config (test hooks: :mod:`trainables.probes`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from scoretune.config import ExperimentConfig, pin_data_paths
    from scoretune.errors import UserError

    storage = resolve_storage_path(storage_path or cfg.scaling.storage_path)
    if not resume and run_exists(storage, name):
        raise UserError(
            f"run '{name}' already has checkpoints in {storage}/{name}: resume it, pick another name, "
            "or delete that folder"
        )
    cfg = ExperimentConfig.model_validate(pin_data_paths(cfg.model_dump()))
    run_config = RunConfig(
        name=name,
        storage_path=storage,
        failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.scaling.num_to_keep, checkpoint_score_attribute=SCORE_KEY,
            checkpoint_score_order="max",
        ),
        callbacks=list(run_config_callbacks or []),
    )
    loop_config = {"experiment": cfg.model_dump(), **(extra_loop_config or {})}
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling_config(cfg),
        run_config=run_config,
    )
