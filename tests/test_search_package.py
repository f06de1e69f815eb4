"""The search package's checks and bookkeeping: names and paths, the dataset checked once before Ray,
the state file, and the child runs a resumed search ends. Quick tests need no Ray; the one with Ray
is marked slow."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
from scoretune.errors import UserError
from scoretune.search import driver
from scoretune.search.space import build_space, load_space

ROOT = Path(__file__).resolve().parents[1]
TINY = conftest.TINY


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the driver gets as far as starting or joining Ray."""

    def refuse(*args, **kwargs):
        raise AssertionError("the driver started Ray")

    monkeypatch.setattr(driver, "ray_session", refuse)


def cli(*args: str) -> tuple[int, str, str]:
    from scoretune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- names and paths


def test_cli_refuses_a_name_that_leaves_the_storage_root(no_ray, tmp_path):
    rc, _, err = cli("search", str(ROOT / "search_spaces/quickstart.yaml"), "--name", "../../x",
                     "--set", f"storage_path={tmp_path / 'ray'}", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert rc == 2
    assert err.count("\n") == 1 and "--name" in err and "'../../x'" in err, err
    assert not (tmp_path / "ray").exists() and not (tmp_path / "m.db").exists()
    assert not (tmp_path.parent.parent / "x").exists()


def test_run_search_and_the_space_use_the_same_name_rule(no_ray, tmp_path):
    space = build_space({"name": "ok", "base": TINY, "params": {"lr": {"choice": [0.1]}},
                         "storage_path": str(tmp_path)})
    for bad in ("../x", "a/b", "..", ".hidden", "x" * 101):
        with pytest.raises(UserError, match="--name"):
            driver.run_search(space, name=bad, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
        with pytest.raises(UserError, match="name"):
            build_space({"name": bad, "base": TINY, "params": {"lr": {"choice": [0.1]}}})


def test_experiment_path_stays_inside_its_storage_root(tmp_path):
    storage, path = driver.experiment_path(str(tmp_path / "ray"), "s1")
    assert (storage, path) == (str(tmp_path / "ray"), str(tmp_path / "ray" / "s1"))
    with pytest.raises(UserError, match="outside"):
        driver.experiment_path(str(tmp_path / "ray"), "../elsewhere")
    assert driver.experiment_path("s3://bucket/ray/", "s1") == ("s3://bucket/ray/", "s3://bucket/ray/s1")


# ----------------------------------------------------------------------------- the dataset, once


def test_cifar_search_with_an_empty_data_root_fails_in_one_line_before_ray(no_ray, tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    space = load_space(ROOT / "search_spaces/cifar10_trades_se.yaml",
                       [f"base.data.root={empty}", f"storage_path={tmp_path / 'ray'}"])
    with pytest.raises(UserError) as e:
        driver.run_search(space, tracking_uri=uri, out=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("base.data: cifar10 not found") and str(empty) in msg
    assert "--set base.data.root=DIR" in msg and "no trial was started" in msg
    rc, _, err = cli("search", str(ROOT / "search_spaces/cifar10_trades_se.yaml"), "--tracking-uri", uri,
                     "--set", f"base.data.root={empty}", "--set", f"storage_path={tmp_path / 'ray'}")
    assert rc == 2 and err.count("\n") == 1 and "cifar10 not found" in err
    assert not (tmp_path / "ray").exists() and not (tmp_path / "m.db").exists()


def test_a_search_with_the_default_data_root_hands_trials_an_absolute_root(tmp_path, monkeypatch):
    from scoretune.search.tuner import trial_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCORETUNE_DATA", raising=False)
    space = build_space({"name": "t", "base": TINY, "params": {"lr": {"choice": [0.1]}}})
    settings = trial_settings(space, name="t", ray_path=str(tmp_path / "ray" / "t"))
    assert settings["base"]["data"]["root"] == str(tmp_path / "data")
    assert "root" not in space.base["data"]  # the space itself is left as written


# ----------------------------------------------------------------------------- the state file


def test_state_file_round_trip_and_a_missing_one(tmp_path):
    from scoretune.search.resume import STATE_FILE, read_state, write_state

    path = str(tmp_path / "ray" / "s1")
    with pytest.raises(UserError, match="not a scoretune search"):
        read_state(path)
    write_state(path, {"name": "s1", "attempt": 1})
    write_state(path, {"name": "s1", "attempt": 2})
    assert read_state(path) == {"name": "s1", "attempt": 2}
    assert sorted(p.name for p in Path(path).iterdir()) == [STATE_FILE]  # no temporary file left
    assert json.loads((Path(path) / STATE_FILE).read_text())["attempt"] == 2


# ----------------------------------------------------------------------------- resume: runs it will not continue


def _store(tmp_path):
    from scoretune.tracking import client, get_or_create_experiment, tags

    cl = client(f"sqlite:///{tmp_path / 'm.db'}")
    exp = get_or_create_experiment(cl, "e")
    parent = cl.create_run(exp, tags={tags.KIND: "search", tags.SEARCH: "s"}).info.run_id

    def child(tid: str, status: str = "RUNNING") -> str:
        run_id = cl.create_run(exp, tags={tags.PARENT: parent, tags.TRIAL: tid, tags.STATUS: status.lower()}).info.run_id
        if status != "RUNNING":
            cl.set_terminated(run_id, status=status)
        return run_id

    return cl, parent, child


def test_resume_ends_the_runs_it_will_not_continue(tmp_path):
    from scoretune.search.resume import attempt_label, end_superseded
    from scoretune.tracking import tags

    cl, parent, child = _store(tmp_path)
    going_on, done = child("a"), child("b", "FINISHED")
    orphan, errored = child("ghost"), child("c", "FAILED")
    label = attempt_label("s", 2)
    assert label.startswith("attempt 2 of search 's' (resumed ")
    lines: list[str] = []
    changed = end_superseded(cl, parent, {"a": "RUNNING", "b": "TERMINATED", "c": "ERROR"}, label, lines.append)
    assert sorted(changed) == sorted([orphan, errored]) and len(lines) == 1
    for run_id, status in ((orphan, "KILLED"), (errored, "FAILED")):
        run = cl.get_run(run_id)
        assert run.info.status == status and run.data.tags[tags.SUPERSEDED] == label
    for run_id, status in ((going_on, "RUNNING"), (done, "FINISHED")):
        run = cl.get_run(run_id)
        assert run.info.status == status and tags.SUPERSEDED not in run.data.tags
    # a later attempt leaves what an earlier one superseded as it was
    assert end_superseded(cl, parent, {"a": "RUNNING"}, attempt_label("s", 3), lines.append) == [done]
    assert cl.get_run(orphan).data.tags[tags.SUPERSEDED] == label


@pytest.mark.slow
def test_resumed_search_kills_a_run_whose_trial_tune_never_saved(ray_local, tmp_path):
    from scoretune.search.resume import read_state
    from scoretune.tracking import client, tags

    raw = {"name": "ghosts", "base": TINY, "params": {"lr": {"choice": [0.1]}}, "num_samples": 1,
           "max_concurrent": 1, "top_k": 0, "scheduler": {"type": "none"}, "storage_path": str(tmp_path / "ray")}
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    first = driver.run_search(build_space(raw), tracking_uri=uri, out=lambda s: None)
    assert first is not None and [t.status for t in first.trials] == ["completed"]
    cl = client(uri)
    exp = cl.get_run(first.parent_run_id).info.experiment_id
    ghost = cl.create_run(exp, tags={tags.PARENT: first.parent_run_id, tags.TRIAL: "ghost",
                                     tags.STATUS: "running"}).info.run_id  # a trial Tune never saved
    lines: list[str] = []
    again = driver.run_search(build_space(raw), resume=True, out=lines.append)
    assert again is not None and [t.trial_id for t in again.trials] == [first.trials[0].trial_id]
    run = cl.get_run(ghost)
    assert run.info.status == "KILLED"
    assert run.data.tags[tags.SUPERSEDED].startswith("attempt 2 of search 'ghosts' (resumed ")
    assert read_state(str(tmp_path / "ray" / "ghosts"))["attempt"] == 2
    kept = cl.get_run(first.trials[0].run_id)
    assert kept.info.status == "FINISHED" and tags.SUPERSEDED not in kept.data.tags
    assert any("resuming search 'ghosts'" in s for s in lines)


# ----------------------------------------------------------------------------- layering


def test_the_space_imports_neither_ray_nor_mlflow():
    code = ("import sys; import scoretune.search.space; from scoretune.search import build_space, SearchSpace; "
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_resume_refuses_a_local_storage_that_others_can_write(tmp_path):
    from scoretune.errors import UserError
    from scoretune.search.driver import check_trusted_storage

    exp = tmp_path / "ray" / "s"
    exp.mkdir(parents=True)
    check_trusted_storage(str(exp))  # ours, not world-writable: fine
    (tmp_path / "ray").chmod(0o777)
    with pytest.raises(UserError, match="can be written by another user"):
        check_trusted_storage(str(exp))
    (tmp_path / "ray").chmod(0o1777)  # sticky, like /tmp: others cannot replace our folder
    check_trusted_storage(str(exp))
    check_trusted_storage("s3://bucket/ray/s")  # remote storage: trusted by its access policy


def test_progress_callback_pickles_after_a_library_patched_print():
    """Ray Train V2 replaces builtins.print in the driver; Tune then pickles the search's callbacks.
    In a fresh process, so that ``print`` is the real builtin whatever this test session ran before."""
    import subprocess
    import sys

    code = (
        "import builtins, pickle\n"
        "from scoretune.search.callback import ProgressCallback\n"
        "cb = ProgressCallback(space=None, stoppers=[], out=print)\n"
        "real = builtins.print\n"
        "builtins.print = lambda *a, **k: None\n"
        "blob = pickle.dumps(cb)\n"
        "builtins.print = real\n"
        "back = pickle.loads(blob)\n"
        "assert back.out is real, back.out\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_a_server_gone_while_finalizing_says_to_resume_and_other_errors_pass_through(monkeypatch):
    from mlflow.tracking import MlflowClient
    from scoretune.tracking.server import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(Exception) as gone:
        MlflowClient(uri).get_run("0" * 32)  # the real error a dead server gives
    e = driver.summary_unfinished(gone.value, "s1", uri)
    assert isinstance(e, driver.SummaryUnfinished) and isinstance(e, UserError)
    assert str(e).startswith(f"search 's1' finished and its trials are in MLflow, but MLflow at {uri} went away")
    assert "rerun the same command with --resume" in str(e) and "\n" not in str(e)
    bug = KeyError("best_val_pgd_acc")
    assert driver.summary_unfinished(bug, "s1", uri) is bug


# ----------------------------------------------------------------------------- resume: a pruned checkpoint

COUNTING_TRAINABLE = '''
import json, os, tempfile, time
from ray import tune

def counting(config):
    """8 epochs of 0.3 s; each epoch's checkpoint holds the epoch count; the first result after a restore
    says where it started."""
    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.load(open(os.path.join(d, "state.json")))["epoch"]
    for epoch in range(start + 1, 9):
        time.sleep(0.3)
        with tempfile.TemporaryDirectory() as tmp:
            json.dump({"epoch": epoch}, open(os.path.join(tmp, "state.json"), "w"))
            tune.report({"epoch": epoch, "started_at": start, "score": epoch % 3},
                        checkpoint=tune.Checkpoint.from_directory(tmp))
'''


@pytest.mark.slow
def test_a_trial_whose_snapshot_names_a_pruned_checkpoint_goes_on_from_its_newest(ray_local, tmp_path):
    """Killed after Tune's last snapshot, while pruning (``keep_checkpoints``) deleted the checkpoint that
    snapshot names: the resumed trial goes on from the newest checkpoint left on disk, not fails."""
    import time

    from ray import tune
    from scoretune.search.resume import restore_pruned_checkpoints

    exp = tmp_path / "ray" / "race"
    script = tmp_path / "race.py"
    script.write_text(COUNTING_TRAINABLE + f'''
import ray
ray.init(address={ray_local.get_runtime_context().gcs_address!r}, log_to_driver=False)
tune.Tuner(counting, run_config=tune.RunConfig(name="race", storage_path={str(tmp_path / "ray")!r},
    checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="score"))).fit()
''')
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # until Tune's snapshot names a checkpoint of the running trial
            try:
                trials = tune.ExperimentAnalysis(str(exp)).trials
            except ValueError:  # no snapshot yet
                trials = []
            if trials and trials[0].checkpoint is not None and trials[0].status != "TERMINATED":
                break
            time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    (trial,) = tune.ExperimentAnalysis(str(exp)).trials
    named = Path(trial.checkpoint.path)
    assert trial.status != "TERMINATED" and named.is_dir()
    newer = named.parent / "checkpoint_000099"  # written after the snapshot ...
    newer.mkdir()
    (newer / "state.json").write_text(json.dumps({"epoch": 6}))
    for d in named.parent.glob("checkpoint_0000[0-8]*"):  # ... while pruning deleted the one the snapshot names
        subprocess.run(["rm", "-rf", str(d)], check=True)

    lines: list[str] = []
    assert restore_pruned_checkpoints(str(exp), lines.append) == [trial.trial_id]
    assert lines == [f"trial {trial.trial_id}: Tune's snapshot named checkpoint {named.name}, which pruning deleted "
                     "after the snapshot; it goes on from its newest, checkpoint_000099"]
    (result,) = tune.Tuner.restore(str(exp), trainable=_counting(), resume_unfinished=True).fit()
    assert result.error is None
    assert result.metrics["epoch"] == 8 and result.metrics["started_at"] == 6
    assert restore_pruned_checkpoints(str(exp), lines.append) == []  # nothing left to put back


def _cut_snapshot(folder: Path, session: str) -> list[str]:
    """What a kill during Tune's upload of its snapshot left (seen in a killed search): these three empty."""
    names = [f"experiment_state-{session}.json", f"search_gen_state-{session}.json", f"searcher-state-{session}.pkl"]
    for name in names:
        (folder / name).write_bytes(b"")
    return names


def _tune_snapshot(folder: Path, session: str = "2026-12-07_10-00-00") -> None:
    import pickle

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": [], "stats": {}}))
    (folder / f"search_gen_state-{session}.json").write_bytes(pickle.dumps({"counter": 3}))  # Tune's is a pickle
    (folder / f"searcher-state-{session}.pkl").write_bytes(pickle.dumps({"trials": [1, 2, 3]}))
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"tuner": 1}))


def test_the_keeper_copies_only_a_complete_snapshot_that_has_been_still(tmp_path):
    from scoretune.search.resume import KEPT_DIR, keep_snapshot

    _tune_snapshot(tmp_path)
    assert not keep_snapshot(tmp_path, settle=60.0)  # just written: an upload may be under way
    assert keep_snapshot(tmp_path, settle=0.0)
    assert not keep_snapshot(tmp_path, settle=0.0)  # unchanged since kept: not copied again
    kept = tmp_path / KEPT_DIR
    assert sorted(f.name for f in kept.iterdir()) == sorted(f.name for f in tmp_path.glob("*.*") if f.is_file())
    (tmp_path / "searcher-state-2026-12-07_10-00-00.pkl").write_bytes(b"\x80\x05\x95")  # cut mid-pickle
    assert not keep_snapshot(tmp_path, settle=0.0)
    assert (kept / "searcher-state-2026-12-07_10-00-00.pkl").read_bytes().endswith(b".")  # the complete copy stays


def test_the_keeper_never_stops_the_search_when_it_cannot_copy(tmp_path, monkeypatch):
    from scoretune.search import resume

    _tune_snapshot(tmp_path)
    keeper = resume.SnapshotKeeper(str(tmp_path), every=0.0, settle=0.0)

    def gone(*a, **k):
        raise FileNotFoundError("replaced by Tune meanwhile")

    monkeypatch.setattr(resume.shutil, "copy2", gone)
    keeper.on_step_end(1, [])  # no exception
    assert not (tmp_path / resume.KEPT_DIR).exists()
    monkeypatch.undo()
    keeper.on_step_end(2, [])
    assert (tmp_path / resume.KEPT_DIR).is_dir()


def test_a_snapshot_cut_with_no_kept_copy_is_one_line_saying_what_to_do(tmp_path):
    from scoretune.search.resume import repair_snapshot

    _tune_snapshot(tmp_path)
    _cut_snapshot(tmp_path, "2026-12-07_10-00-00")
    with pytest.raises(UserError, match=r"cut short when the search was killed \(experiment_state-.*another --name"):
        repair_snapshot(str(tmp_path))


def test_a_newer_attempts_cut_upload_is_set_aside_for_the_kept_older_one(tmp_path):
    import pickle

    from scoretune.search.resume import keep_snapshot, repair_snapshot

    _tune_snapshot(tmp_path, "2026-12-07_10-00-00")
    assert keep_snapshot(tmp_path, settle=0.0)
    _cut_snapshot(tmp_path, "2026-12-07_11-00-00")  # attempt 2, killed during its first upload
    lines: list[str] = []
    assert len(repair_snapshot(str(tmp_path), lines.append)) == 3
    assert not list(tmp_path.glob("*2026-12-07_11-00-00.json")) and len(list(tmp_path.glob("*11-00-00*.cut"))) == 3
    assert pickle.loads((tmp_path / "search_gen_state-2026-12-07_10-00-00.json").read_bytes()) == {"counter": 3}
    assert lines and "goes on from the last complete one" in lines[0]
    assert repair_snapshot(str(tmp_path), lines.append) == [] and len(lines) == 1  # whole now: nothing to do


@pytest.mark.slow
def test_a_search_killed_while_tune_uploaded_its_snapshot_resumes_from_the_kept_copy(ray_local, tmp_path):
    """The kill left Tune's snapshot files empty (Tune rewrites them in place); ``Tuner.restore`` cannot read
    them. The copy the keeper kept goes back, and the trial goes on from a checkpoint, not from scratch."""
    import time

    from ray import tune
    from scoretune.search.resume import KEPT_DIR, repair_snapshot, restore_pruned_checkpoints

    exp = tmp_path / "ray" / "cut"
    script = tmp_path / "cut.py"
    script.write_text(COUNTING_TRAINABLE.replace("range(start + 1, 9)", "range(start + 1, 21)") + f'''
import ray
from scoretune.search.resume import SnapshotKeeper
ray.init(address={ray_local.get_runtime_context().gcs_address!r}, log_to_driver=False)
tune.Tuner(counting, run_config=tune.RunConfig(name="cut", storage_path={str(tmp_path / "ray")!r},
    callbacks=[SnapshotKeeper({str(exp)!r}, every=0.0, settle=0.2)],
    checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="score"))).fit()
''')
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, named_at = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            if named_at is None:
                try:
                    trials = tune.ExperimentAnalysis(str(exp)).trials
                except (ValueError, OSError):  # no snapshot yet, or one being uploaded
                    trials = []
                if trials and trials[0].checkpoint is not None and trials[0].status != "TERMINATED":
                    named_at = time.time()  # Tune's snapshot names a checkpoint of the running trial ...
            elif (exp / KEPT_DIR).is_dir() and (exp / KEPT_DIR).stat().st_mtime > named_at + 0.1:
                break  # ... and the keeper kept a copy since
            time.sleep(0.1)
        assert proc.poll() is None, "the trial ended before the keeper kept a snapshot naming its checkpoint"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    (session,) = [f.name[len("experiment_state-"):-len(".json")] for f in exp.glob("experiment_state-*.json")]
    cut = _cut_snapshot(exp, session)
    with pytest.raises(ValueError):  # what --resume hit before
        tune.ExperimentAnalysis(str(exp))
    lines: list[str] = []
    assert sorted(repair_snapshot(str(exp), lines.append)) == sorted(cut)
    assert len(lines) == 1 and "goes on from the last complete one" in lines[0]
    restore_pruned_checkpoints(str(exp), lines.append)
    (result,) = tune.Tuner.restore(str(exp), trainable=_counting(epochs=20), resume_unfinished=True).fit()
    assert result.error is None
    assert result.metrics["epoch"] == 20 and result.metrics["started_at"] >= 1  # from a checkpoint


def _counting(epochs: int = 8):
    namespace: dict = {}
    exec(COUNTING_TRAINABLE.replace("range(start + 1, 9)", f"range(start + 1, {epochs + 1})"), namespace)
    return namespace["counting"]


# ----------------------------------------------------------------------------- seeds as a dimension


@pytest.mark.slow
def test_a_grid_search_over_seeds_reports_each_configuration_as_mean_std_and_n(ray_local, tmp_path):
    from scoretune.tracking import client
    from scoretune.tracking.runs import find_parent_runs

    raw = {"name": "seeded", "base": TINY, "params": {"beta": {"choice": [1.0, 6.0]}, "seed": {"choice": [0, 1]}},
           "sampler": {"type": "grid"}, "num_samples": 4, "max_concurrent": 2, "top_k": 0,
           "scheduler": {"type": "none"}, "storage_path": str(tmp_path / "ray")}
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    lines: list[str] = []
    summary = driver.run_search(build_space(raw), tracking_uri=uri, out=lines.append)
    assert summary is not None and len(summary.trials) == 4
    assert sorted((t.point["beta"], t.point["seed"]) for t in summary.trials) == [(1.0, 0), (1.0, 1), (6.0, 0), (6.0, 1)]
    cl = client(uri)
    (parent,) = find_parent_runs(cl, "seeded")
    report = cl.download_artifacts(parent.info.run_id, "report.md", str(tmp_path))
    table = Path(report).read_text().splitlines()
    assert table[0] == "| beta | clean (%) | PGD (%) | AutoAttack (%) |" and len(table) == 4
    assert [t.status for t in summary.trials] == ["completed"] * 4
    assert all(row.replace("**", "").endswith("| - |") and "(2)" in row for row in table[2:]), table  # no AA run
    pgd = {t.point["beta"]: [] for t in summary.trials}
    for t in summary.trials:
        pgd[t.point["beta"]].append(t.value("val_pgd_acc"))
    best_beta = max(pgd, key=lambda b: sum(pgd[b]) / 2)
    mean = sum(pgd[best_beta]) / 2
    assert table[2].startswith(f"| **{best_beta:.4g}** |") and f"**{mean * 100:.2f} ± " in table[2]
    assert "Over seeds" in parent.data.tags["mlflow.note.content"]


def test_a_search_whose_artifact_folder_is_unwritable_stops_before_ray_with_one_line(no_ray, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns").write_text("not a folder")  # MLflow's default artifact root here: refused even to root
    raw = {"name": "nowrite", "base": TINY, "params": {"lr": {"choice": [0.1]}}, "num_samples": 1, "top_k": 0,
           "scheduler": {"type": "none"}, "storage_path": str(tmp_path / "ray")}
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with pytest.raises(UserError, match="mlruns.*not writable") as e:
        driver.run_search(build_space(raw), tracking_uri=uri, out=lambda s: None)
    assert "\n" not in str(e.value)
    cl = MlflowClient(tracking_uri=uri)
    assert cl.search_runs([x.experiment_id for x in cl.search_experiments()]) == []  # no run left RUNNING
