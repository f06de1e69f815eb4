"""A search that learns from every run (issue 17): warm starts, the Optuna study in RDB storage,
``scoretune dashboard``, parameter importance and constraints.

The importance / constraint tests drive the searcher directly on a crafted space (no Ray, no training):
the objective depends on ``beta`` alone and ``lr`` decides feasibility, so about half of the random
start-up trials are infeasible. The warm-start end to end runs two shrunk quickstarts (slow).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import conftest
import pytest
from scoretune.config import ConfigError
from scoretune.search.space import build_space

ROOT = Path(__file__).resolve().parents[1]
BASE = {"data": {"name": "digits", "val_size": 0.1}, "model": {"name": "mlp"}, "attack": {"eps": 0.1, "steps": 1},
        "eval": {"pgd_steps": 2, "test": False}, "epochs": 2, "batch_size": 128, "device": "cpu"}
PARAMS = {"beta": {"loguniform": [1.0, 10.0]}, "lr": {"loguniform": [0.01, 0.5]}, "loss": {"choice": ["se", "kl"]}}
LR_CUT = math.sqrt(0.01 * 0.5)  # the log-midpoint of lr: below it feasible, above it not


def crafted_space(**extra):
    raw = {"name": "crafted", "base": BASE, "params": PARAMS, "num_samples": 40, "max_concurrent": 1,
           "sampler": {"type": "tpe", "n_startup_trials": 16},
           "constraints": [{"metric": "val_clean_acc", "min": 0.5}], **extra}
    return build_space(raw)


def objective(point):
    """val_pgd_acc decided by beta alone (peak at beta = 3); val_clean_acc by lr alone."""
    pgd = 0.9 - 0.3 * abs(math.log(point["beta"] / 3.0))
    clean = 0.9 if point["lr"] < LR_CUT else 0.1
    return pgd, clean


def drive(space, n=None, storage=None):
    """Run the space's searcher (as Tune would) on the crafted objective; returns its Optuna study."""
    from scoretune.search.tuner import build_searcher

    limiter = build_searcher(space, storage=storage, study_name=space.name)
    searcher = limiter.searcher
    for i in range(n or space.total_samples):
        tid = f"t{i:03d}"
        point = searcher.suggest(tid)
        pgd, clean = objective(point)
        for epoch, f in ((1, 0.5), (2, 1.0)):  # the best epoch (2) is the last
            searcher.on_trial_result(tid, {"epoch": epoch, "training_iteration": epoch, "val_pgd_acc": pgd * f,
                                           "val_clean_acc": clean})
        searcher.on_trial_complete(tid, {"epoch": 2, "val_pgd_acc": pgd, "val_clean_acc": clean})
    return searcher.study


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow SQLite store for the module's MLflow-only tests (each uses its own names in it)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def crafted_study():
    return drive(crafted_space())


# ----------------------------------------------------------------------------- bad input: one line each


def test_constraint_on_a_metric_no_trial_reports_is_one_line_naming_the_key():
    with pytest.raises(ConfigError) as e:
        crafted_space(constraints=[{"metric": "val_clean_acc", "min": 0.5}, {"metric": "val_robust_acc", "min": 0.1}])
    msg = str(e.value)
    assert "constraints.1.metric" in msg and "val_robust_acc" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"constraints\.0.*test_clean_acc"):  # eval.test: false reports no test_*
        crafted_space(constraints=[{"metric": "test_clean_acc", "min": 0.5}])
    with pytest.raises(ConfigError, match="give min: and/or max:"):
        crafted_space(constraints=[{"metric": "val_clean_acc"}])


def test_warm_start_from_a_search_that_does_not_exist_is_one_line_naming_the_key(store):
    from scoretune.search.study import WarmStartError, collect
    from scoretune.tracking import client

    cl = client(store)
    with pytest.raises(WarmStartError) as e:
        collect(cl, crafted_space(warm_start={"from": "nosuch"}), "nosuch")
    assert str(e.value).startswith("warm_start.from: no search or MLflow experiment called 'nosuch'")
    assert "\n" not in str(e.value)


