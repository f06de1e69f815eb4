"""`scoretune train` end to end: table, checkpoints, MLflow run with params, metrics and a loadable model."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAST = ["--set", "epochs=2", "--set", "attack.steps=2", "--set", "eval.pgd_steps=3", "--set", "eval.test=false"]


def scoretune(*args, cwd):
    return subprocess.run([sys.executable, "-m", "scoretune.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_train_logs_params_metrics_and_a_loadable_model(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = scoretune("train", str(REPO / "configs" / "digits_trades_se.yaml"), *FAST, "--tracking-uri", uri, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "R_Madry" in r.stdout and "val_pgd" in r.stdout
    assert (tmp_path / "runs" / "digits-trades-se" / "last.pt").exists()
    assert (tmp_path / "runs" / "digits-trades-se" / "best.pt").exists()

    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("digits-trades-se")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["objective.loss"] == "se" and run.data.params["attack.eps"] == "0.2"
    history = client.get_metric_history(run.info.run_id, "val_pgd_acc")
    assert [m.step for m in history] == [1, 2]
    assert 0.0 <= history[-1].value <= 1.0

    mlflow.set_tracking_uri(uri)
    model_uri = next(line.split()[2] for line in r.stdout.splitlines() if line.startswith("logged model"))
    net = mlflow.pytorch.load_model(model_uri)
    from scoretune.data import load_dataset

    ds = load_dataset("digits")
    with torch.no_grad():
        acc = (net(ds.val.x).argmax(1) == ds.val.y).float().mean().item()
    assert acc == pytest.approx(max(m.value for m in client.get_metric_history(run.info.run_id, "val_clean_acc")), abs=0.15)
    assert acc > 0.5


def test_bad_config_is_a_one_line_error(tmp_path):
    r = scoretune("train", "--set", "objective.loss=hinge", "--no-mlflow", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "objective.loss" in lines[0] and "'se'" in lines[0]


def test_nan_loss_fails_the_run_with_a_one_line_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = scoretune("train", *FAST, "--set", "optim.lr=1e12", "--set", "optim.momentum=0", "--set", "name=nan-run",
                  "--tracking-uri", uri, cwd=tmp_path)
    assert r.returncode == 2
    assert "non-finite training loss" in r.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nan-run").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["scoretune.status"] == "failed"


def test_a_name_that_leaves_the_runs_folder_is_refused(tmp_path):
    r = scoretune("train", *FAST, "--set", "name=../../escaped", "--no-mlflow", cwd=tmp_path)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "name" in line
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "runs").exists()


def test_resume_after_a_kill_continues_the_same_mlflow_run(tmp_path):
    """A training killed after epoch 1 (its run left RUNNING) and resumed: one run, epochs 1-3 once each."""
    import os
    import signal
    import time

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "scoretune.cli", "train", "--set", "epochs=3", "--set", "attack.steps=2",
            "--set", "eval.pgd_steps=2", "--set", "eval.test=false", "--set", "name=killed", "--tracking-uri", uri]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    last = tmp_path / "runs" / "killed" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("killed")
    (killed,) = client.search_runs([exp.experiment_id])
    assert killed.info.status == "RUNNING"

    r = scoretune(*args[3:], "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [1, 2, 3]


def test_a_fresh_start_ends_the_run_a_killed_training_left_running(tmp_path):
    from mlflow.tracking import MlflowClient

    from scoretune.tracking import RunLogger, tags

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stale = RunLogger(uri, "fresh", run_name="fresh",
                      tags={tags.KIND: "train", tags.RUN_DIR: str((tmp_path / "runs" / "fresh").resolve())})
    r = scoretune("train", *FAST, "--set", "name=fresh", "--tracking-uri", uri, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    client = MlflowClient(uri)
    assert client.get_run(stale.run_id).info.status == "KILLED"
    assert tags.SUPERSEDED in client.get_run(stale.run_id).data.tags
