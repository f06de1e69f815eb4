"""The buffered tracking writer on its own (no server needed): a closed port is an MLflow server that is
down, a SQLite store is the server that takes the replay."""

from __future__ import annotations

import json
import time

import pytest
from conftest import free_port

from scoretune import cli
from scoretune.tracking import get_or_create_experiment, tags
from scoretune.tracking.buffer import (PENDING, BufferedWriter, JournalError, is_transient, read_journal,
                                       replay_journal)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (making one takes seconds); each test its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('buffer') / 'store.db'}"


@pytest.fixture
def down_uri(monkeypatch):
    """An http URI nothing listens on, and MLflow's own retries off (the writer's backoff is under test)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return f"http://127.0.0.1:{free_port()}"


def _search_writes(w: BufferedWriter, exp: str, parent: str, trials: int = 3, epochs: int = 4) -> list[str]:
    """What the search callback writes: a run per trial, its params, one batch of metrics per epoch, the end."""
    from mlflow.entities import Metric

    runs = []
    for t in range(trials):
        run = w.create_run(exp, run_name=f"trial {t}", tags={tags.PARENT: parent, tags.TRIAL: f"t{t}"}).info.run_id
        w.log_batch(run, params=[{"key": "beta", "value": str(t)}])
        for e in range(1, epochs + 1):
            ts = int(time.time() * 1000)
            w.log_batch(run, metrics=[Metric("val_pgd_acc", 0.1 * e + t, ts, e), Metric("epoch", e, ts, e)])
        w.set_tag(run, tags.STATUS, "completed")
        w.set_terminated(run, "FINISHED")
        runs.append(run)
    return runs


def _check_store(uri: str, experiment: str, trials: int = 3, epochs: int = 4) -> None:
    from mlflow.tracking import MlflowClient

    cl = MlflowClient(uri)
    exp = cl.get_experiment_by_name(experiment)
    runs = cl.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get(tags.KIND) == "search"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get(tags.PARENT) == parents[0].info.run_id]
    assert sorted(r.data.tags[tags.TRIAL] for r in children) == [f"t{t}" for t in range(trials)]
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags[tags.STATUS] == "completed"
        assert [m.step for m in cl.get_metric_history(r.info.run_id, "val_pgd_acc")] == list(range(1, epochs + 1))
        assert r.data.params == {"beta": r.data.tags[tags.TRIAL][1:]}


def test_a_down_server_gets_provisional_runs_one_degraded_line_and_a_journal_that_replays(down_uri, store,
                                                                                           tmp_path):
    lines: list[str] = []
    journal = tmp_path / "journal.jsonl"
    w = BufferedWriter(down_uri, journal, experiments={"1": "searches-down"}, out=lines.append)
    # the parent run was made while the server was up: journal it as delivered (what adopt_run writes)
    w._write_line({"seq": 0, "op": "create_run", "run": PENDING + "p", "key": "p",
                   "args": {"experiment_id": "1", "experiment": "searches-down", "run_name": "s",
                            "tags": {tags.KIND: "search"}, "start_time": 1}})
    w._write_line({"created": "p", "run_id": "0" * 32})
    runs = _search_writes(w, "1", "0" * 32)
    assert w.failed_sends == 1  # one failed send, then backoff (and /health probes): no write waits on MLflow
    assert all(r.startswith(PENDING) for r in runs)
    assert len(w.pending) == 3 * (1 + 1 + 4 + 2) and w.errors == []
    assert [ln.split(":")[0] for ln in lines] == ["tracking degraded"]
    assert w.close() == len(w.pending) and journal.exists()  # kept: nothing was delivered

    _header, ops, created = read_journal(journal)
    assert [op["seq"] for op in ops] == sorted(op["seq"] for op in ops)  # in the order they were written
    assert created == {"p": "0" * 32}
    report = replay_journal(journal, store)  # a store that has never seen these runs
    assert report.unsent == 0 and report.errors == [] and report.runs == 4
    _check_store(store, "searches-down")
    again = replay_journal(journal, store)  # a second replay doubles nothing
    assert again.errors == [] and again.runs == 4
    _check_store(store, "searches-down")


def test_the_buffer_is_bounded_and_says_so_once(down_uri, tmp_path):
    lines: list[str] = []
    w = BufferedWriter(down_uri, tmp_path / "j.jsonl", max_pending=5, out=lines.append)
    for i in range(12):
        w.set_tag("r" * 32, "k", str(i))
    assert len(w.pending) == 5 and w.dropped == 7
    assert sum("tracking buffer full" in ln for ln in lines) == 1
    w.close()


def test_each_run_metric_step_is_written_once(store, tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = store
    cl = MlflowClient(uri)
    exp = get_or_create_experiment(cl, "once")
    w = BufferedWriter(uri, tmp_path / "j.jsonl", experiments={exp: "once"})
    run = w.create_run(exp, run_name="r").info.run_id
    assert not run.startswith(PENDING)  # delivered at once: the real id
    for _ in range(3):
        w.log_batch(run, metrics=[Metric("acc", 0.5, int(time.time() * 1000), 1)])
        w.log_metric(run, "acc", 0.5, step=2)
    assert [m.step for m in cl.get_metric_history(run, "acc")] == [1, 2]
    assert cl.get_run(run).data.tags[tags.WRITE_KEY]
    assert w.close() == 0 and not (tmp_path / "j.jsonl").exists()  # all delivered: the journal goes


def test_transient_and_permanent_failures():
    from mlflow.exceptions import MlflowException, RestException

    assert is_transient(MlflowException("API request failed with exception ConnectionError"))
    assert is_transient(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "x"}))
    assert is_transient(RestException({"error_code": "UNAUTHENTICATED", "message": "x"}))
    assert not is_transient(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "changed param"}))
    assert not is_transient(ValueError("bug"))
    assert is_transient(ConnectionRefusedError())


def _journal(tmp_path, *entries) -> str:
    path = tmp_path / "j.jsonl"
    path.write_text("\n".join(json.dumps(e) if not isinstance(e, str) else e for e in entries) + "\n")
    return str(path)


HEADER = {"format": "scoretune-tracking-journal", "version": 1}


def test_a_torn_last_line_is_ignored_and_a_corrupt_middle_is_one_error(tmp_path):
    op = {"seq": 1, "op": "set_tag", "run": "r", "args": {"key": "k", "value": "v"}}
    _h, ops, _c = read_journal(_journal(tmp_path, HEADER, op, '{"seq": 2, "op": "set_t'))
    assert [o["seq"] for o in ops] == [1]
    with pytest.raises(JournalError, match="line 2 is not JSON"):
        read_journal(_journal(tmp_path, HEADER, "{not json", op))
    with pytest.raises(JournalError, match="unknown op 'delete_run'"):
        read_journal(_journal(tmp_path, HEADER, {"seq": 1, "op": "delete_run", "run": "r", "args": {}}))
    with pytest.raises(JournalError, match="newer scoretune"):
        read_journal(_journal(tmp_path, {**HEADER, "version": 99}))


@pytest.mark.parametrize("content", ["", "hello\n", '{"a": 1}\n'])
def test_sync_of_a_file_that_is_no_journal_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "x.jsonl"
    path.write_text(content)
    rc = cli.main(["sync", str(path), "--tracking-uri", "sqlite:////nonexistent/never-made.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "journal" in err[0]
    assert cli.main(["sync", str(tmp_path / "missing.jsonl")]) == 2


def test_sync_replays_and_removes_the_journal(down_uri, store, tmp_path, capsys):
    w = BufferedWriter(down_uri, tmp_path / "j.jsonl", experiments={"7": "searches-sync"}, out=lambda s: None)
    parent = w.create_run("7", run_name="s", tags={tags.KIND: "search"}).info.run_id
    _search_writes(w, "7", parent)
    assert w.close() > 0
    assert cli.main(["sync", str(tmp_path / "j.jsonl"), "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert "replayed" in out and "(4 runs)" in out and not (tmp_path / "j.jsonl").exists()
    _check_store(store, "searches-sync")


def test_a_held_writer_sends_one_steps_writes_to_a_run_as_one_call(store, tmp_path):
    """What the search callback writes in one Tune step (a result's metrics, its checkpoint's tag) reaches
    MLflow as one log_batch; the journal still has each write, and nothing is lost or doubled."""
    from mlflow.entities import Metric, RunTag

    from scoretune.tracking import client

    cl = client(store)
    exp = get_or_create_experiment(cl, "held")
    w = BufferedWriter(store, tmp_path / "held.jsonl")
    run = w.create_run(exp, run_name="trial").info.run_id
    calls = []
    real = w.client.log_batch
    w.client.log_batch = lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1]
    w.hold()
    w.log_batch(run, metrics=[Metric("val_pgd_acc", 0.4, 1, 1), Metric("epoch", 1.0, 1, 1)])
    w.log_batch(run, tags=[RunTag("scoretune.best_checkpoint", "/ckpt/1")])
    w.log_batch(run, metrics=[Metric("val_pgd_acc", 0.5, 2, 2)])
    assert calls == [] and len(w.pending) == 1  # held: queued, and one call's worth
    w.release()
    assert calls == [run] and not w.pending
    got = cl.get_run(run).data
    assert got.metrics["val_pgd_acc"] == 0.5 and got.tags["scoretune.best_checkpoint"] == "/ckpt/1"
    assert [m.step for m in cl.get_metric_history(run, "val_pgd_acc")] == [1, 2]
    _, ops, _ = read_journal(tmp_path / "held.jsonl")
    assert [op["op"] for op in ops] == ["create_run", "log_batch", "log_batch", "log_batch"]
    w.log_batch(run, metrics=[Metric("val_pgd_acc", 0.6, 3, 3)])  # not held: sent at once
    assert calls == [run, run]
    w.close()