def test_dashboard_port_in_use_is_one_line_naming_the_port(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "scoretune.cli", "dashboard", "--storage", url, "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--port: {port} is already in use on 127.0.0.1" in lines[0]


# ----------------------------------------------------------------------------- constraints and importance


def test_constrained_tpe_records_every_trials_constraint_and_marks_half_the_start_up_infeasible(crafted_study):
    trials = crafted_study.trials
    assert len(trials) == 40
    cons = [t.constraints for t in trials]  # Optuna 5: set on each trial before it was told
    for t, c in zip(trials, cons):  # the value Optuna saw: 0.5 - val_clean_acc at the best epoch
        assert c == {"val_clean_acc >= 0.5": pytest.approx(-0.4 if t.params["lr"] < LR_CUT else 0.4)}
        assert t.user_attrs["scoretune.constraint_metrics"] == {"val_clean_acc": 0.9 if t.params["lr"] < LR_CUT else 0.1}
    bad = [c["val_clean_acc >= 0.5"] > 0 for c in cons]
    startup = bad[:16]
    assert 5 <= sum(startup) <= 11  # about half of the random start-up is infeasible
    later = bad[16:]
    assert sum(later) / len(later) < sum(startup) / len(startup)  # constrained TPE steers to the feasible side


def test_the_best_trial_is_chosen_among_the_feasible_ones(crafted_study):
    best_any = max(crafted_study.trials, key=lambda t: t.value)
    feasible = [t for t in crafted_study.trials if all(v <= 0 for v in t.constraints.values())]
    best_feasible = max(feasible, key=lambda t: t.value)
    assert crafted_study.best_trial.number == best_feasible.number  # Optuna 5: best among feasible
    assert best_feasible.params["lr"] < LR_CUT and best_any.value >= best_feasible.value


def test_importance_ranks_the_one_parameter_that_decides_the_objective_first(crafted_study):
    from scoretune.search.study import format_importance, importance_figure, importance_metrics, param_importances

    space = crafted_space()
    imp = param_importances(crafted_study, space.objective)
    ranked = list(imp["val_pgd_acc"])
    assert ranked[0] == "beta" and set(ranked) == {"beta", "lr", "loss"}
    assert imp["val_pgd_acc"]["beta"] > 0.5 and sum(imp["val_pgd_acc"].values()) == pytest.approx(1.0)
    m = importance_metrics(imp)
    assert m["importance.val_pgd_acc.beta"] == imp["val_pgd_acc"]["beta"]
    text = format_importance(imp)
    assert text.splitlines()[0].startswith("parameter importance (PED-ANOVA") and "beta" in text.splitlines()[1]
    fig = importance_figure(imp)
    assert [ax.get_xlabel() for ax in fig.axes] == ["importance for val_pgd_acc (PED-ANOVA)"]


def test_infeasible_trials_are_marked_in_mlflow_and_the_summary_and_promote_refuses_them(store):
    from scoretune.errors import UserError
    from scoretune.search.report import SearchSummary, TrialSummary, format_report, format_table, front_of
    from scoretune.search.study import feasible_first, mark_feasibility
    from scoretune.tracking import client, tags
    from scoretune.tracking.promote import pick_best

    space = crafted_space(objective=[{"metric": "val_pgd_acc"}, {"metric": "train_loss", "mode": "min"}])
    cl = client(store)
    exp = cl.create_experiment("crafted")
    parent = cl.create_run(exp, tags={tags.KIND: "search", tags.SEARCH: "crafted"})
    cl.log_param(parent.info.run_id, "search.objective", "val_pgd_acc:max, train_loss:min")
    trials = []
    for i, (pgd, loss, clean) in enumerate([(0.9, 0.1, 0.2), (0.7, 0.3, 0.8), (0.6, 0.2, 0.9), (0.5, 0.5, 0.7)]):
        run = cl.create_run(exp, tags={tags.PARENT: parent.info.run_id, tags.KIND: "trial", tags.TRIAL: f"t{i}",
                                       tags.MODEL_URI: f"models:/m-{i}"})
        for step, c in ((1, clean - 0.1), (2, clean)):
            cl.log_metric(run.info.run_id, "val_clean_acc", c, step=step)
        cl.log_metric(run.info.run_id, "best_val_pgd_acc", pgd)
        trials.append(TrialSummary(trial_id=f"t{i}", run_id=run.info.run_id, status="completed", point={"beta": 1.0 + i},
                                   epochs=2, best={"best_val_pgd_acc": pgd, "best_train_loss": loss, "best_epoch": 2.0}))
    lines = []
    assert mark_feasibility(cl, trials, space.constraints, lines.append) == 1
    assert lines == ["constraints (val_clean_acc >= 0.5): 3 of 4 trials feasible; the best trial and the Pareto front "
                     "are chosen among them"]
    assert [t.feasible for t in trials] == [False, True, True, True]
    assert cl.get_run(trials[0].run_id).data.tags[tags.FEASIBLE] == "false: val_clean_acc 0.2 (needs val_clean_acc >= 0.5)"
    assert cl.get_run(trials[1].run_id).data.tags[tags.FEASIBLE] == "true"
    ordered = feasible_first(trials)
    summary = SearchSummary(name="crafted", trials=ordered, pareto=front_of(ordered, space.objective), parent_run_id="p",
                            experiment_id=exp, tracking_uri=store, ray_path="r", objectives=space.objective,
                            space=space)
    assert summary.best.trial_id == "t1"  # t0 has the best val_pgd_acc but is infeasible
    assert {t.trial_id for t in summary.pareto} == {"t1", "t2"}  # t0 would dominate; it is left out
    table = format_table(summary, ["beta"])
    assert "t0!" in table and "t1*" in table
    assert "infeasible (marked !, never best or on the front): 1 trials" in format_report(summary, space)
    run, value = pick_best(cl, cl.get_run(parent.info.run_id), "val_pgd_acc", "max")
    assert run.data.tags[tags.TRIAL] == "t1" and value == pytest.approx(0.7)
    run, value = pick_best(cl, cl.get_run(parent.info.run_id), "val_pgd_acc", "max", allow_infeasible=True)
    assert run.data.tags[tags.TRIAL] == "t0"
    for t in trials[1:]:
        cl.set_tag(t.run_id, tags.FEASIBLE, "false: val_clean_acc 0.1 (needs val_clean_acc >= 0.5)")
    with pytest.raises(UserError, match="infeasible.*--allow-infeasible"):
        pick_best(cl, cl.get_run(parent.info.run_id), "val_pgd_acc", "max")


# ----------------------------------------------------------------------------- warm start (MLflow only, no Ray)


def fake_search(cl, name, rows, *, space_params=("beta", "lr", "loss"), experiment=None):
    """An earlier search in MLflow as the driver logs it: a parent run and one child run per trial."""
    from scoretune.tracking import tags

    experiment = experiment or name
    exp = cl.get_experiment_by_name(experiment) or cl.get_experiment(cl.create_experiment(experiment))
    exp_id = exp.experiment_id
    parent = cl.create_run(exp_id, tags={tags.KIND: "search", tags.SEARCH: name})
    for p in space_params:
        cl.log_param(parent.info.run_id, f"space.{p}", "x")
    for i, (point, value, status) in enumerate(rows):
        run = cl.create_run(exp_id, tags={tags.PARENT: parent.info.run_id, tags.KIND: "trial", tags.TRIAL: f"{name}-{i}",
                                          tags.STATUS: status})
        for k, v in point.items():
            cl.log_param(run.info.run_id, k, v)
        if value is not None:
            cl.log_metric(run.info.run_id, "best_val_pgd_acc", value)
            cl.log_metric(run.info.run_id, "best_epoch", 2)
            cl.log_metric(run.info.run_id, "val_clean_acc", 0.9 if point["lr"] < LR_CUT else 0.1, step=2)
        cl.set_terminated(run.info.run_id, "FAILED" if status == "failed" else "FINISHED")
    cl.set_terminated(parent.info.run_id)
    return parent


def snapshot(cl, parent):
    from scoretune.tracking.runs import child_runs

    runs = [cl.get_run(parent.info.run_id)] + child_runs(cl, parent)
    return [(r.info.run_id, r.info.status, r.info.end_time, dict(r.data.tags), dict(r.data.params), dict(r.data.metrics),
             [(m.step, m.value, m.timestamp) for m in cl.get_metric_history(r.info.run_id, "val_clean_acc")])
            for r in runs]


def test_warm_start_adds_the_finished_trials_that_fit_and_says_what_it_skipped(store):
    import optuna
    from scoretune.search.study import WARM_ATTR, collect
    from scoretune.tracking import client

    cl = client(store)
    rows = [({"beta": 3.0, "lr": 0.02, "loss": "se"}, 0.8, "completed"),
            ({"beta": 5.0, "lr": 0.3, "loss": "kl"}, 0.6, "stopped_asha"),
            ({"beta": 2.0, "lr": 0.05, "loss": "kl"}, 0.7, "completed"),
            ({"beta": 4.0, "lr": 0.9, "loss": "se"}, 0.5, "completed"),      # lr outside the new range
            ({"beta": 4.0, "lr": 0.1, "loss": "l1_sq"}, 0.5, "completed"),   # loss not a new choice
            ({"beta": 4.0, "lr": 0.1, "loss": "se"}, None, "failed")]
    parent = fake_search(cl, "earlier", rows)
    other = fake_search(cl, "other-space", rows[:1], space_params=("beta", "lr"))
    before = snapshot(cl, parent)
    space = crafted_space(warm_start={"from": "earlier"})
    ws = collect(cl, space, "earlier")
    assert ws.line() == ("warm start from search 'earlier': 3 finished trial(s) added to the Optuna study; skipped "
                         "1 failed or unfinished, 2 outside the new ranges")
    assert [t.value for t in ws.trials] == [0.8, 0.7, 0.6]  # best first
    assert ws.trials[0].params == {"beta": 3.0, "lr": 0.02, "loss": "se"}
    assert ws.trials[2].constraints == {"val_clean_acc >= 0.5": pytest.approx(0.4)}  # lr 0.3: infeasible
    assert all(t.state == optuna.trial.TrialState.COMPLETE and WARM_ATTR in t.user_attrs for t in ws.trials)
    assert len(collect(cl, space, "earlier", max_trials=2).trials) == 2
    assert collect(cl, space, "other-space").skipped["from another space"] == 1
    assert snapshot(cl, parent) == before  # reading never changes the earlier search's runs
    assert other is not None

    from scoretune.search.tuner import build_searcher

    searcher = build_searcher(crafted_space(sampler={"type": "tpe", "n_startup_trials": 3}), warm_trials=ws.trials).searcher
    assert len(searcher.study.trials) == 3  # in the study before the first suggestion
    searcher.suggest("first")
    assert searcher.study.trials[-1].number == 3


def test_warm_start_from_an_mlflow_experiment_takes_every_search_in_it(store):
    from scoretune.search.study import collect
    from scoretune.tracking import client

    cl = client(store)
    p1 = fake_search(cl, "mon", [({"beta": 3.0, "lr": 0.02, "loss": "se"}, 0.8, "completed")], experiment="team")
    p2 = fake_search(cl, "tue", [({"beta": 2.0, "lr": 0.02, "loss": "kl"}, 0.7, "completed")], experiment="team")
    ws = collect(cl, crafted_space(), "team")
    assert ws.source == "experiment 'team'" and sorted(ws.parent_run_ids) == sorted([p1.info.run_id, p2.info.run_id])
    assert sorted(t.value for t in ws.trials) == [0.7, 0.8]


def test_points_to_evaluate_that_the_warm_start_already_ran_are_not_run_again(store):
    from scoretune.search.study import collect
    from scoretune.search.tuner import build_searcher
    from scoretune.tracking import client

    cl = client(store)
    fake_search(cl, "earlier-pts", [({"beta": 3.0, "lr": 0.02, "loss": "se"}, 0.8, "completed")])
    points = [{"beta": 3.0, "lr": 0.02, "loss": "se"}, {"beta": 2.0, "lr": 0.02, "loss": "kl"}]
    space = crafted_space(points_to_evaluate=points)
    searcher = build_searcher(space, warm_trials=collect(cl, space, "earlier-pts").trials).searcher
    assert searcher.suggest("a") == points[1]


def test_the_study_lives_in_sqlite_beside_the_mlflow_store_and_survives_tunes_searcher_checkpoint(tmp_path):
    import optuna
    from scoretune.search.study import StudyStorageError, open_storage, refuse_existing, study_storage_url
    from scoretune.search.tuner import build_searcher

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    url = study_storage_url(uri, "ray_results")
    assert url == f"sqlite:///{tmp_path / 'store' / 'optuna.db'}"
    assert study_storage_url((tmp_path / "mlruns").as_uri(), "x") == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert study_storage_url("http://mlflow:5000", str(tmp_path / "ray")) == f"sqlite:///{tmp_path / 'ray' / 'optuna.db'}"
    assert study_storage_url(uri, "r", "postgresql://u@db/optuna") == "postgresql://u@db/optuna"
    assert study_storage_url("http://mlflow:5000", "s3://bucket/ray") is None  # in memory, as before (one note line)
    storage = open_storage(url)
    space = crafted_space(num_samples=4)
    drive(space, storage=storage)
    limiter = build_searcher(space, storage=open_storage(url), study_name="crafted")
    ckpt = tmp_path / "searcher.pkl"
    limiter.searcher.save(str(ckpt))  # what Tune does with the searcher in the experiment folder
    restored = build_searcher(space).searcher
    restored.restore(str(ckpt))
    assert restored.study.study_name == "crafted" and len(restored.study.trials) == 4
    restored.suggest("more")  # the restored searcher asks in the same RDB study
    assert len(optuna.load_study(study_name="crafted", storage=url).trials) == 5
    with pytest.raises(StudyStorageError, match="^--name: an Optuna study 'crafted' already exists"):
        refuse_existing(storage, url, "crafted")


def test_a_searcher_restored_from_a_save_older_than_its_study_neither_fails_nor_leaves_a_trial_running(tmp_path):
    """A kill lands between Tune's searcher save and the study's newer writes: one trial finished in the
    database after the save, another was asked for and never saved by Tune."""
    from optuna.trial import TrialState
    from scoretune.search.study import abandon_running, open_storage
    from scoretune.search.tuner import build_searcher

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = crafted_space(num_samples=4, max_concurrent=2)
    killed = build_searcher(space, storage=open_storage(url), study_name="crafted").searcher
    first = killed.suggest("a")
    killed.suggest("b")
    killed.save(str(tmp_path / "searcher.pkl"))  # Tune's last save before the kill
    pgd, clean = objective(first)
    killed.on_trial_result("a", {"epoch": 1, "training_iteration": 1, "val_pgd_acc": pgd, "val_clean_acc": clean})
    killed.on_trial_complete("a", {"epoch": 1, "val_pgd_acc": pgd, "val_clean_acc": clean})  # "a" done in the DB
    asked = killed.suggest("c")  # sampled, never saved by Tune

    resumed = build_searcher(space).searcher
    resumed.restore(str(tmp_path / "searcher.pkl"))
    # Tune restarts "a" from its checkpoint: its result and completion arrive again, and are not told twice
    resumed.on_trial_result("a", {"epoch": 1, "training_iteration": 1, "val_pgd_acc": pgd, "val_clean_acc": clean})
    resumed.on_trial_complete("a", {"epoch": 1, "val_pgd_acc": pgd, "val_clean_acc": clean})
    assert resumed.suggest("d") == asked  # the next trial Tune asks for runs what the killed attempt sampled
    for tid in ("b", "d"):
        point = resumed.params_of(tid)
        resumed.on_trial_complete(tid, {"epoch": 1, "val_pgd_acc": objective(point)[0],
                                        "val_clean_acc": objective(point)[1]})
    storage = open_storage(url)
    assert abandon_running(storage, "crafted") == 0
    trials = storage.get_all_trials(storage.get_study_id_from_name("crafted"))
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[0].values[0] == pytest.approx(pgd)


def test_a_trial_a_killed_attempt_asked_for_and_nobody_ran_is_failed_when_the_search_ends(tmp_path):
    from optuna.trial import TrialState
    from scoretune.search.study import ABANDONED_ATTR, abandon_running, open_storage
    from scoretune.search.tuner import build_searcher

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    build_searcher(crafted_space(), storage=open_storage(url), study_name="crafted").searcher.suggest("x")
    storage = open_storage(url)
    assert abandon_running(storage, "crafted") == 1
    (t,) = storage.get_all_trials(storage.get_study_id_from_name("crafted"))
    assert t.state == TrialState.FAIL and "killed" in t.user_attrs[ABANDONED_ATTR]


def test_searches_that_share_a_storage_path_and_start_at_once_all_open_the_new_study_file(tmp_path):
    """Four clients create Optuna's tables in one fresh optuna.db at the same moment (a team's searches
    sharing a storage_path; without the lock one of them fails on `table already exists`)."""
    import threading

    from scoretune.search.study import open_storage

    for n in range(3):
        url = f"sqlite:///{tmp_path / str(n) / 'optuna.db'}"
        barrier, errors = threading.Barrier(4), []

        def open_it():
            barrier.wait()
            try:
                open_storage(url)
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


# ----------------------------------------------------------------------------- scoretune dashboard


def test_dashboard_serves_the_study_on_localhost(tmp_path):
    import optuna
    from conftest import free_port

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="live-search", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("beta", 1, 10), n_trials=3)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "scoretune.cli", "dashboard", "--storage", url, "--port", str(port),
                             "--search", "live-search"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body, deadline = None, time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, proc.stdout.read() if proc.poll() is not None else "no answer"
        names = {s["study_name"]: s for s in body["study_summaries"]}
        assert "live-search" in names
        sid = names["live-search"]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{sid}", timeout=10) as r:
            detail = json.loads(r.read())
        assert len(detail["trials"]) == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:
        proc.terminate()  # stop the server by its PID
        proc.wait(timeout=30)
    assert proc.returncode is not None


