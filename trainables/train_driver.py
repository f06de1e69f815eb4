"""The driver of ``scoretune train CONFIG --workers N [--address ...]``.

Connects to (or starts) Ray, runs :func:`trainables.train_loop.build_torch_trainer`, and is the
single MLflow writer: while the workers train it follows the run's committed checkpoints (Ray
Train's checkpoint snapshot + the small ``history.json`` next to each checkpoint), prints one
table row and logs one MLflow step per epoch -- each epoch exactly once, also across worker
restarts and reruns -- and at the end logs the best checkpoint and the model.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from .ray_checkpoint import STATE_FILE, latest_checkpoint_dir, read_history, read_workers, run_history
from .train_loop import SCORE_KEY, build_torch_trainer, resolve_storage_path


# ----------------------------------------------------------------------------- config


def with_workers(cfg: Any, workers: int | None) -> Any:
    """``cfg`` with ``scaling.workers`` overridden by ``--workers`` (the global batch is unchanged)."""
    from scoretune.config import ExperimentConfig
    from scoretune.errors import UserError

    if workers is None:
        return cfg
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    data = cfg.model_dump()
    data["scaling"]["workers"] = int(workers)
    return ExperimentConfig.model_validate(data)


def check_config(cfg: Any) -> None:
    from scoretune.errors import UserError

    if cfg.batch_size % cfg.scaling.workers:
        raise UserError(
            f"batch_size {cfg.batch_size} is not divisible by {cfg.scaling.workers} workers: the global batch is "
            "split evenly; pick a worker count that divides it (or --set batch_size=...)"
        )
    if cfg.device.startswith("cuda") and not (cfg.scaling.use_gpu or (cfg.scaling.gpus_per_worker or 0) > 0):
        raise UserError("device is cuda but Ray workers get no GPU: --set scaling.use_gpu=true")


# ----------------------------------------------------------------------------- Ray


@contextlib.contextmanager
def ray_connection(address: str | None, cfg: Any, out: Callable[[str], None] = print):
    """Use the Ray this process is already connected to; else connect to ``address``; else start a
    local Ray sized to the machine (at least the CPUs the workers ask for). Shuts down what it opened."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    s = cfg.scaling
    if address:
        ray.init(address=address)
        where = f"Ray cluster at {address}"
    else:
        need = math.ceil(s.workers * s.cpus_per_worker)
        have = os.cpu_count() or 1
        if need > have:
            out(f"note: {s.workers} workers x {s.cpus_per_worker} CPUs oversubscribe this machine's {have} cores")
        ray.init(num_cpus=max(have, need), include_dashboard=False)
        where = "local Ray"
    try:
        check_resources(cfg, local=not address, where=where, out=out)
        yield ray
    finally:
        ray.shutdown()


def check_resources(cfg: Any, *, local: bool, where: str, out: Callable[[str], None] = print) -> None:
    """Fail fast (locally) or warn (a cluster may autoscale) when the workers cannot all be placed."""
    import ray

    from scoretune.errors import UserError

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


# ----------------------------------------------------------------------------- per-epoch output


class EpochTable:
    """Prints and logs each epoch's row exactly once, in epoch order, whatever order rows arrive in
    (history replays after a resume, a follower that polls, the final history)."""

    def __init__(self, out: Callable[[str], None] = print, logger: Any = None):
        from scoretune.commands.train import format_header

        self.out = out
        self.logger = logger
        self.rows: dict[int, dict[str, float]] = {}
        self.best_score = float("-inf")
        self._lock = threading.Lock()
        self.out(format_header())

    @property
    def last_epoch(self) -> int:
        return max(self.rows, default=0)

    def add(self, history: Iterable[dict[str, float]]) -> list[dict[str, float]]:
        """Emit the rows of ``history`` after the last emitted epoch (a history always starts at epoch 1)."""
        from scoretune.commands.train import format_row
        from scoretune.engine import selection_metric

        new = []
        with self._lock:
            for row in history:
                epoch = int(row["epoch"])
                if epoch != self.last_epoch + 1:
                    continue
                self.rows[epoch] = row
                self.best_score = max(self.best_score, selection_metric(row))
                if self.logger is not None:
                    self.logger.log_metrics({**row, "best_val_metric": self.best_score}, step=epoch)
                self.out(format_row(row))
                new.append(row)
        return new


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


# ----------------------------------------------------------------------------- MLflow


def open_run_logger(cfg: Any, args: Any, storage: str):
    from scoretune.tracking import RunLogger

    logger = RunLogger(
        getattr(args, "tracking_uri", None), getattr(args, "experiment", None) or cfg.name, run_name=cfg.name,
        tags={"scoretune.kind": "train", "scoretune.dataset": cfg.data.name,
              "scoretune.workers": str(cfg.scaling.workers), "scoretune.ray_run": f"{storage}/{cfg.name}"},
    )
    logger.log_params(cfg.flat())
    logger.log_text(cfg.model_dump_json(indent=2), "config.json")
    return logger


