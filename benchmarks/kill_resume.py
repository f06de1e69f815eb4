#!/usr/bin/env python
"""What three SIGKILLs of the search driver cost: the same small search run straight through, then
killed three times (each time after a little progress) and finished with ``--resume``; prints both wall
times and their ratio, with the machine and its load::

    kill_resume uninterrupted <s> interrupted <s> ratio <x>

Goal: ratio <= 2.5 (each resume pays a driver and Ray start-up, and reruns at most the epochs since a
trial's last checkpoint). ``tests/test_search_kill3.py`` runs the killed half and checks MLflow and
the Optuna study; the timing lives here, never in a test.

    OMP_NUM_THREADS=1 python benchmarks/kill_resume.py [--trials 8 --epochs 4 --kills 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import descendants, machine_info


def write_space(folder: Path, name: str, *, trials: int, epochs: int) -> Path:
    """A small digits search (small CNN, 2-step attacks, 2 trials at a time, no AutoAttack) storing its
    Ray results and MLflow store in ``folder``."""
    raw = {"name": name,
           "base": {"data": {"name": "digits", "val_size": 0.1}, "model": {"name": "small_cnn"},
                    "attack": {"eps": 0.1, "steps": 2}, "eval": {"pgd_steps": 1, "max_samples": 64, "test": False},
                    "epochs": epochs, "batch_size": 128, "device": "cpu"},
           "params": {"lr": {"loguniform": [0.05, 0.3]}, "beta": {"uniform": [1.0, 6.0]}},
           "num_samples": trials, "max_concurrent": 2, "top_k": 1, "scheduler": {"type": "none"},
           "autoattack": {"version": "none"},
           "storage_path": str(folder / "ray"), "tracking_uri": str(folder / "mlflow.db")}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_driver(space: Path, log: Path, *extra: str) -> subprocess.Popen:
    """``scoretune search SPACE`` as a user runs it (its own local Ray), output appended to ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "platform"), str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "scoretune.cli", "search", str(space), *extra], cwd=space.parent,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything below it (its own Ray, should Ray's watchdog be slow)."""
    if proc.poll() is not None:  # ended by itself: its pid may already be another process's
        return
    pids = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)


def checkpoints(experiment: Path) -> int:
    return sum(1 for _ in experiment.glob("trial_*/checkpoint_*"))


def killed_then_resumed(space: Path, log: Path, *, kills: int = 3, progress: int = 3) -> int:
    """Start the search, SIGKILL it once ``progress`` more checkpoints exist, ``kills`` times (each start
    after the first with ``--resume``), then resume it to the end; returns the last driver's exit code.
    Raises if a driver ends by itself before it was killed."""
    experiment = space.parent / "ray" / yaml.safe_load(space.read_text())["name"]
    for attempt in range(kills):
        proc = start_driver(space, log, *(["--resume"] if attempt else []))
        target, deadline = checkpoints(experiment) + progress, time.monotonic() + 600
        while checkpoints(experiment) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        ended_or_stalled = proc.poll() is not None or time.monotonic() >= deadline
        kill_driver(proc)
        if ended_or_stalled:
            raise RuntimeError(f"driver {attempt + 1} ended or stalled before its kill:\n{log.read_text()[-3000:]}")
    return start_driver(space, log, "--resume").wait(timeout=900)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--kills", type=int, default=3)
    args = p.parse_args(argv)
    print("machine:", machine_info())
    with tempfile.TemporaryDirectory(prefix="kill_resume_") as tmp:
        runs = {}
        for name in ("straight", "killed"):
            folder = Path(tmp) / name
            folder.mkdir()
            space, log = write_space(folder, name, trials=args.trials, epochs=args.epochs), folder / "driver.log"
            t0 = time.monotonic()
            rc = (start_driver(space, log).wait(timeout=900) if name == "straight"
                  else killed_then_resumed(space, log, kills=args.kills))
            runs[name] = time.monotonic() - t0
            if rc != 0:
                print(log.read_text()[-3000:], file=sys.stderr)
                return 1
    print("load:", os.getloadavg())
    print(f"kill_resume uninterrupted {runs['straight']:.1f} interrupted {runs['killed']:.1f} "
          f"ratio {runs['killed'] / runs['straight']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