# ----------------------------------------------------------------------------- end to end (Ray)

QUICK = [*conftest.QUICK, "top_k=0", "sampler.n_startup_trials=3"]


def quickstart(d, uri, *extra):
    from scoretune.cli import main

    args = ["search", str(ROOT / "search_spaces/quickstart.yaml"), "--tracking-uri", uri, "--set", f"storage_path={d / 'ray'}"]
    for o in QUICK:
        args += ["--set", o]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(args + list(extra))
    return SimpleNamespace(rc=rc, out=buf.getvalue())


@pytest.mark.slow
def test_a_second_quickstart_warm_starts_from_the_first_and_tpe_begins_at_once(ray_local, tmp_path):
    import optuna
    from scoretune.search.study import WARM_ATTR
    from scoretune.tracking import client, tags
    from scoretune.tracking.runs import child_runs, find_parent_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = quickstart(tmp_path, uri)
    assert first.rc == 0, first.out
    assert "parameter importance (PED-ANOVA" in first.out
    cl = client(uri)
    parent1 = find_parent_runs(cl, "quickstart")[0]
    assert any(k.startswith("importance.val_pgd_acc.") for k in parent1.data.metrics)
    assert "importance.png" in {a.path for a in cl.list_artifacts(parent1.info.run_id)}
    before = snapshot(cl, parent1)
    second = quickstart(tmp_path, uri, "--warm-start", "quickstart", "--name", "quickstart-2")
    assert second.rc == 0, second.out
    assert "warm start from search 'quickstart': 4 finished trial(s) added to the Optuna study" in second.out
    assert "TPE starts at once: 4 warm-start trial(s) >= its 3 start-up trial(s)" in second.out
    parent2 = find_parent_runs(cl, "quickstart-2")[0]
    assert parent2.data.tags[tags.WARM_START_FROM] == "search 'quickstart'"
    assert parent2.data.tags[tags.WARM_START_TRIALS] == "4"
    assert parent2.data.tags[tags.WARM_START_RUNS] == parent1.info.run_id
    url = parent2.data.tags[tags.OPTUNA_STORAGE]
    assert url == f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.load_study(study_name="quickstart-2", storage=url)
    warm = [t for t in study.trials if WARM_ATTR in t.user_attrs]
    assert len(warm) == 4 and [t.number for t in warm] == [0, 1, 2, 3]
    first_values = sorted(r.data.metrics["best_val_pgd_acc"] for r in child_runs(cl, parent1))
    assert sorted(t.value for t in warm) == pytest.approx(first_values)
    assert len(study.trials) == 8  # 4 warm + 4 new, all in the study the dashboard shows
    # the space's points_to_evaluate (the paper's default) ran in the first search: not enqueued again
    default = {"beta": 6.0, "lr": 0.2, "loss": "se", "clip": 0.0}
    assert sum(t.params == default for t in study.trials) == 1
    assert snapshot(cl, find_parent_runs(cl, "quickstart")[0]) == before


