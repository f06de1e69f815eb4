"""The automatic floor (scoretune.floor_estimate), R_Madry measured at the CE maximiser
(scoretune.engine.robust_ce / r_madry_probe), clip: auto, and their config keys."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from scoretune.config import ConfigError, ExperimentConfig, build_config
from scoretune.floor_estimate import (
    FloorEstimateError,
    clip_for_floor,
    default_proxy_beta,
    estimate_floor,
    resolve_auto,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = {"data": {"name": "toy", "val_size": 0.1, "options": {"n_train": 3000, "n_test": 200}},
       "model": {"name": "toy_mlp"}, "attack": {"eps": 1.0, "norm": "linf", "steps": 10},
       "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "schedule": "cosine"},
       "eval": {"pgd_steps": 10, "test": False}, "epochs": 20, "batch_size": 128, "device": "cpu", "seed": 0}


def toy_cfg(**changes) -> ExperimentConfig:
    data = json.loads(json.dumps(TOY))
    for k, v in changes.items():
        section, _, field = k.partition("__")
        if field:
            data[section][field] = v
        else:
            data[section] = v
    return ExperimentConfig.model_validate(data)


def quiet(_line: str) -> None:
    pass


# ----------------------------------------------------------------------------- R_Madry at the CE maximiser


def test_ce_pgd_r_madry_is_at_least_the_ce_at_the_trades_point_on_a_trained_model():
    from scoretune.attacks import eval_mode, training_attack
    from scoretune.engine import Trainer, robust_ce
    from scoretune.losses import madry_kl

    torch.manual_seed(0)
    cfg = ExperimentConfig.model_validate({
        "data": {"name": "digits", "val_size": 0.1}, "model": {"name": "mlp", "options": {"hidden": [64]}},
        "objective": {"method": "trades", "loss": "se", "beta": 4.0}, "attack": {"eps": 0.2, "steps": 5},
        "eval": {"pgd_steps": 20, "test": False}, "optim": {"lr": 0.1}, "epochs": 2, "batch_size": 64,
        "device": "cpu", "seed": 0, "early_stop": {"probe_fraction": 0.0}})
    tr = Trainer(cfg)
    for _ in range(2):
        tr.train_one_epoch()
    net = tr.eval_model
    x, y = tr.dataset.train.x[:256], tr.dataset.train.y[:256]
    g = torch.Generator().manual_seed(1)
    with eval_mode(net):
        x_trades = training_attack(net, x, y, tr.objective, tr.train_attack, generator=g)
        with torch.no_grad():
            ce_trades = madry_kl(net(x_trades), y).mean().item()
    r_madry = robust_ce(net, x, y, tr.eval_attack, restarts=1, generator=g).mean().item()
    with torch.no_grad():
        ce_clean = madry_kl(net(x), y).mean().item()
    print(f"CE clean {ce_clean:.3f}, at the TRADES point {ce_trades:.3f}, at the CE-PGD point {r_madry:.3f}")
    assert r_madry >= ce_trades > ce_clean  # the TRADES point understates R_Madry


def test_trainer_rows_carry_train_and_val_r_madry_and_the_attack_ce():
    from scoretune.engine import ENGINE_METRICS, Trainer

    cfg = ExperimentConfig.model_validate({**TOY, "epochs": 1, "objective": {"method": "pgdat", "loss": "kl"}})
    tr = Trainer(cfg)
    assert len(tr.probe_loader._y) == 300  # 10% of the 3000 training points, a fixed subsample
    row = tr.train_one_epoch()
    for key in ("train_r_madry", "val_r_madry", "train_attack_ce", "probe_time"):
        assert key in row and key in ENGINE_METRICS and math.isfinite(row[key])
    assert "train_madry_kl" not in row and "train_madry_kl" not in ENGINE_METRICS


def test_probe_subsample_is_fixed_by_the_seed_and_the_fraction():
    from scoretune.engine import probe_indices

    a, b = probe_indices(1000, 0.1, 3), probe_indices(1000, 0.1, 3)
    assert torch.equal(a, b) and a.numel() == 100 and not torch.equal(a, probe_indices(1000, 0.1, 4))
    assert probe_indices(100, 0.1, 0).numel() == 64  # at least 64 samples
    assert probe_indices(1000, 0.0, 0).numel() == 0


# ----------------------------------------------------------------------------- the estimator on the toy


def test_auto_floor_on_the_toy_is_the_exact_posterior():
    est = estimate_floor(toy_cfg(), out=quiet)
    assert est.source == "exact" and est.n == 512
    assert est.floor == pytest.approx(est.c_l1 ** 2 / 2)
    assert 0.2 < est.c_l1 < 0.3 and est.c_l1_se < 0.02


@pytest.mark.slow
def test_auto_floor_from_a_trained_proxy_lands_within_25_percent_of_the_exact_toy_floor():
    cfg = toy_cfg()
    exact = estimate_floor(cfg, out=quiet)
    proxy = estimate_floor(cfg, force_proxy=True, proxy_epochs=20, out=quiet)
    assert proxy.source == "proxy" and default_proxy_beta((1,)) == 0.0
    ratio = proxy.floor / exact.floor
    print(f"toy eps 1: exact floor {exact.floor:.4f}, proxy floor {proxy.floor:.4f} (ratio {ratio:.3f})")
    assert 0.75 <= ratio <= 1.25, ratio


def test_cached_proxy_is_reused_and_retrained_when_eps_or_data_change(tmp_path):
    lines: list[str] = []
    cfg = toy_cfg()
    first = estimate_floor(cfg, cache_dir=tmp_path, force_proxy=True, proxy_epochs=2, samples=128, out=lines.append)
    assert not first.reused and Path(first.cache_path).is_file()
    epochs = [line for line in lines if line.startswith("floor: proxy epoch ")]  # progress, one line per epoch
    assert [e.split()[3] for e in epochs] == ["1/2", "2/2"] and all("train loss" in e for e in epochs)
    assert any(line.startswith("floor: measuring C^l1 of the proxy on ") for line in lines)
    assert Path(first.cache_path).with_suffix(".pt").is_file()  # the proxy checkpoint
    again = estimate_floor(cfg, cache_dir=tmp_path, force_proxy=True, proxy_epochs=2, samples=128, out=lines.append)
    assert again.reused and again.floor == first.floor and again.cache_path == first.cache_path
    assert again.seconds < first.seconds

    other_eps = estimate_floor(toy_cfg(attack__eps=0.5), cache_dir=tmp_path, force_proxy=True, proxy_epochs=2,
                               samples=128, out=lines.append)
    assert not other_eps.reused and other_eps.cache_path != first.cache_path and other_eps.floor < first.floor

    record = json.loads(Path(first.cache_path).read_text())
    record["data_sha256"] = "0" * 64  # as if the data files had changed under the same name
    Path(first.cache_path).write_text(json.dumps(record))
    retrained = estimate_floor(cfg, cache_dir=tmp_path, force_proxy=True, proxy_epochs=2, samples=128,
                               out=lines.append)
    assert not retrained.reused
    assert any("trained on other data" in line and "retraining" in line for line in lines)

    record = json.loads(Path(first.cache_path).read_text())
    record["key"]["eps"] = 0.25  # an entry whose recorded threat model does not match its key
    Path(first.cache_path).write_text(json.dumps(record))
    assert not estimate_floor(cfg, cache_dir=tmp_path, force_proxy=True, proxy_epochs=2, samples=128,
                              out=lines.append).reused
    Path(first.cache_path).write_text("{not json")
    assert not estimate_floor(cfg, cache_dir=tmp_path, force_proxy=True, proxy_epochs=2, samples=128,
                              out=lines.append).reused
    assert estimate_floor(cfg, cache_dir=tmp_path, force_proxy=True, proxy_epochs=2, samples=128,
                          out=lines.append).reused


# ----------------------------------------------------------------------------- clip: auto, resolve_auto


def test_clip_for_floor_makes_the_cross_entropy_bound_equal_the_floor():
    from scoretune.losses import clip_bound

    for floor in (0.01, 0.2, 1.5):
        c = clip_for_floor(floor)
        assert clip_bound("kl", c, 10) == pytest.approx(floor, rel=1e-6)
    with pytest.raises(FloorEstimateError, match="objective.clip"):
        clip_for_floor(float("nan"))


def test_resolve_auto_replaces_floor_and_clip_with_numbers():
    cfg = toy_cfg(early_stop={"rule": "floor", "floor": "auto", "patience": 3},
                  objective={"method": "trades", "loss": "se", "clip": "auto"})
    with pytest.raises(ConfigError, match="objective.clip"):
        cfg.objective.build()
    resolved, est = resolve_auto(cfg, out=quiet)
    assert resolved.early_stop.floor == pytest.approx(est.floor)
    assert resolved.objective.clip == pytest.approx(clip_for_floor(est.floor))
    assert resolved.objective.clip_mode == "smoothing"
    from scoretune.stopping import build_stopper

    rule = build_stopper(resolved.early_stop)
    assert rule.floor == pytest.approx(est.floor) and rule.patience == 3 and rule.metric == "train_r_madry"


# ----------------------------------------------------------------------------- bad input


def test_eps_zero_gives_a_one_line_error_naming_the_key():
    with pytest.raises(FloorEstimateError) as e:
        estimate_floor(toy_cfg(attack__eps=0.0), floor_key="stoppers.floor.estimate", out=quiet)
    assert str(e.value).startswith("stoppers.floor.estimate: attack.eps is 0") and "\n" not in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("early_stop.floor=nan", "early_stop.floor"),
    ("early_stop.floor=-1", "early_stop.floor"),
    ("early_stop.patience=0", "early_stop.patience"),
    ("objective.clip=-0.1", "objective.clip"),
])
def test_bad_floor_settings_in_an_experiment_name_the_key(override, key):
    from scoretune.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["early_stop.rule=floor", override])
    assert key in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("floor, key", [
    ({"estimate": "auto", "patience": 0}, "stoppers.floor.patience"),
    ({"value": float("nan")}, "stoppers.floor.value"),
    ({"value": -0.5}, "stoppers.floor.value"),
    ({"estimate": "sometimes"}, "stoppers.floor.estimate"),
])
def test_bad_floor_stopper_in_a_space_names_the_key(floor, key):
    from scoretune.search.space import build_space

    with pytest.raises(ConfigError) as e:
        build_space({"name": "s", "base": {"data": {"name": "toy"}, "model": {"name": "toy_mlp"}},
                     "params": {"lr": {"loguniform": [0.01, 0.1]}}, "stoppers": {"floor": floor}})
    assert key in str(e.value) and "\n" not in str(e.value)


def test_floor_stop_tags_name_the_epoch_the_value_and_the_floor():
    from scoretune.search.callback import floor_stop_tags
    from scoretune.stopping import Stop
    from scoretune.tracking import tags

    from trainables.stoppers import FloorStopper

    stopper = FloorStopper(floor=0.3, patience=2)
    for epoch, r in enumerate([0.5, 0.4, 0.35, 0.5, 0.3, 0.25, 0.21], 1):
        stopper("t1", {"epoch": epoch, "train_r_madry": r})
    assert floor_stop_tags(stopper.stops["t1"]) == {tags.FLOOR_STOP_EPOCH: "7", tags.FLOOR_VALUE: "0.3",
                                                    tags.FLOOR_STOP_VALUE: "0.21", tags.FLOOR_METRIC: "train_r_madry"}
    assert floor_stop_tags(None) == {}
    assert floor_stop_tags(Stop("plateau", "plateau: ...", 4, "val_pgd_acc", 0.5)) == {}


def test_train_with_floor_auto_on_the_toy_resolves_it_and_can_stop(tmp_path):
    from scoretune.drivers.train import train

    cfg = build_config({**TOY, "epochs": 3, "output_dir": str(tmp_path),
                        "early_stop": {"rule": "floor", "floor": "auto", "patience": 1}}, source="test")
    lines: list[str] = []
    summary = train(cfg, use_mlflow=False, out=lines.append)
    assert any(line.startswith("floor (C^l1)^2/2 = ") for line in lines)
    assert summary["epochs"] >= 1


# ----------------------------------------------------------------------------- the search's side


def toy_space(**changes):
    from scoretune.search.space import build_space

    raw = {"name": "toyfloor", "base": json.loads(json.dumps(TOY)), "params": {"lr": {"loguniform": [0.01, 0.1]}},
           "stoppers": {"floor": {"estimate": "auto", "patience": 2}}}
    raw.update(changes)
    return build_space(raw)


def test_search_floor_is_estimated_logged_on_the_parent_and_clip_auto_applied(tmp_path):
    from scoretune.search.driver import apply_floor, floor_cache_dir, log_floor, resolve_floor_estimate
    from scoretune.tracking import tags

    base = {**json.loads(json.dumps(TOY)), "objective": {"method": "trades", "loss": "se", "clip": "auto"}}
    space = toy_space(base=base, storage_path=str(tmp_path / "ray"))
    assert floor_cache_dir(space) == tmp_path / "ray" / "floor_cache"
    est = resolve_floor_estimate(space, out=quiet)
    assert est.source == "exact" and est.floor == pytest.approx(est.c_l1 ** 2 / 2)
    applied = apply_floor(space, est)
    obj = applied.base_config().objective
    assert obj.clip == pytest.approx(clip_for_floor(est.floor)) and obj.clip_mode == "smoothing"

    logged: dict = {}
    logger = SimpleNamespace(log_params=lambda d: logged.setdefault("params", d),
                             log_metrics=lambda d, step=0: logged.setdefault("metrics", d),
                             set_tags=lambda d: logged.setdefault("tags", d))
    log_floor(logger, est)
    assert set(logged["params"]) == {"floor", "floor_c_l1", "floor_c_l1_se", "floor_n"}
    assert logged["metrics"]["floor_c_l1"] == pytest.approx(est.c_l1)
    assert logged["metrics"]["floor_c_l1_se"] == pytest.approx(est.c_l1_se)
    assert logged["tags"][tags.FLOOR_SOURCE] == "exact"


def test_search_floor_value_is_used_as_given():
    from scoretune.search.driver import resolve_floor

    assert resolve_floor(toy_space(stoppers={"floor": {"value": 0.25}}), out=quiet) == 0.25
    assert resolve_floor(toy_space(stoppers={}), out=quiet) is None


def test_floor_stop_tags_give_the_refined_floor_a_trial_fell_below():
    from scoretune.search.callback import floor_stop_tags
    from scoretune.tracking import tags

    from trainables.stoppers import FloorStopper

    stopper = FloorStopper(floor=0.3, patience=1, refine=True)
    stopper("t0", {"epoch": 1, "val_pgd_acc": 0.9, "val_c_l1": 0.1 ** 0.5, "train_r_madry": 0.5})  # floor 0.05
    stopper("t1", {"epoch": 9, "val_pgd_acc": 0.5, "train_r_madry": 0.04})
    assert floor_stop_tags(stopper.stops["t1"])[tags.FLOOR_VALUE] == "0.05"


def test_refine_in_a_space_makes_every_trial_measure_c_l1_and_shares_one_refiner():
    from scoretune.search.tuner import build_stoppers, trial_settings

    from trainables.tune_trainable import SETTINGS_KEY, trial_experiment

    space = toy_space(stoppers={"floor": {"estimate": "auto", "patience": 2, "refine": True}})
    assert space.base_config().early_stop.refine is True
    assert "refine=best" in space.summary()["search.stopper.floor"]
    cfg = trial_experiment({SETTINGS_KEY: trial_settings(space, name="toyfloor", ray_path="/tmp/r"), "lr": 0.05}, "t1")
    assert cfg.early_stop.refine is True and cfg.early_stop.rule == "none"  # measured in the trial, judged by Tune
    (stopper,) = build_stoppers(space, 0.3)
    assert stopper.refiner is not None and stopper.refiner.base == 0.3
    assert toy_space().base_config().early_stop.refine is False
    (plain,) = build_stoppers(toy_space(), 0.3)
    assert plain.refiner is None


def test_the_search_logs_each_refinement_of_the_floor_on_the_parent_run(tmp_path):
    from scoretune.search.callback import MlflowSearchCallback
    from scoretune.tracking import client, get_or_create_experiment, tags

    from trainables.stoppers import FloorStopper

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cl = client(uri)
    exp = get_or_create_experiment(cl, "floors")
    parent = cl.create_run(exp).info.run_id
    stopper = FloorStopper(floor=0.3, patience=2, refine=True)
    cb = MlflowSearchCallback(toy_space(), tracking_uri=uri, parent_run_id=parent, experiment_id=exp,
                              stoppers=[stopper], floor=0.3, journal=str(tmp_path / "journal.jsonl"))
    cb._log_refined_floor()
    assert cl.get_metric_history(parent, "floor_refined") == []  # nothing measured yet: nothing to log
    stopper("a", {"epoch": 1, "val_pgd_acc": 0.5, "val_c_l1": 0.6, "train_r_madry": 1.0})
    cb._log_refined_floor()
    cb._log_refined_floor()  # unchanged: logged once
    stopper("a", {"epoch": 2, "val_pgd_acc": 0.7, "val_c_l1": 0.4, "train_r_madry": 0.8})
    cb._log_refined_floor()
    logged = sorted((m.step, m.value) for m in cl.get_metric_history(parent, "floor_refined"))
    assert logged == [(1, pytest.approx(0.18)), (2, pytest.approx(0.08))]
    assert "C^l1 0.4 of the model of best val_pgd_acc 0.7, epoch 2" in cl.get_run(parent).data.tags[tags.FLOOR_REFINED]