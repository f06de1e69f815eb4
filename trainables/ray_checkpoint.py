"""What a Ray Train checkpoint of a scoretune run holds, and how to read it back.

A checkpoint directory (one per epoch, ``epoch_0003`` ...) is written by rank 0 and holds

* ``state.pt``     -- the engine's ``Trainer.state_dict()`` (model, EMA, optimiser, scheduler, RNG,
                      epoch, metrics history, config, model spec), saved with
                      :func:`scoretune.engine.save_checkpoint`, read with ``load_checkpoint``
                      (``weights_only=True``); plus ``rng_attack_ranks``, every rank's attack RNG;
* ``history.json`` -- the metrics history alone (small: the driver reads it without the weights);
* ``workers.json`` -- which rank ran on which node / pid / device.

:func:`preserve_checkpoint` keeps a trial's best checkpoint out of Ray's pruning (``num_to_keep``):
a ``best_checkpoint`` folder next to it, hard-linked where the storage is local (no extra space).

Readers go through ``pyarrow.fs`` so local paths and ``s3://`` / ``gs://`` storage work alike.
No Ray, no MLflow imports at module level.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
WORKERS_FILE = "workers.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of committed checkpoints


def checkpoint_dir_name(epoch: int) -> str:
    """The directory name of the checkpoint taken after ``epoch`` finished epochs."""
    return f"epoch_{epoch:04d}"


def write_checkpoint_dir(directory: str | os.PathLike, state: dict[str, Any],
                         workers: list[dict[str, Any]] | None = None) -> Path:
    """Write ``state`` (an engine state dict) and its history (and worker table) into ``directory``."""
    from scoretune.engine import save_checkpoint

    d = Path(directory)
    save_checkpoint(d / STATE_FILE, state)
    (d / HISTORY_FILE).write_text(json.dumps(state.get("history", []), indent=1))
    if workers is not None:
        (d / WORKERS_FILE).write_text(json.dumps(workers, indent=1))
    return d


def load_state(checkpoint: Any, map_location: Any = "cpu") -> dict[str, Any]:
    """The engine state dict inside a ``ray.train.Checkpoint`` (downloaded first when remote)."""
    from scoretune.engine import CheckpointError, load_checkpoint

    with checkpoint.as_directory() as d:
        path = Path(d) / STATE_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{checkpoint.path} has no {STATE_FILE}: not a scoretune Ray checkpoint "
                "(use another run name, or delete that run folder to start over)"
            )
        return load_checkpoint(path, map_location=map_location)


BEST_DIR = "best_checkpoint"


def preserve_checkpoint(path: str, dest: str | None = None) -> str:
    """Copy the checkpoint folder ``path`` to ``dest`` (default: ``best_checkpoint`` next to it),
    replacing what was there, and return ``dest``. Local storage: hard links (a plain copy across
    devices), written to a temporary folder and renamed, so ``dest`` always holds one whole checkpoint;
    remote storage: ``pyarrow.fs.copy_files``. Ray's pruning deletes the original folder, not the links."""
    if dest is None:
        dest = path.rstrip("/").rsplit("/", 1)[0] + "/" + BEST_DIR
    if "://" in path:
        import pyarrow.fs

        fs, root = storage_fs(dest)
        fs.delete_dir_contents(root, missing_dir_ok=True)
        pyarrow.fs.copy_files(path, dest)
        return dest
    import shutil

    src, dst = Path(path), Path(dest)
    if src.resolve() == dst.resolve():
        return dest
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link)
    old = dst.with_name(dst.name + f".old{os.getpid()}")
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return str(dst)


def storage_fs(storage_path: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path on it)`` for a local path or a ``scheme://`` URI."""
    import pyarrow.fs

    if "://" in storage_path:
        return pyarrow.fs.FileSystem.from_uri(storage_path)
    return pyarrow.fs.LocalFileSystem(), str(Path(storage_path).expanduser().absolute())


def _read_text(fs: Any, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    except (FileNotFoundError, OSError):
        return None


def read_json_file(fs: Any, path: str) -> Any:
    """Parsed JSON at ``path`` on ``fs``, or None when missing or (still being written and) unparsable."""
    text = _read_text(fs, path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def latest_checkpoint_dir(storage_path: str, name: str) -> tuple[Any, str] | None:
    """``(fs, path)`` of the latest *committed* checkpoint of run ``name``, or None.

    Reads Ray Train's checkpoint-manager snapshot (written by the controller after every
    registered checkpoint), so a checkpoint that was uploaded but never committed (its epoch
    will be redone after a restart) is never seen.
    """
    fs, root = storage_fs(storage_path)
    snap = read_json_file(fs, f"{root}/{name}/{SNAPSHOT_FILE}")
    try:
        dir_name = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (TypeError, KeyError):
        return None
    return fs, f"{root}/{name}/{dir_name}"


def read_history(fs: Any, checkpoint_path: str) -> list[dict[str, float]] | None:
    """The metrics history stored next to a checkpoint (None when unreadable)."""
    rows = read_json_file(fs, f"{checkpoint_path}/{HISTORY_FILE}")
    return rows if isinstance(rows, list) else None


def read_workers(fs: Any, checkpoint_path: str) -> list[dict[str, Any]] | None:
    rows = read_json_file(fs, f"{checkpoint_path}/{WORKERS_FILE}")
    return rows if isinstance(rows, list) else None


def run_history(storage_path: str, name: str) -> list[dict[str, float]]:
    """The history of the latest committed checkpoint of run ``name`` ([] when there is none)."""
    found = latest_checkpoint_dir(storage_path, name)
    if found is None:
        return []
    return read_history(*found) or []
