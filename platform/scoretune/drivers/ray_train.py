"""``scoretune train CONFIG --workers N [--address ...]``: the Ray Train side of the training driver.

Starts or joins Ray (:func:`scoretune.drivers.ray_session.ray_session`), runs
:func:`trainables.train_loop.build_torch_trainer`, and is the single MLflow writer (through
:class:`scoretune.drivers.train.TrainingRun`): while the workers train, a :class:`Follower` polls the
run's committed checkpoints (Ray Train's checkpoint snapshot + the small ``history.json`` next to each
checkpoint) and hands their history to the epoch table, so each epoch is printed and logged exactly once,
also across worker restarts and reruns. At the end the best checkpoint and its model are logged.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..tracking import tags
from .ray_session import ray_session
from .training_run import Out, TrainingRun


def check_gpu_request(cfg: Any) -> None:
    if cfg.device.startswith("cuda") and not (cfg.scaling.use_gpu or (cfg.scaling.gpus_per_worker or 0) > 0):
        raise UserError("device is cuda but Ray workers get no GPU: --set scaling.use_gpu=true")


def check_resources(cfg: Any, *, local: bool, where: str, out: Out = print) -> None:
    """Fail fast (locally) or warn (a cluster may autoscale) when the workers cannot all be placed."""
    import ray

    s = cfg.scaling
    total = ray.cluster_resources()
    gpus = s.gpus_per_worker if s.gpus_per_worker is not None else (1.0 if s.use_gpu else 0.0)
    short = []
    if total.get("CPU", 0) < s.workers * s.cpus_per_worker:
        short.append(f"{s.workers * s.cpus_per_worker:g} CPUs (has {total.get('CPU', 0):g})")
    if gpus and total.get("GPU", 0) < s.workers * gpus:
        short.append(f"{s.workers * gpus:g} GPUs (has {total.get('GPU', 0):g})")
    if not short:
        return
    msg = f"{where} is too small for {s.workers} workers: needs " + ", ".join(short)
    if local:
        raise UserError(msg + "; lower --workers / scaling.cpus_per_worker, or pass --address of a cluster")
    out(f"warning: {msg}; training waits until the cluster has them")


@contextlib.contextmanager
def _keep_sigint_handler():
    """Ray Train installs its own Ctrl-C handler in ``fit()``; put ours back afterwards."""
    main = threading.current_thread() is threading.main_thread()
    prev = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main and prev is not None:
            signal.signal(signal.SIGINT, prev)


class Follower(threading.Thread):
    """Polls run ``name``'s latest committed checkpoint and hands its history to ``on_history``."""

    def __init__(self, storage_path: str, name: str, on_history: Callable[[list], Any], interval_s: float = 2.0):
        super().__init__(name="scoretune-follower", daemon=True)
        self.storage_path, self.run_name = storage_path, name
        self.on_history, self.interval_s = on_history, interval_s
        self._stop_event = threading.Event()
        self._seen: str | None = None
        self.errors = 0

    def poll(self) -> None:
        from trainables.ray_checkpoint import latest_checkpoint_dir, read_history

        found = latest_checkpoint_dir(self.storage_path, self.run_name)
        if found is None or found[1] == self._seen:
            return
        rows = read_history(*found)
        if rows is not None:
            self._seen = found[1]
            self.on_history(rows)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # never let a logging hiccup kill the run; the final sync catches up
                self.errors += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


def train_on_ray(cfg: Any, *, address: str | None = None, tracking_uri: str | None = None,
                 experiment: str | None = None, use_mlflow: bool = True, resume: bool = False,
                 out: Out = print) -> dict[str, Any]:
    """Train ``cfg`` on ``cfg.scaling.workers`` Ray Train workers. A rerun with the same name and storage
    path continues from the latest checkpoint (and the same MLflow run)."""
    import ray
    import ray.train

    from trainables.ray_checkpoint import run_history
    from trainables.train_loop import build_torch_trainer, resolve_storage_path

    check_gpu_request(cfg)
    storage = resolve_storage_path(cfg.scaling.storage_path)
    run_path = f"{storage}/{cfg.name}"
    s = cfg.scaling
    need, have = math.ceil(s.workers * s.cpus_per_worker), os.cpu_count() or 1
    if not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized() and need > have:
        out(f"note: {s.workers} workers x {s.cpus_per_worker} CPUs oversubscribe this machine's {have} cores")
    with ray_session(address, num_cpus=max(have, need), out=out) as where:
        check_resources(cfg, local=where == "local Ray", where=where, out=out)
        previous = run_history(storage, cfg.name)
        if previous:
            out(f"continuing run '{cfg.name}' after epoch {len(previous)} from {run_path} "
                "(use another name, or delete that folder, to start over)")
        elif resume:
            out(f"nothing to resume in {run_path}: starting run '{cfg.name}' from epoch 1")
        if "://" not in storage and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
            out(f"note: checkpoints go to {storage}: on a multi-node cluster every node must see that path "
                "(a shared filesystem), else set scaling.storage_path to an s3:// or gs:// URI")
        trainer = build_torch_trainer(cfg, name=cfg.name, storage_path=storage, resume=True)
        out(f"Ray Train: {s.workers} worker(s), global batch {cfg.batch_size}, checkpoints in {run_path}")
        with TrainingRun(cfg, run_path, tracking_uri=tracking_uri, experiment=experiment, use_mlflow=use_mlflow,
                         continuing=bool(previous),
                         extra_tags={tags.WORKERS: str(s.workers), tags.RAY_RUN: run_path},
                         resume_hint="rerun the same command to continue", out=out) as run:
            run.table.add(previous)
            follower = Follower(storage, cfg.name, run.table.add)
            follower.start()
            try:
                with _keep_sigint_handler():
                    result = trainer.fit()
            except ray.train.TrainingFailedError as e:
                raise UserError(f"training failed: {str(e).strip().splitlines()[0][:300]}") from None
            finally:
                follower.stop()
                run.table.add(run_history(storage, cfg.name))
            return _finish(result, run, out)


def _finish(result: Any, run: TrainingRun, out: Out) -> dict[str, Any]:
    """After ``fit()``: the last rows, the worker placement, the stop reason, the best checkpoint."""
    from trainables.ray_checkpoint import STATE_FILE, read_history, read_workers
    from trainables.train_loop import SCORE_KEY

    if result.checkpoint is not None:
        fs, path = result.checkpoint.filesystem, result.checkpoint.path
        run.table.add(read_history(fs, path) or [])
        workers = read_workers(fs, path) or []
        if workers:
            out(f"trained on {len(workers)} worker(s) on {len({w.get('node_id') for w in workers})} node(s)")
    status = (result.return_value or {}).get("stop_reason", "interrupted")
    if status not in ("completed", "interrupted"):
        out(f"early stop after epoch {run.table.last_epoch}: {status}")
    best = result.get_best_checkpoint(SCORE_KEY, "max") if result.best_checkpoints else None
    best = best or result.checkpoint
    if best is None:
        return run.finish(status, None)
    with best.as_directory() as d:
        summary = run.finish(status, Path(d) / STATE_FILE, "best.pt")
    out(f"best checkpoint: {best.path}/{STATE_FILE}")
    return {**summary, "best_checkpoint": f"{best.path}/{STATE_FILE}"}
