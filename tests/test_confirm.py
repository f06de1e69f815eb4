"""The confirmation stage: the search's top configurations trained again with new seeds (real Ray Tune,
real MLflow), ranked by mean AutoAttack accuracy, interrupted and resumed without retraining a finished
seed, and promoted as the winner's median seed."""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time

import pytest
from conftest import TINY

from scoretune.search.space import ConfirmSpec, build_space
from scoretune.tracking import tags

EPOCHS, SEEDS = 2, 3


def _raw(tmp_path, uri):
    return {"name": "conf", "base": {**TINY, "epochs": EPOCHS},
            "params": {"beta": {"choice": [1.0, 6.0]}}, "sampler": {"type": "grid"},
            "max_concurrent": 1, "top_k": 0, "scheduler": {"type": "none"}, "autoattack": {"version": "none"},
            "confirm": {"top_k": 2, "seeds": SEEDS, "split": "test", "attack": "aa-fast", "n_ex": 40},
            "storage_path": str(tmp_path / "ray"), "tracking_uri": uri}


def _interrupt_after_first_confirmed(uri: str, stop: threading.Event) -> None:
    """Ctrl-C the driver (this process) once a confirmation run has finished its training."""
    from scoretune.tracking import client

    cl = client(uri)
    while not stop.is_set():
        runs = [r for e in cl.search_experiments() for r in cl.search_runs(
            [e.experiment_id], f"tags.`{tags.STAGE}` = 'confirm' and tags.`{tags.STATUS}` = 'completed'")]
        if runs:
            os.kill(os.getpid(), signal.SIGINT)
            return
        time.sleep(0.3)


@pytest.fixture(scope="module")
def confirmed(tmp_path_factory, one_thread):
    """A 2-config grid search confirmed with 3 seeds each, Ctrl-C'd after the first confirmation run
    finished and resumed; returns (uri, parent run, finished-before-the-interrupt {run_id: epochs logged})."""
    import ray

    from scoretune.search.driver import run_search
    from scoretune.threads import ray_start_env
    from scoretune.tracking import client
    from scoretune.tracking.runs import CONFIRM_STAGE, child_runs, find_parent_runs

    if not ray.is_initialized():
        with ray_start_env():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = tmp_path_factory.mktemp("confirm")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    space = build_space(_raw(tmp, uri))
    stop = threading.Event()
    watcher = threading.Thread(target=_interrupt_after_first_confirmed, args=(uri, stop), daemon=True)
    watcher.start()
    lines: list[str] = []
    first = run_search(space, out=lines.append)
    stop.set()
    assert first is None, "\n".join(lines[-30:])  # interrupted in the confirmation stage
    cl = client(uri)
    parent = find_parent_runs(cl, "conf")[0]
    assert parent.info.status == "KILLED"
    finished = {r.info.run_id: len(cl.get_metric_history(r.info.run_id, "epoch"))
                for r in child_runs(cl, parent, CONFIRM_STAGE) if r.data.tags.get(tags.STATUS) == "completed"}
    assert finished
    summary = run_search(space, resume=True, out=lines.append)
    assert summary is not None and summary.confirmed is not None, "\n".join(lines[-30:])
    return uri, cl.get_run(parent.info.run_id), finished, summary, lines


def _confirm_runs(uri, parent):
    from scoretune.tracking import client
    from scoretune.tracking.runs import CONFIRM_STAGE, child_runs

    return [r for r in child_runs(client(uri), parent, CONFIRM_STAGE) if tags.SUPERSEDED not in r.data.tags]


def test_confirm_is_off_by_default_and_a_count_of_seeds_takes_the_first_unused_ones(tmp_path):
    raw = _raw(tmp_path, "sqlite:///x.db")
    assert build_space({**raw, "confirm": "none"}).confirm is None
    assert build_space({k: v for k, v in raw.items() if k != "confirm"}).confirm is None
    space = build_space({**raw, "params": {**raw["params"], "seed": {"choice": [0, 1, 2]}}})
    assert space.confirm.seed_list(space.seeds_used()) == [3, 4, 5]
    assert ConfirmSpec(seeds=[7, 9]).seed_list({0}) == [7, 9]


def test_a_bad_confirm_setting_names_its_field(tmp_path):
    from scoretune.errors import UserError

    with pytest.raises((UserError, ValueError), match="confirm"):
        build_space({**_raw(tmp_path, "sqlite:///x.db"), "confirm": {"seeds": 0}})


