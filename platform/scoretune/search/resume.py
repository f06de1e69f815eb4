"""Everything ``--resume`` does before Tune goes on: the search's state file, the runs it will not
continue, and the checkpoints Tune's snapshot names but pruning deleted.

Tune continues the trials of its last experiment snapshot (``Tuner.restore(resume_unfinished=True,
restart_errored=True)``): unfinished ones under their own id, errored ones restarted under a *new* id.
The runs of trials a killed driver started after that snapshot, and the runs of errored trials, are
not continued: they are tagged ``scoretune.superseded`` with the attempt that superseded them
(:func:`attempt_label`) and, when still RUNNING, set to KILLED -- so no run stays RUNNING forever, even
when the resumed attempt is itself interrupted.

Tune saves its experiment snapshot every few seconds, and prunes checkpoints (``keep_checkpoints``) as
trials write them: a kill between the two can leave the snapshot naming a checkpoint that is gone, and
Tune would fail that trial. :func:`restore_pruned_checkpoints` puts the trial's newest checkpoint on
disk in its place first, so the trial goes on from there (or ends at once when that one holds its
whole budget).

Tune uploads its snapshot files into the experiment folder in a background thread, rewriting them in
place: a kill during that copy leaves them empty or cut, and Tune cannot read them back. While the search
runs, :class:`SnapshotKeeper` keeps the last complete set in ``.scoretune-snapshot/``;
:func:`repair_snapshot` puts it back before ``--resume`` reads the snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ray.tune import Callback

from trainables.ray_checkpoint import read_json_file, storage_fs

from ..errors import UserError
from ..tracking import tags
from ..tracking.runs import SEARCH_STAGE, child_runs

OPEN = ("RUNNING", "SCHEDULED")


def attempt_label(name: str, attempt: int) -> str:
    """``attempt 2 of search 'quickstart' (resumed 2026-12-01 20:31:05 UTC)``; attempt 1 is the first
    run (``started ...``), each ``--resume`` adds one."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"attempt {attempt} of search '{name}' ({'started' if attempt == 1 else 'resumed'} {when})"


def saved_trials(ray_path: str) -> dict[str, str]:
    """Trial id -> Tune status (PENDING, RUNNING, TERMINATED, ERROR, ...) in the experiment's last snapshot."""
    return {t.trial_id: t.status for t in snapshot_trials(ray_path)}


def snapshot_trials(ray_path: str) -> list[Any]:
    """The trials of the experiment's last snapshot (``ExperimentAnalysis(ray_path).trials``), without
    its warning per trial that ``result.json`` is missing (the search turns Tune's file loggers off)."""
    import logging

    from ray.tune import ExperimentAnalysis

    log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return ExperimentAnalysis(ray_path).trials
    finally:
        log.setLevel(level)


def end_superseded(cl: Any, parent_run_id: str, saved: Mapping[str, str], label: str,
                   out: Callable[[str], None] = print, stage: str = SEARCH_STAGE) -> list[str]:
    """Tag (``scoretune.superseded`` = ``label``) and, when open, KILL every child run of the parent
    whose trial Tune will not continue: not in ``saved``, or saved as ERROR (restarted under a new id).
    Runs an earlier attempt already superseded are left as they are; only the runs of ``stage`` (the
    search's, or its confirmation's: each is its own Tune experiment). Returns the run ids it changed."""
    changed = []
    for run in child_runs(cl, cl.get_run(parent_run_id), stage):
        tid = run.data.tags.get(tags.TRIAL)
        if saved.get(tid) not in (None, "ERROR") or tags.SUPERSEDED in run.data.tags:
            continue
        cl.set_tag(run.info.run_id, tags.SUPERSEDED, label)
        if run.info.status in OPEN:
            cl.set_terminated(run.info.run_id, status="KILLED")
        changed.append(run.info.run_id)
    if changed:
        out(f"ended {len(changed)} MLflow run(s) of trials this attempt does not continue "
            f"(tagged {tags.SUPERSEDED}; open ones set to KILLED)")
    return changed


def restore_pruned_checkpoints(ray_path: str, out: Callable[[str], None] = print) -> list[str]:
    """For each unfinished trial of the snapshot at ``ray_path`` whose checkpoint is gone, copy the newest
    checkpoint left in its folder to that path; returns the trial ids put back. Local storage only
    (object stores have no pruning race: Tune writes the snapshot there after the upload)."""
    import shutil

    if "://" in ray_path:
        return []
    restored = []
    for trial in snapshot_trials(ray_path):
        ckpt = trial.checkpoint
        if trial.status in ("TERMINATED", "ERROR") or ckpt is None or Path(ckpt.path).exists():
            continue
        newest = max(Path(ckpt.path).parent.glob("checkpoint_*"), default=None, key=lambda d: d.name)
        if newest is None:
            out(f"trial {trial.trial_id}: its checkpoint {ckpt.path} is gone and no other is left; Tune will fail it")
            continue
        shutil.copytree(newest, ckpt.path)
        restored.append(trial.trial_id)
        out(f"trial {trial.trial_id}: Tune's snapshot named checkpoint {Path(ckpt.path).name}, which pruning "
            f"deleted after the snapshot; it goes on from its newest, {newest.name}")
    return restored


# ----------------------------------------------------------------------------- Tune's snapshot, kept whole
SNAPSHOT_FILES = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl",
                  "callback-states-*.pkl", "tuner.pkl")  # what Tune writes into the experiment folder to restore it
KEPT_DIR = ".scoretune-snapshot"


