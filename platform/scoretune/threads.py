"""OpenMP and torch thread settings that do not collapse on a shared machine.

torch's CPU kernels run on the GNU OpenMP runtime shipped in the wheel (``torch/lib/libgomp.so.1``). Its idle
worker threads spin before they sleep: the fastest wait on a free machine, but beside other busy processes they
take the cores the working threads need and an epoch gets several times slower (numbers: ``benchmarks/README.md``,
``contention.py``). Hence every scoretune process, from ``import scoretune`` on (before torch can be imported),
runs with ``OMP_NUM_THREADS`` = the CPUs the process may use (affinity, cgroup quota), unless the user set it,
and keeps libgomp's spinning wait; while the engine trains or evaluates, :mod:`scoretune.thread_governor` lowers
torch's threads to the CPUs other processes leave free (one thread, which never spins, on a busy machine).

libgomp reads the variables once, when torch loads it; child processes inherit them. A variable the policy set is
recorded in ``$SCORETUNE_THREADS`` so that a child recomputes it rather than taking it for the user's choice;
``SCORETUNE_THREADS=off`` switches the policy and the governor off (OpenMP's and torch's defaults). A count or a
wait setting of the user's (:data:`WAIT_VARS`, e.g. ``OMP_WAIT_POLICY=PASSIVE``) stays fixed: the governor
leaves such a process alone. Ray workers get the user's wait settings through the job's runtime environment
(:func:`ray_env_vars`), not the count: Ray sizes each worker's ``OMP_NUM_THREADS`` to the task's ``num_cpus``
when it is unset (:func:`ray_start_env`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Iterator, Mapping, MutableMapping

WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""The user's OpenMP wait settings (libgomp's default: spin ``GOMP_SPINCOUNT=300000`` times, then sleep)."""
COUNT_VAR = "OMP_NUM_THREADS"
MARK_VAR = "SCORETUNE_THREADS"
"""What the policy set, ``NAME=VALUE,...``: equal values in a child are the policy's, not the user's; ``off``:
no policy."""


def cgroup_cpus(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``);
    None when there is none or it cannot be read."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def affinity_cpus() -> int:
    """The CPUs this process may run on (its affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def cpu_budget(cpus: float | None = None, *, affinity: int | None = None, quota: float | None = None) -> int:
    """Threads for a process that may use ``cpus`` CPUs (a Ray task's ``num_cpus``; None: no such limit):
    the least of ``cpus``, the affinity count and the cgroup quota (both read when not given), rounded down
    (a quota of 1.5 CPUs gets 1 thread), at least 1."""
    limits = [affinity if affinity is not None else affinity_cpus()]
    quota = cgroup_cpus() if quota is None else quota
    limits += [q for q in (quota, cpus) if q is not None and q > 0]
    return max(1, math.floor(min(limits)))


def _ours(env: Mapping[str, str]) -> dict[str, str]:
    pairs = (p.partition("=") for p in env.get(MARK_VAR, "").split(",") if p)
    return {k: v for k, _, v in pairs if env.get(k) == v}


def policy_env(env: MutableMapping[str, str], *, affinity: int | None = None,
               quota: float | None = None) -> dict[str, str]:
    """The variables the policy sets in ``env`` (the user's settings win; the policy's own, inherited
    from a parent, are recomputed)."""
    if env.get(MARK_VAR, "").strip().lower() == "off" or COUNT_VAR in user_settings(env):
        return {}
    return {COUNT_VAR: str(cpu_budget(affinity=affinity, quota=quota))}


def user_settings(env: Mapping[str, str]) -> set[str]:
    """The OpenMP count and wait variables set in ``env`` by the user, not by the policy."""
    ours = _ours(env)
    return {k for k in (*WAIT_VARS, COUNT_VAR) if env.get(k, "").strip() and k not in ours}


def apply(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :func:`policy_env` in ``env`` (default ``os.environ``) and record it; when torch is already
    loaded (too late for libgomp to read it) size its threads. Returns what was set."""
    env = os.environ if env is None else env
    set_ = policy_env(env)
    env.update(set_)
    if set_:
        env[MARK_VAR] = ",".join(f"{k}={v}" for k, v in set_.items())
    elif env.get(MARK_VAR, "").strip().lower() != "off":
        env.pop(MARK_VAR, None)
    torch = sys.modules.get("torch") if env is os.environ else None
    if torch is not None and COUNT_VAR in set_:
        torch.set_num_threads(int(set_[COUNT_VAR]))
    return set_


def set_torch_threads(cpus: float | None = None) -> int:
    """Size torch's intra-op threads for a task holding ``cpus`` CPUs (a trial, a Ray Train worker, an
    AutoAttack task): :func:`cpu_budget` of it. Returns the count."""
    import torch

    n = cpu_budget(cpus)
    torch.set_num_threads(n)
    return n


def ray_env_vars(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The user's wait settings in effect here, for a Ray job's ``runtime_env={"env_vars": ...}`` (workers
    on other nodes do not inherit this process's environment). Settings a submitted job's own runtime env
    already holds are left out: Ray refuses two values for one variable."""
    env = os.environ if env is None else env
    job = _job_env_vars(env)
    return {k: env[k] for k in WAIT_VARS if env.get(k, "").strip() and k not in job}


def _job_env_vars(env: MutableMapping[str, str]) -> dict[str, str]:
    import json

    try:
        cfg = json.loads(env.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return dict((cfg.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


@contextlib.contextmanager
def ray_start_env() -> Iterator[None]:
    """Around starting a local Ray: without the policy's ``OMP_NUM_THREADS``, which the raylet and every
    worker would inherit, so Ray sets each worker's count from its task's ``num_cpus``. The user's stays."""
    value = _ours(os.environ).get(COUNT_VAR)
    if value is None:
        yield
        return
    os.environ.pop(COUNT_VAR, None)
    try:
        yield
    finally:
        os.environ.setdefault(COUNT_VAR, value)
