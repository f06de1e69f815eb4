"""The team tracking server for real: PostgreSQL + ``mlflow server --app-name basic-auth``, started here on
free loopback ports and stopped by pid (tests/server_stack.py), with real searches against it.

* Authentication: no login / a wrong password get 401 and write nothing; a foreign Host header is refused;
  no secret is on a command line.
* Two searches at once (4 trials 4 at a time, and 2 trials 2 at a time, each with its own local Ray):
  every trial's run and every epoch's metrics present, no write error, two distinct parents.
* The server SIGKILLed mid-search: restarted 15 s later, the search completes and MLflow holds every
  epoch of every trial exactly once; never restarted, the search ends with its journal, and
  ``scoretune sync`` replays it into a fresh server to the same result.

Four searches and three MLflow servers: a few minutes of wall time in all (slow).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import server_stack as S

pytestmark = pytest.mark.slow
BACK_TRIALS, GONE_TRIALS = 4, 3  # the outage searches, 2 at a time: trials started after the kill get their runs late


@pytest.fixture(scope="module")
def stack():
    st = S.start_stack()
    try:
        main = st.launch("mlflow")
        doomed = st.launch("mlflow_doomed")  # the server of the search whose server never comes back
        for srv in (main, doomed):
            srv.wait_healthy(300)
        st.main, st.doomed = main, doomed
        saved = {k: os.environ.get(k) for k in st.client_env}
        os.environ.update(st.client_env)  # this process reads the servers as the admin
        yield st
    finally:
        for k, v in locals().get("saved", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        S.remove(st)


def _session():
    import requests

    s = requests.Session()
    s.trust_env = False  # no proxy between us and 127.0.0.1
    return s


# ----------------------------------------------------------------------------- authentication and exposure
def test_requests_without_or_with_a_wrong_login_get_401_and_write_nothing(stack):
    api = f"{stack.main.url}/api/2.0/mlflow"
    http = _session()
    for auth in (None, (S.ADMIN, "wrong-password"), ("mallory", stack.password)):
        assert http.post(f"{api}/experiments/create", json={"name": "intruder"}, auth=auth).status_code == 401
        assert http.post(f"{api}/runs/create", json={"experiment_id": "0"}, auth=auth).status_code == 401
        assert http.get(f"{api}/experiments/search", params={"max_results": 10}, auth=auth).status_code == 401
    admin = (S.ADMIN, stack.password)
    r = http.get(f"{api}/experiments/get-by-name", params={"experiment_name": "intruder"}, auth=admin)
    assert r.status_code == 404  # nothing was created
    r = http.post(f"{api}/runs/search", json={"experiment_ids": ["0"]}, auth=admin)
    assert r.status_code == 200 and r.json().get("runs", []) == []


def test_a_foreign_host_header_is_refused(stack):
    http = _session()
    url = f"{stack.main.url}/api/2.0/mlflow/experiments/search"
    admin = (S.ADMIN, stack.password)
    assert http.get(url, params={"max_results": 1}, auth=admin).status_code == 200
    r = http.get(url, params={"max_results": 1}, auth=admin, headers={"Host": "evil.example.com"})
    assert r.status_code == 403 and "Host" in r.text
    assert http.get(url, params={"max_results": 1}, auth=admin,
                    headers={"Host": f"localhost:{stack.main.port}"}).status_code == 200  # an SSH tunnel's


def test_no_secret_is_on_a_command_line_and_the_auth_config_is_private(stack):
    from benchmarks._common import descendants

    db_password = stack.pg.password()
    pids = [stack.main.proc.pid, *descendants(stack.main.proc.pid), stack.pg.pid()]
    for pid in pids:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        for secret in (stack.password, stack.secret_key, db_password):
            assert secret not in cmd
    assert "--app-name\x00basic-auth" in Path(f"/proc/{stack.main.proc.pid}/cmdline").read_text()
    for f in (stack.main.auth_config, stack.pg.pgpass):
        assert f.stat().st_mode & 0o077 == 0


def test_a_client_with_a_wrong_password_fails_fast_with_one_line(stack, monkeypatch):
    from scoretune import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-it")
    monkeypatch.setattr(tracking, "_REACHED", set())
    with pytest.raises(tracking.TrackingAuthError, match="refused user 'admin' .*MLFLOW_TRACKING_PASSWORD"):
        tracking.client(stack.main.url)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(tracking.TrackingAuthError, match="requires a login .*MLFLOW_TRACKING_USERNAME"):
        tracking.client(stack.main.url)


# ----------------------------------------------------------------------------- searches
def _assert_every_epoch_once(cl, name: str, trials: int) -> str:
    parents, children = S.search_runs(cl, S.EXPERIMENT, name)
    assert len(parents) == 1, [p.info.run_id for p in parents]
    assert parents[0].info.status == "FINISHED"
    ids = [r.data.tags["scoretune.trial_id"] for r in children]
    assert len(ids) == len(set(ids)) == trials
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags["scoretune.status"] == "completed"
        for key in ("val_pgd_acc", "epoch", "train_loss"):
            steps = [m.step for m in cl.get_metric_history(r.info.run_id, key)]
            assert steps == list(range(1, S.EPOCHS + 1)), (r.data.tags["scoretune.trial_id"], key, steps)
        assert float(r.data.params["lr"]) > 0
    return parents[0].info.run_id


def _most_open_at_once(runs) -> int:
    """The most runs open (between start and end time) at one moment."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs],
                    key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


