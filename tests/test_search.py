"""The search: real Ray Tune + Optuna + MLflow (SQLite) on tiny digits problems.

Each search runs once per module (cached) and several tests read what it left behind.
Pure helpers (Pareto front, classification, best-epoch values) are tested without Ray first.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import conftest
import pytest
from scoretune.search.report import best_values, classify_trial, dominates, pareto_front, stop_of
from scoretune.search.space import ObjectiveSpec, build_space
from scoretune.stopping import Stop

ROOT = Path(__file__).resolve().parents[1]
TINY = {**conftest.TINY, "epochs": 4}


# ----------------------------------------------------------------------------- pure helpers (no Ray)


def test_pareto_front_keeps_exactly_the_non_dominated_points():
    pts = [(0.5, 0.9), (0.6, 0.8), (0.4, 0.7), (0.6, 0.9), (0.2, 0.95)]
    front = pareto_front(pts, ["max", "max"])
    assert front == [3, 4]  # (0.6, 0.9) dominates the first three; (0.2, 0.95) has the best 2nd objective
    assert pareto_front([(1.0, 5.0), (2.0, 3.0), (3.0, 1.0)], ["max", "max"]) == [0, 1, 2]
    assert pareto_front([(1.0, 5.0), (2.0, 3.0)], ["max", "min"]) == [1]


def test_dominates_needs_one_strict_improvement():
    assert dominates((1.0, 1.0), (1.0, 0.5), ["max", "max"])
    assert not dominates((1.0, 1.0), (1.0, 1.0), ["max", "max"])
    assert dominates((0.1, 1.0), (0.2, 1.0), ["min", "max"])


def test_best_values_read_every_objective_at_the_primary_best_epoch():
    rows = [{"epoch": 1, "val_pgd_acc": 0.2, "val_clean_acc": 0.9},
            {"epoch": 2, "val_pgd_acc": 0.4, "val_clean_acc": 0.7},
            {"epoch": 3, "val_pgd_acc": 0.4, "val_clean_acc": 0.95},
            {"epoch": 4, "val_pgd_acc": float("nan"), "val_clean_acc": 0.99}]
    objs = [ObjectiveSpec(metric="val_pgd_acc"), ObjectiveSpec(metric="val_clean_acc")]
    assert best_values(rows, objs) == {"best_val_pgd_acc": 0.4, "best_val_clean_acc": 0.7, "best_epoch": 2.0}
    assert best_values([], objs) == {}


def test_classify_trial_floor_then_budget_then_asha():
    floor = SimpleNamespace(stops={"a": Stop("floor", "floor: train_r_madry below ...", 2)})
    plateau = SimpleNamespace(stops={"p": Stop("plateau", "plateau: val_pgd_acc has not improved ...", 3)})
    assert classify_trial(stop_of("a", [floor]), 2, 4, "asha")[0] == "stopped_floor"
    assert classify_trial(stop_of("p", [floor, plateau]), 3, 4, "asha")[0] == "stopped_plateau"
    assert classify_trial(stop_of("b", [floor]), 4, 4, "asha")[0] == "completed"
    assert classify_trial(stop_of("c", [floor]), 1, 4, "asha")[0] == "stopped_asha"


# ----------------------------------------------------------------------------- helpers for the Ray tests


@pytest.fixture(scope="module")
def cache():
    return {}


def mlflow_children(uri: str, name: str):
    from scoretune.tracking import client
    from scoretune.tracking.runs import child_runs, find_parent_runs

    cl = client(uri)
    parents = find_parent_runs(cl, name)
    return cl, parents, (child_runs(cl, parents[0]) if parents else [])


def by_param(children, key):
    return {r.data.params[key]: r for r in children}


def history(cl, run, metric):
    return [(int(m.step), m.value) for m in sorted(cl.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]


# ----------------------------------------------------------------------------- quickstart (shrunk)

QUICK = [*conftest.QUICK, "top_k=1"]


@pytest.fixture
def quickstart(ray_local, cache, tmp_path_factory):
    if "quick" not in cache:
        from scoretune.cli import main

        d = tmp_path_factory.mktemp("quick")
        uri = f"sqlite:///{d / 'mlflow.db'}"
        args = ["search", str(ROOT / "search_spaces/quickstart.yaml"), "--tracking-uri", uri,
                "--set", f"storage_path={d / 'ray'}"]
        for o in QUICK:
            args += ["--set", o]
        buf = io.StringIO()
        t0 = time.time()
        with contextlib.redirect_stdout(buf):
            rc = main(args)
        cache["quick"] = SimpleNamespace(rc=rc, uri=uri, out=buf.getvalue(), dir=d, seconds=time.time() - t0)
    return cache["quick"]


@pytest.mark.slow
def test_quickstart_finishes_with_a_parent_and_four_nested_runs(quickstart):
    assert quickstart.rc == 0, quickstart.out
    cl, parents, children = mlflow_children(quickstart.uri, "quickstart")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert len({r.data.tags["scoretune.trial_id"] for r in children}) == 4
    for r in children:
        assert r.data.tags["scoretune.status"] in ("completed", "stopped_asha", "stopped_floor")
        steps = [s for s, _ in history(cl, r, "val_pgd_acc")]
        assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) <= 2  # one point per epoch
        assert [s for s, _ in history(cl, r, "R_Madry")] == steps
        # the quickstart's floor is estimated (floor: {estimate: auto}); every trial carries the parent's value
        assert float(r.data.params["floor"]) == pytest.approx(parents[0].data.metrics["floor"], rel=1e-5)
        assert set(r.data.params) == {"beta", "lr", "loss", "clip", "method", "model", "data", "eps", "norm",
                                      "epochs", "workers", "floor"}  # searched values + identifying constants
        cfg = json.loads(Path(cl.download_artifacts(r.info.run_id, "config.json", str(quickstart.dir))).read_text())
        assert cfg["objective"]["beta"] == pytest.approx(float(r.data.params["beta"]))  # the full config
        assert r.data.metrics["epochs_run"] == len(steps) and r.info.run_name.startswith("[")
    # the report names where things are
    assert "Pareto" not in quickstart.out and "MLflow:" in quickstart.out and "Ray results:" in quickstart.out
    assert quickstart.out.count(" start ") == 4


@pytest.mark.slow
def test_quickstart_logs_the_best_trials_model_with_plots(quickstart):
    cl, parents, children = mlflow_children(quickstart.uri, "quickstart")
    parent = parents[0]
    best_run_id = parent.data.tags["scoretune.best_run_id"]
    best = cl.get_run(best_run_id)
    assert best.data.tags["scoretune.model_uri"].startswith("models:/")
    values = [r.data.metrics.get("best_val_pgd_acc", -1) for r in children]
    assert best.data.metrics["best_val_pgd_acc"] == max(values)
    assert sum("scoretune.model_uri" in r.data.tags for r in children) == 1  # top_k = 1
    # AutoAttack (fast, the default) ran on the logged model, on the val split, at the trial's eps
    assert best.data.tags["eval.aa_fast_acc.split"] == "val" and best.data.tags["eval.aa_fast_acc.norm"] == "linf"
    assert best.data.metrics["aa_fast_acc"] == best.data.metrics["aa_acc"]
    assert 0.0 <= best.data.metrics["aa_acc"] <= best.data.metrics["clean_acc"]
    assert best.data.metrics["clean_acc"] == pytest.approx(best.data.metrics["model_val_clean_acc"], abs=1e-6)
    assert re.search(r"\[\d\d:\d\d:\d\d\]   trial \w+: aa_acc=0\.\d{4}±0\.\d{4}", quickstart.out)
    arts = {a.path for a in cl.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/learning_curves.png", "plots/objective_vs_params.png"} <= arts
    assert "search_space.yaml" in {a.path for a in cl.list_artifacts(parent.info.run_id)}


@pytest.mark.slow
def test_promoted_quickstart_model_reproduces_the_trials_accuracy(quickstart):
    from scoretune.tracking.promote import promote

    res = promote("quickstart", tracking_uri=quickstart.uri)
    assert res.uri == "models:/scoretune-quickstart@champion"
    cl, parents, _ = mlflow_children(quickstart.uri, "quickstart")
    assert cl.get_model_version_by_alias("scoretune-quickstart", "champion").run_id == res.run_id
    run = cl.get_run(res.run_id)
    expected = run.data.metrics["model_val_clean_acc"]
    assert run.data.metrics["model_val_pgd_acc"] == pytest.approx(run.data.metrics["best_val_pgd_acc"])
    code = textwrap.dedent(f"""
        import json, mlflow, torch
        from scoretune.data import load_dataset, to_float
        mlflow.set_tracking_uri({quickstart.uri!r})
        net = mlflow.pytorch.load_model({res.uri!r})
        ds = load_dataset("digits", val_size=0.1, seed=0)
        x, y = to_float(ds.val.x), ds.val.y
        with torch.no_grad():
            acc = (net(x).argmax(-1) == y).double().mean().item()
        print(json.dumps({{"acc": acc}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    acc = json.loads(proc.stdout.strip().splitlines()[-1])["acc"]
    assert acc == pytest.approx(expected, abs=1e-9)


# ----------------------------------------------------------------------------- ASHA, floor, NaN


@pytest.fixture
def crafted(ray_local, cache, tmp_path_factory):
    """Four fixed points run one at a time: B (reaches the budget), C (lr 1e-4: far below B at ASHA's
    first rung), A (eps 0, lr 0.5: its robust KL loss falls under the floor 1.5 at epoch 2), D (lr 1e6: NaN)."""
    if "crafted" not in cache:
        from scoretune.search import run_search

        d = tmp_path_factory.mktemp("crafted")
        raw = {"name": "crafted", "base": TINY,
               "params": {"eps": {"choice": [0.0, 0.1]}, "lr": {"choice": [0.1, 0.0001, 0.5, 1.0e6]}},
               "points_to_evaluate": [{"eps": 0.1, "lr": 0.1}, {"eps": 0.1, "lr": 0.0001},
                                      {"eps": 0.0, "lr": 0.5}, {"eps": 0.1, "lr": 1.0e6}],
               "num_samples": 4, "max_concurrent": 1, "top_k": 0,
               "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
               "stoppers": {"floor": {"value": 1.5, "patience": 1}}, "storage_path": str(d / "ray")}
        uri = f"sqlite:///{d / 'mlflow.db'}"
        summary = run_search(build_space(raw), tracking_uri=uri, out=lambda s: None)
        cl, _, children = mlflow_children(uri, "crafted")
        cache["crafted"] = SimpleNamespace(summary=summary, cl=cl, runs=by_param(children, "lr"))
    return cache["crafted"]


@pytest.mark.slow
def test_a_refined_floor_search_logs_each_floor_from_the_best_trials_c_l1(ray_local, tmp_path):
    from scoretune.search import run_search

    raw = {"name": "refined", "base": {**TINY, "epochs": 3, "early_stop": {"refine_samples": 64}},
           "params": {"lr": {"choice": [0.1, 0.3]}}, "points_to_evaluate": [{"lr": 0.1}, {"lr": 0.3}],
           "num_samples": 2, "max_concurrent": 1, "top_k": 0, "sampler": {"type": "random"},
           "stoppers": {"floor": {"value": 5.0, "patience": 3, "refine": True}}, "storage_path": str(tmp_path / "ray")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_search(build_space(raw), tracking_uri=uri, out=lambda s: None)
    cl, parents, children = mlflow_children(uri, "refined")
    # every row that improved its trial's val_pgd_acc carries val_c_l1; the best of them all sets the floor
    rows = []
    for r in children:
        pgd, c = dict(history(cl, r, "val_pgd_acc")), dict(history(cl, r, "val_c_l1"))
        assert c and set(c) <= set(pgd) and 1 in c
        rows += [(pgd[e], c[e]) for e in c]
    logged = [v for _, v in history(cl, parents[0], "floor_refined")]
    best = max(p for p, _ in rows)  # the refiner keeps the first row to reach it: any of those on a tie
    assert logged and any(logged[-1] == pytest.approx(min(5.0, c ** 2 / 2), rel=1e-6) for p, c in rows if p == best)
    assert parents[0].data.tags["scoretune.floor.refined"].startswith(f"(C^l1)^2/2={logged[-1]:.4g}")
    assert len(summary.trials) == 2


@pytest.mark.slow
def test_trial_that_reaches_its_budget_is_completed(crafted):
    r = crafted.runs["0.1"]
    assert r.data.tags["scoretune.status"] == "completed"
    assert r.data.metrics["epoch"] == 4 and r.info.status == "FINISHED"


@pytest.mark.slow
def test_asha_stops_the_weak_trial_at_its_first_rung(crafted):
    r = crafted.runs["0.0001"]
    assert r.data.tags["scoretune.status"] == "stopped_asha"
    assert "ASHA" in r.data.tags["scoretune.stop_reason"] and r.data.metrics["epoch"] == 1
    strong = crafted.runs["0.1"]
    assert history(crafted.cl, r, "val_pgd_acc")[0][1] < history(crafted.cl, strong, "val_pgd_acc")[0][1]


@pytest.mark.slow
def test_floor_stopper_stops_the_trial_whose_robust_loss_falls_below_the_floor(crafted):
    r = crafted.runs["0.5"]
    assert r.data.tags["scoretune.status"] == "stopped_floor"
    assert r.data.tags["scoretune.stop_reason"].startswith("floor:")
    kl = history(crafted.cl, r, "R_Madry")
    assert kl[-1][1] < 1.5 and all(v >= 1.5 for _, v in kl[:-1])  # stopped at the first epoch below
    assert r.data.metrics["epoch"] < 4
    assert all(v >= 1.5 for _, v in history(crafted.cl, crafted.runs["0.1"], "R_Madry"))


@pytest.mark.slow
def test_nan_trial_is_marked_failed_and_the_others_go_on(crafted):
    r = crafted.runs["1000000.0"]
    assert r.data.tags["scoretune.status"] == "failed" and r.info.status == "FAILED"
    assert r.data.tags["scoretune.error"].startswith("NonFiniteLossError: non-finite training loss")
    statuses = sorted(t.status for t in crafted.summary.trials)
    assert statuses == ["completed", "failed", "stopped_asha", "stopped_floor"]


# ----------------------------------------------------------------------------- multi-objective


@pytest.mark.slow
def test_multi_objective_search_returns_a_non_dominated_pareto_front(ray_local, tmp_path):
    from scoretune.search import run_search
    from scoretune.tracking import client

    raw = {"name": "pareto", "base": {**TINY, "epochs": 2},
           "params": {"eps": {"choice": [0.0, 0.05, 0.1, 0.2]}, "lr": {"loguniform": [0.05, 0.5]}},
           "objective": [{"metric": "val_pgd_acc", "mode": "max"}, {"metric": "val_clean_acc", "mode": "max"}],
           "num_samples": 5, "max_concurrent": 2, "top_k": 0, "scheduler": {"type": "none"},
           "storage_path": str(tmp_path / "ray")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_search(build_space(raw), tracking_uri=uri, out=lambda s: None)
    objs = ("val_pgd_acc", "val_clean_acc")
    pts = {t.trial_id: tuple(t.value(m) for m in objs) for t in summary.trials}
    assert len(pts) == 5 and all(None not in p for p in pts.values())
    front = {t.trial_id for t in summary.pareto}
    assert front
    for tid in front:  # nobody dominates a front member
        assert not any(dominates(pts[o], pts[tid], ["max", "max"]) for o in pts if o != tid)
    for tid in set(pts) - front:  # every other trial is dominated by someone
        assert any(dominates(pts[o], pts[tid], ["max", "max"]) for o in pts if o != tid)
    parent = client(uri).get_run(summary.parent_run_id)
    assert set(parent.data.tags["scoretune.pareto_trials"].split(",")) == front
    assert "plots/pareto_front.png" in {a.path for a in client(uri).list_artifacts(summary.parent_run_id, "plots")}


# ----------------------------------------------------------------------------- Ray Train trials


@pytest.mark.slow
def test_trials_with_several_workers_run_ray_train_and_log_like_single_process_ones(ray_local, tmp_path):
    from scoretune.search import run_search

    raw = {"name": "ddp", "base": {**TINY, "epochs": 2}, "params": {"lr": {"choice": [0.2]}},
           "num_samples": 1, "max_concurrent": 1, "top_k": 1, "scheduler": {"type": "none"},
           "autoattack": {"version": "none"}, "resources": {"workers": 2, "cpus": 0.5},
           "storage_path": str(tmp_path / "ray")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_search(build_space(raw), tracking_uri=uri, out=lambda s: None)
    cl, _, children = mlflow_children(uri, "ddp")
    (run,) = children
    assert run.data.tags["scoretune.status"] == "completed"
    assert run.data.params["workers"] == "2"
    assert [s for s, _ in history(cl, run, "val_pgd_acc")] == [1, 2]
    assert "/train_runs/ddp-" in run.data.tags["scoretune.best_checkpoint"]
    assert run.data.tags["scoretune.model_uri"] == summary.trials[0].model_uri
    assert run.data.metrics["model_val_pgd_acc"] == pytest.approx(run.data.metrics["best_val_pgd_acc"])
