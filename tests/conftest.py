"""Shared fixtures. One local Ray instance serves every Ray test of the session.

``scoretune`` is imported first so that its thread policy (:mod:`scoretune.threads`) is in place before any
test module loads torch."""

from __future__ import annotations

import contextlib
import os
import socket
import sys

import pytest
from scoretune import threads  # applies the thread policy; torch is not loaded yet

# pytest-xdist's workers share the machine's CPUs: each gets its share of OpenMP threads, as the user's setting
# (the processes a test starts inherit it), unless the user set one. Two threads per worker on 2 cores would
# put 4 busy threads, and every Ray trial and subprocess a test starts, on 2 cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1 and threads.COUNT_VAR in threads.policy_env(os.environ):  # the policy's count, not the user's
    os.environ[threads.COUNT_VAR] = str(threads.cpu_budget(threads.affinity_cpus() / _WORKERS))

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


# The search tests' settings, in one place.
TINY = {"data": {"name": "digits", "val_size": 0.1}, "model": {"name": "mlp"},
        "attack": {"eps": 0.1, "steps": 1}, "eval": {"pgd_steps": 2, "max_samples": 128, "test": False},
        "epochs": 1, "batch_size": 128, "device": "cpu"}  # the smallest real experiment: an MLP on digits
QUICK = ["num_samples=4", "max_concurrent=2", "base.epochs=2", "base.attack.steps=1", "base.eval.pgd_steps=2",
         "base.batch_size=128", "scheduler.grace_period=1"]  # the quickstart space, shrunk (--set overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_local():
    """A local Ray with 2 CPUs, started once and shared; re-started if a test shut it down
    (multi-node tests start their own cluster and shut it down when done)."""
    import ray

    if not ray.is_initialized():
        with threads.ray_start_env():
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    yield ray


# The longest files first (measured: ``--durations=0``), so that the two xdist workers, which take whole files
# in this order, are not left with one long file each at the end.
LONGEST_FIRST = ("test_server_tracking.py", "test_search_kill3.py", "test_search.py", "test_ray_train.py",
                 "test_hostile_input.py", "test_cluster.py", "test_engine.py", "test_ui_browser.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise kept


def pytest_sessionfinish(session, exitstatus):
    ray = sys.modules.get("ray")  # not imported by this process's tests: nothing to shut down (and no import)
    if ray is not None:
        with contextlib.suppress(Exception):
            if ray.is_initialized():
                ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the rest of a module: its small tensors run fastest so, and on a shared
    CPU two OpenMP threads wait on each other (up to 5x slower). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` or request it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tracking_uri(tmp_path):
    """A fresh MLflow SQLite store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
