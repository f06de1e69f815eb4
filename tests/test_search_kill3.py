"""Three SIGKILLs of the search driver, each followed by ``--resume``: one parent, every trial's epochs once
among the active runs, no run left RUNNING, and at most 2.5x the time of an uninterrupted search."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from procs import descendants

TRIALS, EPOCHS = 8, 4


def _space(tmp_path: Path, name: str) -> Path:
    raw = {"name": name,
           "base": {"data": {"name": "digits", "val_size": 0.1}, "model": {"name": "small_cnn"},
                    "attack": {"eps": 0.1, "steps": 2}, "eval": {"pgd_steps": 1, "max_samples": 64, "test": False},
                    "epochs": EPOCHS, "batch_size": 128, "device": "cpu"},
           "params": {"lr": {"loguniform": [0.05, 0.3]}, "beta": {"uniform": [1.0, 6.0]}},
           "num_samples": TRIALS, "max_concurrent": 2, "top_k": 1, "scheduler": {"type": "none"},
           "autoattack": {"version": "none"},
           "storage_path": str(tmp_path / "ray"), "tracking_uri": str(tmp_path / "mlflow.db")}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _driver(space: Path, cwd: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "scoretune.cli", "search", str(space), *extra], cwd=cwd,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    pids = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    for pid in pids:  # the driver's own Ray, should the watchdog be slow
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _checkpoints(exp: Path) -> int:
    return sum(1 for _ in exp.glob("trial_*/checkpoint_*"))


@pytest.mark.slow
def test_three_driver_kills_then_resume_log_every_epoch_once(tmp_path):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    straight = tmp_path / "straight"
    straight.mkdir()
    t0 = time.monotonic()
    proc = _driver(_space(straight, "straight"), straight, straight / "driver.log")
    assert proc.wait(timeout=900) == 0, (straight / "driver.log").read_text()[-3000:]
    uninterrupted = time.monotonic() - t0

    killed = tmp_path / "killed"
    killed.mkdir()
    space, log = _space(killed, "killed"), killed / "driver.log"
    exp = killed / "ray" / "killed"
    t1 = time.monotonic()
    for attempt in range(3):
        proc = _driver(space, killed, log, *(["--resume"] if attempt else []))
        target = _checkpoints(exp) + 3  # a little progress in every attempt
        deadline = time.monotonic() + 600
        while _checkpoints(exp) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        _kill(proc)
    proc = _driver(space, killed, log, "--resume")
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    interrupted = time.monotonic() - t1

    cl = MlflowClient(f"sqlite:///{killed / 'mlflow.db'}")
    exps = [e.experiment_id for e in cl.search_experiments()]
    every = cl.search_runs(exps, run_view_type=ViewType.ALL, max_results=1000)
    assert [r.info.run_id for r in every if r.info.status == "RUNNING"] == []
    active = cl.search_runs(exps, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
    parents = [r for r in active if r.data.tags.get("scoretune.kind") == "search"]
    assert len(parents) == 1
    children = [r for r in active if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    trial_ids = [r.data.tags["scoretune.trial_id"] for r in children]
    assert len(trial_ids) == len(set(trial_ids)) == TRIALS
    for r in children:
        assert [m.step for m in cl.get_metric_history(r.info.run_id, "val_pgd_acc")] == list(range(1, EPOCHS + 1))
    print(f"uninterrupted {uninterrupted:.1f} s, three kills + resumes {interrupted:.1f} s "
          f"({interrupted / uninterrupted:.2f}x)")
    assert interrupted <= 2.5 * uninterrupted, (interrupted, uninterrupted)