def test_every_top_configuration_runs_once_per_new_seed_tagged_with_stage_and_config(confirmed):
    from scoretune.search.report import config_id

    uri, parent, _, _, _ = confirmed
    runs = _confirm_runs(uri, parent)
    got = sorted((float(r.data.params["beta"]), int(r.data.params["seed"])) for r in runs)
    assert got == [(b, s) for b in (1.0, 6.0) for s in (1, 2, 3)]
    for r in runs:
        assert r.data.tags[tags.CONFIG_ID] == config_id({"beta": float(r.data.params["beta"])})
        assert r.data.tags.get(tags.MODEL_URI) and 0.0 <= r.data.metrics["aa_acc"] <= 1.0
        assert r.data.tags["eval.aa_fast_acc.split"] == "test" and r.data.tags["eval.aa_fast_acc.n_ex"] == "40"
        assert r.info.status == "FINISHED"


def test_the_resumed_confirmation_trains_no_finished_seed_again(confirmed):
    from scoretune.tracking import client

    uri, parent, finished, _, _ = confirmed
    cl = client(uri)
    for run_id, epochs in finished.items():
        assert epochs == EPOCHS
        assert len(cl.get_metric_history(run_id, "epoch")) == EPOCHS  # no epoch logged twice
    assert len(_confirm_runs(uri, parent)) == 2 * SEEDS  # no seed run twice


def test_the_parent_logs_the_winners_mean_std_and_seed_count(confirmed):
    uri, parent, _, summary, _ = confirmed
    by_config: dict[str, list[float]] = {}
    for r in _confirm_runs(uri, parent):
        by_config.setdefault(r.data.tags[tags.CONFIG_ID], []).append(r.data.metrics["aa_acc"])
    win = max(by_config, key=lambda c: statistics.fmean(by_config[c]))
    m = parent.data.metrics
    assert m["confirmed_aa_acc_mean"] == pytest.approx(statistics.fmean(by_config[win]), abs=1e-9)
    assert m["confirmed_aa_acc_std"] == pytest.approx(statistics.stdev(by_config[win]), abs=1e-9)
    assert m["confirmed_n_seeds"] == SEEDS
    assert 0.0 <= m["confirmed_clean_acc_mean"] <= 1.0
    assert parent.data.tags[tags.CONFIRMED] == win
    assert parent.info.status == "FINISHED"
    assert "### Confirmation" in parent.data.tags[tags.NOTE]
    assert summary.confirmed.winner.stats["AutoAttack"].n == SEEDS


def test_confirmed_md_tables_every_confirmed_configuration(confirmed):
    import mlflow

    uri, parent, _, _, _ = confirmed
    mlflow.set_tracking_uri(uri)
    text = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/confirmed.md")
    assert "seeds [1, 2, 3]" in text and "aa-fast on 40 test examples" in text
    assert text.count("(3)") >= 2  # n = 3 seeds in both rows


def test_promote_registers_the_median_seed_of_the_confirmed_winner(confirmed):
    from scoretune.tracking import client
    from scoretune.tracking.promote import promote

    uri, parent, _, _, _ = confirmed
    res = promote("conf", tracking_uri=uri)
    win = parent.data.tags[tags.CONFIRMED]
    runs = sorted((r for r in _confirm_runs(uri, parent) if r.data.tags[tags.CONFIG_ID] == win),
                  key=lambda r: (r.data.metrics["aa_acc"], r.info.run_id))
    assert res.run_id == runs[1].info.run_id  # the middle of 3
    assert res.metric == "confirmed_aa_acc_mean"
    assert res.value == pytest.approx(parent.data.metrics["confirmed_aa_acc_mean"])
    desc = client(uri).get_model_version(res.model_name, res.version).description
    assert f"{res.value:.4f} ± {parent.data.metrics['confirmed_aa_acc_std']:.4f}" in desc and "3 seeds" in desc


def test_report_tables_the_confirmation_stage(confirmed, capsys):
    from scoretune.cli import main

    uri, _, _, _, _ = confirmed
    assert main(["report", "--search", "conf", "--stage", "confirm", "--format", "csv", "--tracking-uri", uri]) == 0
    import csv

    rows = list(csv.DictReader(capsys.readouterr().out.strip().splitlines()))
    assert sorted(float(r["beta"]) for r in rows) == [1.0, 6.0]
    assert all(r["AutoAttack_n"] == "3" and r["clean_n"] == "3" for r in rows)
    assert float(rows[0]["AutoAttack_mean"]) >= float(rows[1]["AutoAttack_mean"])  # best first


def test_the_search_stage_report_leaves_the_confirmation_out(confirmed):
    from scoretune.tracking import client
    from scoretune.tracking.runs import search_trials

    uri, parent, _, _, _ = confirmed
    assert len(search_trials(client(uri), parent)) == 2
