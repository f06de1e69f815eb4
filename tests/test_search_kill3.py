"""Three SIGKILLs of the search driver, each followed by ``--resume`` (one search, run once per module): no
trial runs twice, MLflow holds one parent and every trial's epochs once with no run left RUNNING, and the
Optuna study goes on across the kills. (What the kills cost in time: ``benchmarks/kill_resume.py``.)"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

TRIALS, EPOCHS = 6, 4
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from benchmarks import kill_resume as bench

    folder = tmp_path_factory.mktemp("kill3")
    space, log = bench.write_space(folder, "killed", trials=TRIALS, epochs=EPOCHS), folder / "driver.log"
    rc = bench.killed_then_resumed(space, log, kills=3)
    cl = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exps = [e.experiment_id for e in cl.search_experiments()]
    every = cl.search_runs(exps, run_view_type=ViewType.ALL, max_results=1000)
    active = [r for r in every if r.info.lifecycle_stage == "active"]
    parents = [r for r in active if r.data.tags.get("scoretune.kind") == "search"]
    children = [r for r in active if parents and r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return SimpleNamespace(rc=rc, log=log.read_text(), folder=folder, client=cl, every=every, parents=parents,
                           children=children)


def test_the_last_resume_finishes_the_search(killed):
    assert killed.rc == 0, killed.log[-3000:]
    assert killed.log.count("resuming search 'killed'") == 3


def test_no_run_is_left_running_and_there_is_one_parent(killed):
    assert [r.info.run_id for r in killed.every if r.info.status == "RUNNING"] == []
    assert len(killed.parents) == 1 and killed.parents[0].info.status == "FINISHED"


def test_every_trial_logs_each_epoch_once(killed):
    trial_ids = [r.data.tags["scoretune.trial_id"] for r in killed.children]
    assert len(trial_ids) == len(set(trial_ids)) == TRIALS
    for r in killed.children:
        steps = [m.step for m in killed.client.get_metric_history(r.info.run_id, "val_pgd_acc")]
        assert steps == list(range(1, EPOCHS + 1)), (r.data.tags["scoretune.trial_id"], steps)


def test_every_trial_ends_as_it_would_have_without_the_kills(killed):
    # which params each trial got depends on the kills' timing (TPE, constant liar), and an lr near 0.3 may
    # diverge: judged so on its epochs, it ends "diverged", never stopped, superseded or failed
    statuses = [r.data.tags["scoretune.status"] for r in killed.children]
    assert set(statuses) <= {"completed", "diverged"} and "completed" in statuses, statuses
    assert sum("scoretune.model_uri" in r.data.tags for r in killed.children) == 1  # top_k 1: logged once


def test_the_optuna_study_goes_on_across_the_kills(killed):
    from scoretune.search.study import ABANDONED_ATTR

    # Tune keeps the searcher (study included) in the experiment folder; the newest by name, as Tune picks
    state = max((killed.folder / "ray" / "killed").glob("searcher-state-*.pkl"))
    study = pickle.loads(state.read_bytes())["study"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == TRIALS
    # a trial a kill cut while Optuna sampled its params has none: the resume marks it failed and abandoned
    cut = [t for t in study.trials if t not in complete]
    assert all(t.state.name == "FAIL" and ABANDONED_ATTR in t.user_attrs and not t.params for t in cut), cut
    assert sorted(round(t.params["lr"], 10) for t in complete) == sorted(
        round(float(r.data.params["lr"]), 10) for r in killed.children)