# ----------------------------------------------------------------------------- PostgreSQL (the cluster's store)


@pytest.fixture
def postgres(tmp_path):
    """A real PostgreSQL 15 on 127.0.0.1 (run as the postgres user: initdb refuses root); stopped by PID."""
    import os
    import shutil

    from conftest import free_port

    if shutil.which("initdb") is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not on PATH")
    d = Path(f"/tmp/scoretune-pg-{os.getpid()}-{free_port()}")
    d.mkdir()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    if as_pg:
        shutil.chown(d, "postgres")
    port = free_port()
    subprocess.run(as_pg + ["initdb", "-D", str(d / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run(as_pg + ["pg_ctl", "-D", str(d / "data"), "-l", str(d / "log"), "-w", "-t", "60", "-o",
                            f"-p {port} -k {d} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True,
                   timeout=120)
    pid = int((d / "data" / "postmaster.pid").read_text().split()[0])
    try:
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", "CREATE DATABASE mlflow"],
                       check=True, capture_output=True, timeout=60)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow"
    finally:
        import signal

        os.kill(pid, signal.SIGINT)  # fast shutdown of the postmaster we started
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_with_mlflow_in_postgresql_the_study_gets_its_own_schema_in_the_same_database(postgres):
    import optuna
    import sqlalchemy
    from scoretune.search.study import open_storage, study_storage_url
    from scoretune.tracking import client

    cl = client(postgres)  # MLflow's tables (and its alembic_version) in schema public
    exp = cl.create_experiment("e")
    url = study_storage_url(postgres, "ray_results")
    assert url == postgres + "?options=-csearch_path%3Doptuna"
    storage = open_storage(url)
    study = optuna.create_study(study_name="pg-search", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("beta", 1, 10), n_trials=2)
    engine = sqlalchemy.create_engine(postgres)
    with engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text("SELECT table_schema, table_name FROM information_schema.tables "
                                            "WHERE table_schema IN ('public', 'optuna')")).fetchall()
    engine.dispose()
    tables = {(s, t) for s, t in rows}
    assert {("optuna", "studies"), ("optuna", "trials"), ("optuna", "alembic_version")} <= tables
    assert ("public", "runs") in tables and ("public", "studies") not in tables
    assert len(optuna.load_study(study_name="pg-search", storage=open_storage(url)).trials) == 2
    assert cl.get_experiment(exp).name == "e"  # MLflow's store is untouched


def test_a_grid_search_tells_its_last_point_like_the_others():
    """Optuna's grid sampler stops the study after its last point; outside ``optimize`` Optuna raises on
    that, and the last trial of every grid search failed."""
    space = crafted_space(params={"beta": {"choice": [1.0, 3.0]}, "lr": {"choice": [0.01, 0.1]}},
                          sampler={"type": "grid"}, num_samples=4, constraints=[])
    study = drive(space)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert sorted((t.params["beta"], t.params["lr"]) for t in study.trials) == [(1.0, 0.01), (1.0, 0.1), (3.0, 0.01),
                                                                              (3.0, 0.1)]
