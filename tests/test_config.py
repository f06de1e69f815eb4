"""Experiment configs: validated fields, one-line errors naming the field and the allowed values."""

import pytest

from scoretune.config import ConfigError, build_config, load_config, parse_overrides


def _error(raw, overrides=None):
    with pytest.raises(ConfigError) as e:
        build_config(raw, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_trades_se_on_digits():
    cfg = build_config({})
    assert (cfg.data.name, cfg.objective.method, cfg.objective.loss) == ("digits", "trades", "se")


def test_unknown_loss_names_the_field_and_the_choices():
    msg = _error({"objective": {"loss": "hinge"}})
    assert "objective.loss" in msg and "'se'" in msg and "'sqrt_js'" in msg and "hinge" in msg


def test_negative_beta_is_rejected():
    msg = _error({"objective": {"beta": -1}})
    assert "objective.beta" in msg and "greater than or equal to 0" in msg


def test_eps_out_of_range_for_pixel_data():
    msg = _error({"attack": {"eps": 8}})
    assert "attack.eps: 8 is out of range" in msg and "8/255" in msg


def test_eps_above_one_is_fine_for_the_toy():
    assert build_config({"data": {"name": "toy"}, "model": {"name": "toy_mlp"}, "attack": {"eps": 2.0}}).attack.eps == 2.0


def test_unknown_key_is_named():
    msg = _error({"objective": {"betta": 3}})
    assert "objective.betta: unknown key" in msg


def test_unknown_dataset_lists_choices():
    msg = _error({"data": {"name": "imagenet"}})
    assert "data.name" in msg and "cifar10" in msg and "digits" in msg


def test_missing_data_dir_fails_with_the_expected_files(tmp_path):
    from scoretune.data import DatasetError
    from scoretune.engine import Trainer

    cfg = build_config({"data": {"name": "cifar10", "root": str(tmp_path / "nowhere")}, "model": {"name": "small_cnn"}})
    with pytest.raises(DatasetError) as e:
        Trainer(cfg)
    assert "data_batch_1" in str(e.value) and str(tmp_path / "nowhere") in str(e.value)
    assert "\n" not in str(e.value)


def test_overrides_parse_yaml_scalars_into_nested_keys():
    assert parse_overrides(["objective.beta=3", "data.name=toy", "eval.test=false"]) == {
        "objective": {"beta": 3}, "data": {"name": "toy"}, "eval": {"test": False}}
    cfg = build_config({"objective": {"beta": 6}}, ["objective.beta=3.5", "epochs=2"])
    assert cfg.objective.beta == 3.5 and cfg.epochs == 2


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_overrides(["objective.beta"])


def test_malformed_yaml_reports_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("objective:\n  beta: [1, 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_value_clip_needs_trades():
    msg = _error({"objective": {"method": "pgdat", "clip_mode": "value", "clip": 0.1}})
    assert "objective.clip_mode: clip_mode 'value' clips the TRADES robust term" in msg


def test_floor_rule_needs_a_floor():
    msg = _error({"early_stop": {"rule": "floor"}})
    assert "early_stop.floor" in msg


def test_shipped_example_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "configs" / "digits_trades_se.yaml")
    assert cfg.objective.loss == "se" and cfg.epochs == 10