def _degraded_lines(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if "tracking degraded" in ln or "tracking recovered" in ln]


def test_two_searches_at_once_log_every_trial_and_epoch_with_no_write_error(stack, tmp_path):
    url = stack.main.url
    a = S.space_file(tmp_path, "team-a", url, trials=4, concurrent=4)
    b = S.space_file(tmp_path, "team-b", url, trials=2, concurrent=2)
    procs = [S.start_search(sp, tmp_path / f"{sp.stem}.log", stack.client_env) for sp in (a, b)]
    try:
        for p, sp in zip(procs, (a, b)):
            assert p.wait(timeout=900) == 0, (tmp_path / f"{sp.stem}.log").read_text()[-3000:]
    finally:
        for p in procs:
            S.stop_search(p)
    cl = stack.client(stack.main)
    parents = {_assert_every_epoch_once(cl, "team-a", 4), _assert_every_epoch_once(cl, "team-b", 2)}
    assert len(parents) == 2
    for sp in (a, b):
        log = (tmp_path / f"{sp.stem}.log").read_text()
        assert "refused a write" not in log and "write(s) refused" not in log and "tracking degraded" not in log
    _, a_runs = S.search_runs(cl, S.EXPERIMENT, "team-a")
    assert _most_open_at_once(a_runs) == 4  # 4 trials at a time did run (their runs overlap in MLflow)
    assert not list((tmp_path / "ray").glob("*/tracking-journal.jsonl*"))  # all delivered: no journal left


@pytest.fixture(scope="module")
def outage(stack, tmp_path_factory):
    """Two searches; each one's server is SIGKILLed after its first epoch. The main server comes back 15 s
    later; the other never does (its search waits 5 s at the end, then keeps its journal), and a fresh
    server (a new database) is started for the replay."""
    tmp = tmp_path_factory.mktemp("outage")
    back = S.space_file(tmp, "outage-back", stack.main.url, trials=BACK_TRIALS, concurrent=2)
    gone = S.space_file(tmp, "outage-gone", stack.doomed.url, trials=GONE_TRIALS, concurrent=2)
    logs = {sp.stem: tmp / f"{sp.stem}.log" for sp in (back, gone)}
    procs = {"outage-back": S.start_search(back, logs["outage-back"], stack.client_env, SCORETUNE_TRACKING_DRAIN_S="600"),
             "outage-gone": S.start_search(gone, logs["outage-gone"], stack.client_env, SCORETUNE_TRACKING_DRAIN_S="5")}
    fresh = None
    try:
        killed = S.kill_at_first_epoch({"outage-back": (stack.client(stack.main), stack.main),
                                        "outage-gone": (stack.client(stack.doomed), stack.doomed)},
                                       S.EXPERIMENT, 600, procs.values())["outage-back"]
        fresh = stack.launch("mlflow_fresh")
        time.sleep(max(0.0, 15 - (time.monotonic() - killed)))
        stack.main = stack.restart(stack.main)
        stack.main.wait_healthy(300)
        fresh.wait_healthy(300)
        rcs = {name: p.wait(timeout=900) for name, p in procs.items()}
    finally:
        for p in procs.values():
            S.stop_search(p)
    yield {"rcs": rcs, "logs": logs, "fresh": fresh}


