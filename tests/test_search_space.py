"""Search-space schema: shipped spaces validate, bad spaces fail with one line naming the key (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scoretune.config import ALIASES, ConfigError
from scoretune.search.space import build_space, load_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
BASE = {"data": {"name": "digits"}, "model": {"name": "mlp"}, "epochs": 3}


def space(**kw):
    raw = {"name": "t", "base": dict(BASE), "params": {"beta": {"loguniform": [1.0, 8.0]}}}
    raw.update(kw)
    return raw


def error_of(raw, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        build_space(raw, overrides, source="s.yaml")
    msg = str(e.value)
    assert "\n" not in msg, "errors are one line"
    assert msg.startswith("s.yaml: ")
    return msg


def test_shipped_spaces_are_present():
    names = {p.stem for p in SPACES}
    assert {"quickstart", "loss_ablation", "cifar10_trades_se", "cifar10_pgdat_se", "toy", "mnist5k"} <= names


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_shipped_space_validates(path):
    s = load_space(path)
    assert s.name == path.stem
    assert s.params and s.total_samples >= 1


def test_quickstart_searches_beta_lr_loss_clip_with_asha_and_floor():
    s = load_space(ROOT / "search_spaces/quickstart.yaml")
    assert s.targets == {"beta": "objective.beta", "lr": "optim.lr", "loss": "objective.loss",
                         "clip": "objective.clip"}
    assert s.total_samples >= 8
    assert s.scheduler.type == "asha" and s.stoppers.floor is not None
    cfg = s.base_config()
    assert (cfg.data.name, cfg.model.name, cfg.objective.method, cfg.device) == ("digits", "small_cnn", "trades", "cpu")


def test_loss_ablation_is_the_eight_losses_times_three_lrs():
    s = load_space(ROOT / "search_spaces/loss_ablation.yaml")
    assert sorted(s.params["loss"].choice) == sorted(["l2", "l1", "linf", "sqrt_js", "js", "kl", "l1_sq", "se"])
    assert s.params["lr"].choice == [0.1, 0.05, 0.01]
    assert s.sampler.type == "grid" and s.total_samples == 24


@pytest.mark.parametrize("stem,model,method,epochs", [("cifar10_trades_se", "preact_resnet18", "trades", 110),
                                                      ("cifar10_pgdat_se", "wrn-28-10", "pgdat", 200)])
def test_cifar_spaces_follow_the_paper_settings(stem, model, method, epochs):
    s = load_space(ROOT / f"search_spaces/{stem}.yaml")
    cfg = s.base_config()
    assert (cfg.model.name, cfg.objective.method, cfg.objective.loss, cfg.epochs) == (model, method, "se", epochs)
    assert cfg.attack.eps == pytest.approx(8 / 255, abs=1e-6)
    assert cfg.attack.step_size == pytest.approx(2 / 255, abs=1e-6) and cfg.attack.steps == 10
    assert (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 5e-4)
    assert s.resources.workers == 4 and s.resources.gpus == 1


def test_table3_space_is_the_official_lse_recipe():
    """WRN-28-10 SiLU, 70% DDPM images, EMA, TRADES-SE beta 3 and 4, and trades_loss_LSE's attack:
    batch statistics with frozen running statistics, a uniform start."""
    from scoretune.models import build_model

    s = load_space(ROOT / "search_spaces/cifar10_table3_trades_se.yaml")
    cfg = s.base_config()
    assert (cfg.model.name, cfg.model.activation, cfg.data.name) == ("wrn-28-10", "silu", "cifar10")
    assert cfg.data.ddpm_path and cfg.data.ddpm_fraction == 0.7 and cfg.ema_decay == 0.995
    assert (cfg.objective.method, cfg.objective.loss, cfg.objective.label_smoothing, cfg.objective.clip_mode) == (
        "trades", "se", 0.0, "none")
    assert s.params["beta"].choice == [3.0, 4.0] and s.total_samples == 2
    attack = cfg.attack.build((0.0, 1.0))
    assert (attack.bn, attack.start, attack.steps) == ("train_frozen", "uniform", 10)
    assert attack.eps == pytest.approx(8 / 255, abs=1e-6) and attack.alpha == pytest.approx(2 / 255, abs=1e-6)
    net = build_model(cfg.model.name, input_shape=(3, 32, 32), num_classes=10, activation=cfg.model.activation,
                      device="meta")
    assert any(isinstance(m, torch.nn.SiLU) for m in net.modules())


def test_aliases_and_dotted_keys_write_the_sampled_values_into_the_experiment():
    s = build_space(space(params={"beta": {"uniform": [1.0, 2.0]}, "lr": {"choice": [0.1, 0.05]},
                                  "objective.loss": {"choice": ["se", "kl"]}, "attack.steps": {"int": [1, 3]}}))
    cfg = s.experiment_config({"beta": 1.5, "lr": 0.05, "objective.loss": "kl", "attack.steps": 2})
    assert (cfg.objective.beta, cfg.optim.lr, cfg.objective.loss, cfg.attack.steps) == (1.5, 0.05, "kl", 2)
    assert cfg.data.name == "digits" and cfg.epochs == 3  # the base stays


def test_base_can_be_an_experiment_yaml_path_relative_to_the_space(tmp_path):
    (tmp_path / "exp.yaml").write_text("data: {name: digits}\nmodel: {name: mlp}\nepochs: 4\n")
    (tmp_path / "sp.yaml").write_text("name: x\nbase: exp.yaml\nparams: {lr: {loguniform: [0.01, 0.1]}}\n")
    s = load_space(tmp_path / "sp.yaml")
    assert s.base_config().epochs == 4 and s.base_config().model.name == "mlp"


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nparams:\n  beta: {loguniform: [1, 8]\n")
    with pytest.raises(ConfigError) as e:
        load_space(p)
    msg = str(e.value)
    assert "bad.yaml" in msg and "malformed YAML" in msg and "line" in msg and "\n" not in msg


def test_unknown_param_names_the_key_and_the_aliases():
    msg = error_of(space(params={"betta": {"loguniform": [1.0, 8.0]}}))
    assert "params.betta: unknown parameter" in msg and "beta" in msg and "objective.beta" in msg


def test_unknown_nested_key_is_rejected():
    assert "params.optim.learning_rate: unknown parameter" in error_of(
        space(params={"optim.learning_rate": {"loguniform": [0.01, 0.1]}}))


@pytest.mark.parametrize("dist,bounds,expect", [
    ("loguniform", [8.0, 1.0], "params.beta: loguniform: needs lo < hi (got [8.0, 1.0])"),
    ("uniform", [2.0, 2.0], "params.beta: uniform: needs lo < hi"),
    ("loguniform", [0.0, 1.0], "params.beta: loguniform: needs lo > 0"),
])
def test_bad_range_names_the_param(dist, bounds, expect):
    assert expect in error_of(space(params={"beta": {dist: bounds}}))


def test_unknown_loss_in_a_choice_names_it_and_the_allowed_losses():
    msg = error_of(space(params={"loss": {"choice": ["se", "hinge"]}}))
    assert "params.loss.choice: unknown loss 'hinge'" in msg
    assert "l2, l1, linf, sqrt_js, js, kl, l1_sq, se" in msg


def test_unknown_distribution_and_two_distributions_are_errors():
    assert "unknown distribution 'normal'; choose one of: loguniform, uniform, int, choice" in error_of(
        space(params={"beta": {"normal": [0.0, 1.0]}}))
    assert "give exactly one of" in error_of(space(params={"beta": {"uniform": [1, 2], "choice": [1]}}))


def test_out_of_range_value_for_the_experiment_is_named():
    msg = error_of(space(params={"lr": {"uniform": [-0.1, 0.1]}}))
    assert "params.lr.uniform: value -0.1 makes an invalid experiment: optim.lr" in msg


def test_every_choice_combination_must_make_a_valid_experiment():
    base = {**BASE, "objective": {"clip_mode": "value", "clip": 0.1}}
    msg = error_of(space(base=base, params={"method": {"choice": ["trades", "pgdat"]}}))
    assert "params.method.choice: value 'pgdat'" in msg and "clip_mode 'value'" in msg


def test_joint_check_catches_cross_param_conflicts():
    msg = error_of(space(params={"method": {"choice": ["trades", "pgdat"]},
                                 "clip_mode": {"choice": ["none", "value"]}}))
    assert "params: the combination method='pgdat', clip_mode='value' makes an invalid experiment" in msg


def test_float_range_on_an_integer_key_suggests_int():
    assert "params.attack.steps.uniform: attack.steps takes integers; use int: [1, 5]" in error_of(
        space(params={"attack.steps": {"uniform": [1, 5]}}))


def test_unknown_top_level_key_is_named():
    assert "schedulr: unknown key" in error_of(space(schedulr={"type": "asha"}))


def test_objective_metric_must_be_reported_by_the_trials():
    msg = error_of(space(objective={"metric": "val_robust_acc", "mode": "max"}))
    assert "objective.0.metric: 'val_robust_acc' is not reported" in msg and "val_pgd_acc" in msg
    assert "objective.0.mode" in error_of(space(objective={"metric": "val_pgd_acc", "mode": "maximize"}))


def test_several_objectives_make_a_multi_objective_space():
    s = build_space(space(objective=[{"metric": "val_pgd_acc", "mode": "max"}, {"metric": "val_clean_acc"}]))
    assert s.multi_objective and [str(o) for o in s.objective] == ["val_pgd_acc:max", "val_clean_acc:max"]


def test_floor_estimate_auto_is_accepted_on_any_data_and_true_means_auto():
    s = build_space(space(stoppers={"floor": {"estimate": True}}))
    assert s.stoppers.floor.estimate == "auto" and s.stoppers.floor.metric == "train_r_madry"
    assert "give either value" in error_of(space(stoppers={"floor": {"patience": 2}}))


def test_floor_estimate_auto_refuses_a_searched_eps_and_eps_zero():
    msg = error_of(space(stoppers={"floor": {"estimate": "auto"}}, params={"eps": {"uniform": [0.1, 0.3]}}))
    assert "stoppers.floor.estimate: the floor depends on attack.eps, which params.eps searches" in msg
    base = space()["base"]
    msg = error_of(space(stoppers={"floor": {"estimate": "auto"}}, base={**base, "attack": {"eps": 0.0}}))
    assert "stoppers.floor.estimate: base attack.eps is 0" in msg


def test_grace_period_above_max_t_is_an_error():
    assert "scheduler.grace_period" in error_of(space(scheduler={"type": "asha", "grace_period": 5}))


def test_points_to_evaluate_must_lie_in_the_space():
    assert "points_to_evaluate.0.beta: 20.0 is outside loguniform[1, 8]" in error_of(
        space(points_to_evaluate=[{"beta": 20.0}]))


def test_overrides_set_fields_and_replace_a_distribution():
    s = build_space(space(params={"lr": {"loguniform": [0.01, 0.1]}}), ["num_samples=4", "base.epochs=2",
                                                                          "params.lr.choice=[0.3, 0.2]"])
    assert s.num_samples == 4 and s.base_config().epochs == 2
    assert s.params["lr"].kind == "choice" and s.params["lr"].choice == [0.3, 0.2]


def test_epoch_budget_is_capped_by_asha_max_t():
    s = build_space(space(scheduler={"type": "asha", "max_t": 2}))
    assert s.epoch_budget({}) == 2
    s = build_space(space(params={"epochs": {"choice": [2, 5]}}, scheduler={"type": "none"}))
    assert s.epoch_budget({"epochs": 5}) == 5 and s.max_epochs() == 5


def test_optuna_distributions_match_the_spec():
    import optuna

    s = build_space(space(params={"beta": {"loguniform": [1.0, 8.0]}, "attack.steps": {"int": [1, 3]},
                                  "loss": {"choice": ["se", "kl"]}}))
    d = {n: p.optuna_distribution() for n, p in s.params.items()}
    assert d["beta"] == optuna.distributions.FloatDistribution(1.0, 8.0, log=True)
    assert d["attack.steps"] == optuna.distributions.IntDistribution(1, 3)
    assert d["loss"] == optuna.distributions.CategoricalDistribution(["se", "kl"])


def test_every_alias_points_at_a_real_experiment_key():
    from scoretune.search.space import _field_annotation

    for alias, dotted in ALIASES.items():
        assert _field_annotation(dotted)[0], alias


def test_parent_run_params_follow_name_and_the_experiment_follows_the_space(tmp_path):
    """``--name uiwalk`` of a space named ``t``: the parent's ``search.name`` param says uiwalk, like its tag and run
    name; the MLflow experiment is the space's (``t``)."""
    from scoretune.search.callback import start_parent_run
    from scoretune.tracking import tags

    logger = start_parent_run(build_space(space()), name="uiwalk", ray_path=str(tmp_path / "ray"),
                              tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = logger.client.get_run(logger.run_id)
    assert run.data.params["search.name"] == "uiwalk" == run.data.tags[tags.SEARCH] == run.info.run_name
    assert logger.client.get_experiment(run.info.experiment_id).name == "t"