def example_input(model_spec: dict[str, Any], n: int = 2):
    """An input example for MLflow's model signature, drawn in the data's pixel range."""
    import numpy as np

    shape = (n, *model_spec["input_shape"])
    rng = np.random.default_rng(0)
    lo_hi = model_spec.get("pixel_range")
    if lo_hi:
        return rng.uniform(lo_hi[0], lo_hi[1], size=shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def log_final(logger: Any, checkpoint: Any, out: Callable[[str], None]) -> str:
    """Log ``checkpoint``'s state as ``checkpoints/best.pt`` and its network (EMA weights when present)
    as the run's MLflow model; returns the model URI."""
    import json
    import shutil

    from scoretune.engine import model_from_checkpoint

    from .ray_checkpoint import load_state

    state = load_state(checkpoint)
    with tempfile.TemporaryDirectory(prefix="scoretune-") as tmp:
        with checkpoint.as_directory() as d:
            shutil.copyfile(Path(d) / STATE_FILE, Path(tmp) / "best.pt")
        logger.log_artifact(Path(tmp) / "best.pt", "checkpoints")
    net, _ = model_from_checkpoint(state)
    uri = logger.log_model(net, example_input(json.loads(state["model_spec"])))
    out(f"logged model {uri} (run {logger.run_id})")
    return uri


# ----------------------------------------------------------------------------- the command


def run(cfg: Any, args: Any, out: Callable[[str], None] = print) -> int:
    """Train ``cfg`` on ``--workers`` Ray Train workers; returns the exit code."""
    import ray
    import ray.train

    cfg = with_workers(cfg, getattr(args, "workers", None))
    check_config(cfg)
    storage = resolve_storage_path(cfg.scaling.storage_path)
    with ray_connection(getattr(args, "address", None), cfg, out):
        previous = run_history(storage, cfg.name)
        if previous:
            out(f"continuing run '{cfg.name}' after epoch {len(previous)} from {storage}/{cfg.name} "
                "(use another name, or delete that folder, to start over)")
        elif getattr(args, "resume", False):
            out(f"nothing to resume in {storage}/{cfg.name}: starting run '{cfg.name}' from epoch 1")
        if "://" not in storage and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
            out(f"note: checkpoints go to {storage}: on a multi-node cluster every node must see that path "
                "(a shared filesystem), else set scaling.storage_path to an s3:// or gs:// URI")
        trainer = build_torch_trainer(cfg, name=cfg.name, storage_path=storage, resume=True)
        logger = None if getattr(args, "no_mlflow", False) else open_run_logger(cfg, args, storage)
        if logger is not None:
            out(f"MLflow run {logger.run_id} in {logger.uri}")
        out(f"Ray Train: {cfg.scaling.workers} worker(s), global batch {cfg.batch_size}, checkpoints in "
            f"{storage}/{cfg.name}")
        table = EpochTable(out, logger)
        table.add(previous)
        follower = Follower(storage, cfg.name, table.add)
        follower.start()
        try:
            with _keep_sigint_handler():
                result = trainer.fit()
        except BaseException as e:
            follower.stop()
            table.add(run_history(storage, cfg.name))
            _record_failure(e, logger, table, f"{storage}/{cfg.name}")
            if isinstance(e, ray.train.TrainingFailedError):
                print(f"scoretune train: training failed: {e}", file=sys.stderr)
                return 1
            raise
        follower.stop()
        _finish(result, logger, table, f"{storage}/{cfg.name}", out)
    return 0


def _record_failure(e: BaseException, logger: Any, table: EpochTable, run_path: str) -> None:
    if logger is not None:
        logger.set_tags({"scoretune.status": "failed", "scoretune.error": f"{type(e).__name__}: {e}"[:5000]})
        logger.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
    if table.last_epoch:
        print(f"kept {table.last_epoch} finished epoch(s) in {run_path}; rerun the same command to continue",
              file=sys.stderr)


def _finish(result: Any, logger: Any, table: EpochTable, run_path: str, out: Callable[[str], None]) -> None:
    """After ``fit()``: the last rows, the worker placement, the stop reason, the best checkpoint and
    (MLflow) its artifact and model."""
    from scoretune.engine import selection_metric

    if result.checkpoint is not None:
        fs, path = result.checkpoint.filesystem, result.checkpoint.path
        table.add(read_history(fs, path) or [])
        workers = read_workers(fs, path) or []
        if workers:
            out(f"trained on {len(workers)} worker(s) on {len({w.get('node_id') for w in workers})} node(s)")
    status = (result.return_value or {}).get("stop_reason", "interrupted")
    if status not in ("completed", "interrupted"):
        out(f"early stop after epoch {table.last_epoch}: {status}")
    best = result.get_best_checkpoint(SCORE_KEY, "max") if result.best_checkpoints else None
    best = best or result.checkpoint
    if logger is not None:
        logger.set_tags({"scoretune.status": status, "scoretune.checkpoints": run_path})
        if best is not None:
            log_final(logger, best, out)
        logger.end("KILLED" if status == "interrupted" else "FINISHED")
    if table.rows:
        row = max(table.rows.values(), key=selection_metric)
        out("best epoch {:.0f}: val_clean_acc={:.4f} val_pgd_acc={:.4f}".format(
            row["epoch"], row.get("val_clean_acc", float("nan")), row.get("val_pgd_acc", float("nan"))))
    if best is not None:
        out(f"best checkpoint: {best.path}/{STATE_FILE}")