def snapshot_files(folder: Path) -> list[Path]:
    """Tune's snapshot files in ``folder`` (by name; a file set aside as ``.cut`` is not one)."""
    return sorted(f for pattern in SNAPSHOT_FILES for f in folder.glob(pattern) if f.is_file())


def is_complete(path: Path, *, parse: bool = True) -> bool:
    """Whether a snapshot file was written to its end: a pickle (whatever its name says: Tune's
    ``search_gen_state-*.json`` is one) that ends with its STOP opcode, checked without unpickling; else
    JSON that parses, or (``parse=False``, the cheap check while a search runs: the experiment state holds
    every trial) whose last character closes it."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:1] == b"\x80":  # pickle protocol 2 and later
        return data.endswith(b".")
    if not parse:
        return data.rstrip().endswith((b"}", b"]"))
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def keep_snapshot(folder: Path, *, settle: float = 1.0) -> bool:
    """Copy Tune's snapshot files in ``folder`` to ``folder/.scoretune-snapshot`` when they differ from the
    kept ones (the copies keep their mtimes), every one is complete and none changed in the last ``settle`` s
    (an upload may be under way); returns whether it copied."""
    files = snapshot_files(folder)
    stamps = {f.name: f.stat() for f in files}
    kept = folder / KEPT_DIR
    if not files or any(time.time() - st.st_mtime < settle for st in stamps.values()):
        return False
    if kept.is_dir() and {f.name: f.stat().st_mtime_ns for f in snapshot_files(kept)} == {
            name: st.st_mtime_ns for name, st in stamps.items()}:
        return False  # kept already
    if not all(is_complete(f, parse=False) for f in files):
        return False
    tmp, old = folder / f"{KEPT_DIR}.tmp", folder / f"{KEPT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in files:
        shutil.copy2(f, tmp / f.name)
    if any((folder / name).stat().st_mtime_ns != st.st_mtime_ns for name, st in stamps.items()):
        shutil.rmtree(tmp, ignore_errors=True)  # Tune rewrote one while it was copied: the next call
        return False
    shutil.rmtree(old, ignore_errors=True)
    if kept.exists():
        kept.rename(old)
    tmp.rename(kept)
    shutil.rmtree(old, ignore_errors=True)
    return True


class SnapshotKeeper(Callback):
    """Keeps the last complete copy of Tune's snapshot of a search on local storage (at most every
    ``every`` s, when it changed and has been still for ``settle`` s: :func:`keep_snapshot`), for
    :func:`repair_snapshot`."""

    def __init__(self, ray_path: str, every: float = 5.0, settle: float = 1.0):
        self.folder = None if "://" in ray_path else str(Path(ray_path))
        self.every, self.settle = every, settle
        self._next = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.folder is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every
        try:
            keep_snapshot(Path(self.folder), settle=self.settle)
        except OSError:  # a file Tune replaced meanwhile, a full disk: the next call tries again; the search goes on
            pass


def repair_snapshot(ray_path: str, out: Callable[[str], None] = print) -> list[str]:
    """Before Tune reads its snapshot at ``ray_path``: when a kill cut one of its files short, put the
    kept copy (:class:`SnapshotKeeper`) back, setting aside (``.cut``) the files of a newer upload it does
    not hold; returns the names of the cut files. A one-line UserError when no complete copy is kept."""
    if "://" in ray_path:
        return []
    folder = Path(ray_path)
    cut = [f.name for f in snapshot_files(folder) if not is_complete(f)]
    if not cut:
        return []
    kept_dir = next((d for d in (folder / KEPT_DIR, folder / f"{KEPT_DIR}.old") if d.is_dir()), None)
    kept = snapshot_files(kept_dir) if kept_dir is not None else []
    if not kept or not all(is_complete(f) for f in kept):
        raise UserError(f"Tune's snapshot in {ray_path} was cut short when the search was killed ({', '.join(cut)}) "
                        "and no complete copy of it is kept; start the search again under another --name (MLflow "
                        "keeps the trials that ran)")
    names = {f.name for f in kept}
    for f in snapshot_files(folder):
        if f.name not in names:
            f.rename(f.with_name(f.name + ".cut"))
    for f in kept:
        tmp = folder / f".{f.name}.restore"
        shutil.copy2(f, tmp)
        os.replace(tmp, folder / f.name)
    when = time.strftime("%H:%M:%S", time.localtime(max(f.stat().st_mtime for f in kept)))
    out(f"Tune's snapshot was cut short when the search was killed ({', '.join(cut)}); it goes on from the last "
        f"complete one, saved at {when}")
    return cut


STATE_FILE = "scoretune_search.json"


def read_state(ray_path: str) -> dict[str, Any]:
    """The state of the search at ``ray_path``; a one-line UserError when there is none."""
    fs, root = storage_fs(ray_path)
    state = read_json_file(fs, f"{root}/{STATE_FILE}")
    if not isinstance(state, dict):
        raise UserError(f"{ray_path} is not a scoretune search (no {STATE_FILE}); start it without --resume")
    return state


def write_state(ray_path: str, state: dict[str, Any]) -> None:
    """Write ``state`` (replacing the file at once on a local disk: write, then rename)."""
    fs, root = storage_fs(ray_path)
    fs.create_dir(root, recursive=True)
    data = json.dumps(state, indent=1).encode()
    tmp = f"{root}/{STATE_FILE}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    try:
        fs.move(tmp, f"{root}/{STATE_FILE}")
    except (OSError, NotImplementedError):  # object stores without rename: write in place
        with fs.open_output_stream(f"{root}/{STATE_FILE}") as f:
            f.write(data)
        fs.delete_file(tmp)
