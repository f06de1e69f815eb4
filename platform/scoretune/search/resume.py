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
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

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
