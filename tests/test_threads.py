"""The thread policy: torch threads sized to the CPUs a process may use and libgomp's spinning wait kept, unless
the user chose; in place before torch loads, in the CLI's processes, their children and Ray's workers."""

import json
import os
import subprocess
import sys

import pytest

from scoretune import threads

PROBE = """
import json, os, sys
import scoretune, torch
print(json.dumps({"env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
                  "torch": torch.get_num_threads()}))
"""


@pytest.mark.parametrize("cpus, affinity, quota, want", [
    (None, 2, None, 2),      # the affinity mask
    (None, 8, 1.5, 1),       # a cgroup quota of 1.5 CPUs: 1 thread
    (None, 2, 3.0, 2),       # a quota above the affinity
    (1, 2, None, 1),         # a Ray task with num_cpus=1
    (0.5, 2, None, 1),       # fractional CPUs: at least one thread
    (4, 2, None, 2),         # never more than the process may use
])
def test_the_budget_is_the_least_of_the_limits(cpus, affinity, quota, want):
    assert threads.cpu_budget(cpus, affinity=affinity, quota=quota) == want


def test_the_cgroup_quota_is_read_from_v2_or_v1(tmp_path):
    assert threads.cgroup_cpus(tmp_path) is None
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpus(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    assert threads.cgroup_cpus(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpus(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpus(tmp_path) == 1.5


def test_the_policy_sets_the_count_unless_the_user_did():
    assert threads.policy_env({}, affinity=2, quota=None) == {"OMP_NUM_THREADS": "2"}
    assert threads.policy_env({"OMP_NUM_THREADS": " "}, affinity=2, quota=None) == {"OMP_NUM_THREADS": "2"}
    assert threads.policy_env({"OMP_NUM_THREADS": "3"}, affinity=2, quota=None) == {}
    # a wait setting of the user's is theirs; the policy sets none (libgomp's spinning default)
    assert threads.policy_env({"OMP_WAIT_POLICY": "PASSIVE"}, affinity=2, quota=None) == {"OMP_NUM_THREADS": "2"}
    off = {threads.MARK_VAR: "off"}
    assert threads.policy_env(off, affinity=2, quota=None) == {}
    assert threads.apply(off) == {} and off == {threads.MARK_VAR: "off"}


def test_apply_records_what_it_set_and_a_child_recomputes_it():
    env = {}
    assert threads.apply(env) == {"OMP_NUM_THREADS": str(threads.cpu_budget())}
    assert env[threads.MARK_VAR] == f"OMP_NUM_THREADS={threads.cpu_budget()}"
    assert threads.apply(dict(env)) == threads.apply(env)  # idempotent
    # inherited from a parent with more CPUs: the policy's own count is recomputed, the user's kept
    parent = {"OMP_NUM_THREADS": "8", threads.MARK_VAR: "OMP_NUM_THREADS=8"}
    assert threads.policy_env(parent, affinity=1, quota=None) == {"OMP_NUM_THREADS": "1"}
    assert threads.user_settings(parent) == set()
    user = {**parent, "OMP_NUM_THREADS": "3", "GOMP_SPINCOUNT": "10000"}  # changed since: the user's
    assert threads.policy_env(user, affinity=1, quota=None) == {}
    assert threads.user_settings(user) == {"OMP_NUM_THREADS", "GOMP_SPINCOUNT"}


def test_ray_workers_get_the_users_wait_setting_but_not_a_job_conflict():
    env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"}
    assert threads.ray_env_vars(env) == {"OMP_WAIT_POLICY": "PASSIVE"}
    job = {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}
    assert threads.ray_env_vars({**env, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}) == {}


def test_a_local_ray_starts_without_the_policys_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv(threads.MARK_VAR, "OMP_NUM_THREADS=2")
    with threads.ray_start_env():
        assert "OMP_NUM_THREADS" not in os.environ
    assert os.environ["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's: stays
    with threads.ray_start_env():
        assert os.environ["OMP_NUM_THREADS"] == "1"


def _probe(env: dict[str, str], **kw) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                          check=True, **kw)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _clean_env() -> dict[str, str]:
    drop = {*threads.WAIT_VARS, threads.COUNT_VAR, threads.MARK_VAR}
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_a_scoretune_process_loads_torch_under_the_policy():
    got, err = _probe({**_clean_env(), "OMP_DISPLAY_ENV": "verbose"})
    n = threads.cpu_budget()
    assert got == {"env": {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": str(n)}, "torch": n}
    assert f"OMP_NUM_THREADS = '{n}'" in err  # libgomp read the policy's count when torch loaded it
    assert "GOMP_SPINCOUNT = '300000'" in err  # and keeps its spinning wait (the governor sizes the threads)


def test_the_users_settings_win_in_a_scoretune_process():
    got, err = _probe({**_clean_env(), "OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1", "OMP_DISPLAY_ENV": "true"})
    assert got == {"env": {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}, "torch": 1}
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in err
    got, err = _probe({**_clean_env(), threads.MARK_VAR: "off", "OMP_DISPLAY_ENV": "verbose"})
    assert got["env"] == {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": None}
    assert "GOMP_SPINCOUNT = '300000'" in err  # libgomp's default


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 CPUs and sched_setaffinity")
def test_a_child_pinned_to_one_cpu_gets_one_thread():
    # the child of a process under the policy inherits its count marked as the policy's, and recomputes it
    parent = {**os.environ, threads.COUNT_VAR: "2", threads.MARK_VAR: f"{threads.COUNT_VAR}=2"}
    one = min(os.sched_getaffinity(0))
    got, _ = _probe(parent, preexec_fn=lambda: os.sched_setaffinity(0, {one}))
    assert got == {"env": {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": "1"}, "torch": 1}


RAY_DRIVER = """
import json, os
import scoretune
import ray
from scoretune.drivers.ray_session import ray_session

def probe():
    import torch
    return {"env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
            "torch": torch.get_num_threads()}

with ray_session(num_cpus=2, out=lambda s: None):
    print(json.dumps(ray.get(ray.remote(num_cpus=1)(probe).remote())))
"""


@pytest.mark.slow
def test_a_ray_worker_of_a_scoretune_driver_sees_the_policy():
    proc = subprocess.run([sys.executable, "-c", RAY_DRIVER], env=_clean_env(), capture_output=True, text=True,
                          timeout=300, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"env": {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": "1"}, "torch": 1}