def test_a_search_outlives_a_killed_server_and_mlflow_holds_every_epoch_once(stack, outage):
    log = outage["logs"]["outage-back"]
    assert outage["rcs"]["outage-back"] == 0, log.read_text()[-3000:]
    _assert_every_epoch_once(stack.client(stack.main), "outage-back", BACK_TRIALS)
    lines = _degraded_lines(log)
    assert [ln.split(": ")[0].split("] ")[-1] for ln in lines] == ["tracking degraded", "tracking recovered"], lines


def test_when_the_server_never_returns_the_journal_replays_into_a_fresh_server(stack, outage):
    log = outage["logs"]["outage-gone"]
    text = log.read_text()
    assert outage["rcs"]["outage-gone"] == 2, text[-3000:]
    assert sum("tracking degraded" in ln for ln in text.splitlines()) == 1
    m = re.search(r"replay them with `scoretune sync (\S+)`", text)
    assert m, text[-2000:]
    journal = Path(m.group(1))
    assert journal.is_file() and journal.stat().st_mode & 0o077 == 0
    fresh = outage["fresh"]
    env = {**os.environ, **stack.client_env}
    r = subprocess.run([sys.executable, "-m", "scoretune.cli", "sync", str(journal), "--tracking-uri", fresh.url],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"({GONE_TRIALS + 1} runs)" in r.stdout and not journal.exists()
    _assert_every_epoch_once(stack.client(fresh), "outage-gone", GONE_TRIALS)


def test_a_server_lost_while_the_summary_is_written_leaves_a_search_that_resume_finishes(stack, tmp_path):
    """Every trial has ended and the best one's model is logged when MLflow dies (its AutoAttack, the plots
    and the parent run's summary are still to come): the search ends with one line saying to resume, and
    --resume, once the server is back, trains nothing again and writes the rest, the model once."""
    space = S.space_file(tmp_path, "cut-summary", stack.main.url, trials=2, concurrent=2, top_k=1,
                         autoattack={"version": "fast", "n_ex": 32, "batch_size": 32})
    log = tmp_path / "cut-summary.log"
    proc = S.start_search(space, log, stack.client_env)
    try:
        deadline = time.monotonic() + 600
        while "logged model of trial" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        stack.main.kill()
        rc = proc.wait(timeout=600)
    finally:
        S.stop_search(proc)
    text = log.read_text()
    assert rc == 2, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert "search 'cut-summary' finished and its trials are in MLflow" in last and "with --resume" in last, last
    stack.main = stack.restart(stack.main)
    stack.main.wait_healthy(300)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    r = subprocess.run([sys.executable, "-m", "scoretune.cli", "search", str(space), "--resume"], cwd=tmp_path,
                       capture_output=True, text=True, env={**env, **stack.client_env}, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert not re.search(r"\] start ", r.stdout) and "logged model" not in r.stdout, r.stdout  # nothing trained or logged again
    cl = stack.client(stack.main)
    parents, _ = S.search_runs(cl, S.EXPERIMENT, "cut-summary")
    parent = cl.get_run(parents[0].info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials"] == 2
    assert {f.path for f in cl.list_artifacts(parent.info.run_id)} >= {"plots", "trials.txt"}
    best = cl.get_run(parent.data.tags["scoretune.best_run_id"])
    assert 0.0 <= best.data.metrics["aa_acc"] <= 1.0  # the AutoAttack the cut run owed
    models = cl.search_logged_models([parent.info.experiment_id], filter_string=f"source_run_id = '{best.info.run_id}'")
    assert len(models) == 1
