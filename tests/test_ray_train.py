"""Ray Train (V2) distributed training: the loop, the trainer builder and ``scoretune train --workers``.

The fast tests check the mapping from the experiment config onto Ray's configs and the driver's
per-epoch bookkeeping without starting Ray. The slow ones train digits for real on a local Ray with
2 CPUs (the shared ``ray_local`` fixture): DDP on 2 gloo workers against 1 worker, a worker killed
in the middle of an epoch, and the CLI (MLflow) followed by a rerun that continues.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from scoretune.config import build_config
from scoretune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_trades_se.yaml"


def small_cfg(name: str, *, workers: int = 2, epochs: int = 3, **scaling):
    """Digits, small CNN, TRADES-SE, cheap attacks: a few seconds per epoch on one CPU."""
    return build_config({
        "name": name, "data": {"name": "digits", "val_size": 0.25},
        "objective": {"method": "trades", "loss": "se", "beta": 6.0},
        "attack": {"eps": 0.2, "steps": 2}, "eval": {"pgd_steps": 2, "test": False},
        "optim": {"lr": 0.2}, "epochs": epochs, "batch_size": 64, "seed": 0, "device": "cpu",
        "scaling": {"workers": workers, **scaling},
    })


def read_json(path) -> object:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------- no Ray needed


def test_scaling_section_maps_onto_ray_scaling_config():
    from trainables.train_loop import scaling_config

    sc = scaling_config(small_cfg("s", workers=4, cpus_per_worker=2, gpus_per_worker=0.5))
    assert sc.num_workers == 4
    assert sc.use_gpu is True
    assert sc.resources_per_worker == {"CPU": 2.0, "GPU": 0.5}
    cpu_only = scaling_config(small_cfg("s", workers=2))
    assert cpu_only.use_gpu is False and cpu_only.resources_per_worker == {"CPU": 1.0}


def test_builder_sets_failures_checkpoint_ranking_storage_and_loop_config(tmp_path, monkeypatch):
    from trainables.train_loop import SCORE_KEY, build_torch_trainer

    monkeypatch.chdir(tmp_path)
    cfg = small_cfg("b", max_failures=2, num_to_keep=3)
    trainer = build_torch_trainer(cfg, name="b", extra_loop_config={"_test_probe_dir": "x"})
    rc = trainer.run_config
    assert rc.name == "b"
    assert rc.storage_path == str(tmp_path / "ray_results")
    assert rc.failure_config.max_failures == 2
    assert rc.checkpoint_config.num_to_keep == 3
    assert rc.checkpoint_config.checkpoint_score_attribute == SCORE_KEY
    assert rc.checkpoint_config.checkpoint_score_order == "max"
    assert trainer.train_loop_config["experiment"]["batch_size"] == 64
    assert trainer.train_loop_config["_test_probe_dir"] == "x"
    # workers run in their own working directory: data paths are pinned to the driver's
    assert trainer.train_loop_config["experiment"]["data"]["root"] == str(tmp_path / "data")


def test_cloud_storage_uri_passes_through_unchanged():
    from trainables.train_loop import build_torch_trainer

    cfg = small_cfg("c", storage_path="s3://bucket/runs")
    assert build_torch_trainer(cfg, name="c").run_config.storage_path == "s3://bucket/runs"


def test_workers_flag_overrides_scaling_and_keeps_the_global_batch():
    from scoretune.drivers.train import with_workers

    cfg = with_workers(small_cfg("w", workers=1), 4)
    assert cfg.scaling.workers == 4
    assert cfg.batch_size == 64


def test_indivisible_global_batch_is_a_one_line_cli_error(capsys, tmp_path):
    from scoretune.cli import main

    rc = main(["train", str(CONFIG), "--workers", "3", "--no-mlflow",
               "--set", f"scaling.storage_path={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_size 64 is not divisible by 3 workers" in err[0]


def test_resume_false_refuses_an_existing_run(tmp_path):
    from trainables.ray_checkpoint import SNAPSHOT_FILE
    from trainables.train_loop import build_torch_trainer

    run = tmp_path / "old"
    (run / "epoch_0001").mkdir(parents=True)
    (run / SNAPSHOT_FILE).write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "epoch_0001"}}))
    with pytest.raises(UserError, match="already has checkpoints"):
        build_torch_trainer(small_cfg("old"), name="old", storage_path=str(tmp_path), resume=False)


class FakeLogger:
    def __init__(self):
        self.steps: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.steps.append((step, dict(metrics)))


def test_epoch_table_emits_each_epoch_once_in_order():
    from scoretune.drivers.progress import EpochTable

    lines: list[str] = []
    logger = FakeLogger()
    table = EpochTable(lines.append, logger)
    h = [{"epoch": float(e), "val_pgd_acc": acc} for e, acc in ((1, 0.2), (2, 0.5), (3, 0.4))]
    table.add(h[:2])
    table.add(h[:1])       # a stale poll
    table.add(h[2:])       # starts after the last emitted epoch
    table.add(h)           # the final full history
    assert [s for s, _ in logger.steps] == [1, 2, 3]
    assert [m["best_val_metric"] for _, m in logger.steps] == [0.2, 0.5, 0.5]
    assert len(lines) == 1 + 3  # header + one row per epoch


def test_epoch_table_skips_rows_after_a_gap():
    from scoretune.drivers.progress import EpochTable

    logger = FakeLogger()
    table = EpochTable(lambda s: None, logger)
    table.add([{"epoch": 2.0, "val_pgd_acc": 0.1}])  # epoch 1 not seen yet: wait for the full history
    assert logger.steps == []


def test_resumed_history_replays_through_the_early_stopping_rule():
    from scoretune.stopping import FloorRule
    from scoretune.stopping import replay_history as _replay

    below = [{"epoch": float(e), "train_r_madry": 0.01} for e in (1, 2, 3)]
    assert _replay(FloorRule(0.05, patience=2), below).startswith("floor")
    assert _replay(FloorRule(0.05, patience=4), below) == ""
    assert _replay(None, below) == ""


# ----------------------------------------------------------------------------- real Ray

_RUNS: dict[int, dict] = {}


def trained(workers: int, root: Path) -> dict:
    """Train ``small_cfg`` for 3 epochs on ``workers`` Ray Train workers (once per session)."""
    if workers not in _RUNS:
        from trainables.ray_checkpoint import load_state
        from trainables.train_loop import build_torch_trainer

        probe = root / f"probe{workers}"
        cfg = small_cfg(f"ddp{workers}", workers=workers)
        result = build_torch_trainer(cfg, name=cfg.name, storage_path=str(root / "ray_results"),
                                     extra_loop_config={"_test_probe_dir": str(probe)}).fit()
        _RUNS[workers] = {
            "result": result, "state": load_state(result.checkpoint),
            "final": [read_json(probe / f"rank{r}.final.json") for r in range(workers)],
        }
    return _RUNS[workers]


@pytest.fixture
def runs_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "ray_train_runs"


@pytest.mark.slow
def test_two_gloo_workers_match_one_worker(ray_local, runs_root):
    one, two = trained(1, runs_root), trained(2, runs_root)
    assert two["result"].return_value == {"epochs": 3, "stop_reason": "completed"}
    acc1 = one["state"]["history"][-1]["val_clean_acc"]
    acc2 = two["state"]["history"][-1]["val_clean_acc"]
    assert acc1 > 0.8, "the 1-worker run did not learn digits"
    assert abs(acc1 - acc2) <= 0.02


@pytest.mark.slow
def test_global_batch_is_split_evenly_across_workers(ray_local, runs_root):
    one, two = trained(1, runs_root), trained(2, runs_root)
    assert [f["batch_size"] for f in two["final"]] == [32, 32]
    assert one["final"][0]["batch_size"] == 64
    assert {f["train_batches"] for f in two["final"]} == {one["final"][0]["train_batches"]}


@pytest.mark.slow
def test_ranks_end_with_identical_history_and_weights(ray_local, runs_root):
    two = trained(2, runs_root)
    rank0, rank1 = two["final"]
    assert rank0["history"] == rank1["history"] == two["state"]["history"]
    assert [r["epoch"] for r in rank0["history"]] == [1.0, 2.0, 3.0]
    assert rank0["param_sum"] == pytest.approx(rank1["param_sum"], rel=1e-6, abs=1e-6)


@pytest.mark.slow
def test_workers_never_import_mlflow(ray_local, runs_root):
    assert [f["mlflow_imported"] for f in trained(2, runs_root)["final"]] == [False, False]


@pytest.mark.slow
def test_best_checkpoint_is_the_best_validation_pgd_epoch(ray_local, runs_root):
    from trainables.ray_checkpoint import load_state
    from trainables.train_loop import SCORE_KEY

    two = trained(2, runs_root)
    history = two["state"]["history"]
    best = load_state(two["result"].get_best_checkpoint(SCORE_KEY, "max"))
    assert history[best["epoch"] - 1]["val_pgd_acc"] == max(r["val_pgd_acc"] for r in history)
    assert best["history"] == history[: best["epoch"]]


@pytest.mark.slow
def test_worker_killed_mid_epoch_resumes_from_last_checkpoint(ray_local, tmp_path):
    from trainables.train_loop import build_torch_trainer

    probe = tmp_path / "probe"
    killed: list[int] = []

    def kill_rank1_in_epoch3():
        deadline = time.monotonic() + 300
        while not (probe / "rank1.epoch3").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        pid = int((probe / "rank1.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_rank1_in_epoch3, daemon=True)
    killer.start()
    cfg = small_cfg("killed", workers=2, epochs=5, max_failures=1)
    result = build_torch_trainer(
        cfg, name=cfg.name, storage_path=str(tmp_path / "ray_results"),
        extra_loop_config={"_test_probe_dir": str(probe), "_test_hold_epoch": 3, "_test_hold_s": 120},
    ).fit()
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    assert (probe / "rank0.starts").read_text().split() == ["0", "2"]  # fresh start, then from epoch 2
    assert int((probe / "rank1.pid").read_text()) != killed[0]
    history = read_json(Path(result.checkpoint.path) / "history.json")
    assert [r["epoch"] for r in history] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert result.return_value["epochs"] == 5


@pytest.mark.slow
def test_cli_logs_one_mlflow_run_and_a_rerun_continues_at_epoch_3(ray_local, tmp_path, tracking_uri, capsys):
    from mlflow.tracking import MlflowClient

    from scoretune.cli import main
    from scoretune.drivers.progress import format_header
    from scoretune.config import load_config
    from trainables.train_loop import build_torch_trainer

    storage = tmp_path / "ray_results"
    common = ["--set", "attack.steps=2", "--set", "eval.pgd_steps=2", "--set", "eval.max_samples=64",
              "--set", "eval.test=false", "--set", f"scaling.storage_path={storage}"]
    rc = main(["train", str(CONFIG), "--workers", "2", "--set", "epochs=2", *common,
               "--tracking-uri", tracking_uri])
    assert rc == 0
    out = capsys.readouterr().out
    table = out[out.index(format_header()):].splitlines()
    assert [line.split()[0] for line in table[1:3]] == ["1", "2"]  # the driver prints one row per epoch
    assert "best checkpoint:" in out

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("digits-trades-se")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["scoretune.workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_pgd_acc")] == [1, 2]
    assert run.data.params["scaling.workers"] == "2"
    assert client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/best.pt"]
    first_two = [client.get_metric_history(run.info.run_id, "train_loss")[i].value for i in range(2)]

    # the same name and storage path again, now with a 3-epoch budget: continues at epoch 3
    cfg = load_config(CONFIG, ["epochs=3", "attack.steps=2", "eval.pgd_steps=2", "eval.max_samples=64",
                               "eval.test=false", "scaling.workers=2"])
    probe = tmp_path / "probe"
    result = build_torch_trainer(cfg, name=cfg.name, storage_path=str(storage),
                                 extra_loop_config={"_test_probe_dir": str(probe)}).fit()
    assert (probe / "rank0.starts").read_text().split() == ["2"]
    assert not (probe / "rank0.epoch1").exists() and (probe / "rank0.epoch3").exists()
    history = read_json(Path(result.checkpoint.path) / "history.json")
    assert [r["epoch"] for r in history] == [1.0, 2.0, 3.0]
    assert [r["train_loss"] for r in history[:2]] == pytest.approx(first_two, rel=1e-12)
