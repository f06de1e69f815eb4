"""Early-stopping rules (scoretune.stopping), the Ray Tune adapter (trainables.stoppers) and
`scoretune train --early-stop floor`."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from scoretune.stopping import FloorRule, PlateauRule, build_stopper

FLOOR = 0.03
DIGITS_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "digits_trades_se.yaml")


def feed(rule, values, metric="train_r_madry"):
    """Feed one row per epoch (epochs 1, 2, ...); return the epoch the rule stopped at, or None."""
    for epoch, v in enumerate(values, start=1):
        if rule.should_stop({"epoch": epoch, metric: v}):
            return epoch
    return None


# ----------------------------------------------------------------------------- FloorRule


def test_floor_rule_stops_after_patience_epochs_below_the_floor():
    rule = FloorRule(FLOOR, patience=2)
    assert feed(rule, [0.50, 0.20, 0.05, 0.02, 0.01, 0.005]) == 5
    assert rule.first_below_epoch == 4 and rule.stopped_epoch == 5
    assert rule.reason == "floor: train_r_madry below (C^l1)^2/2=0.03 for 2 epochs since epoch 4"


def test_floor_rule_never_stops_before_patience_epochs_below():
    rule = FloorRule(FLOOR, patience=3)
    decisions = [rule.should_stop({"epoch": e, "train_r_madry": 0.001}) for e in (1, 2, 3)]
    assert decisions == [False, False, True]
    assert rule.first_below_epoch == 1


def test_floor_rule_never_stops_while_the_loss_stays_above_the_floor():
    rule = FloorRule(FLOOR, patience=1)
    approaching = [FLOOR + 1.0 / (e + 1) for e in range(200)] + [FLOOR]  # at the floor is not below it
    assert feed(rule, approaching) is None
    assert rule.first_below_epoch is None and rule.reason == ""


def test_floor_rule_resets_on_a_rise_and_remembers_the_first_crossing():
    rule = FloorRule(FLOOR, patience=2)
    #               1     2     3     4     5     6
    assert feed(rule, [0.02, 0.05, 0.02, 0.04, 0.01, 0.01]) == 6
    assert rule.first_below_epoch == 1
    assert rule.streak_start_epoch == 5
    assert "since epoch 5" in rule.reason


def test_floor_rule_takes_values_and_explicit_epochs_and_stays_stopped():
    rule = FloorRule(FLOOR, patience=2)
    assert rule.update(0.01, epoch=7) is False
    assert rule.update(0.01, epoch=8) is True
    assert rule.stopped_epoch == 8 and "since epoch 7" in rule.reason
    assert rule.update(1.0, epoch=9) is True  # once stopped, stays stopped


def test_floor_rule_ignores_rows_without_the_metric():
    rule = FloorRule(FLOOR, patience=2)
    assert not rule.should_stop({"epoch": 1, "train_r_madry": 0.01})
    assert not rule.should_stop({"epoch": 2, "val_pgd_acc": 0.5})  # neither counts nor resets
    assert not rule.should_stop({"epoch": 3, "train_r_madry": float("nan")})
    assert rule.should_stop({"epoch": 4, "train_r_madry": 0.01})


def test_floor_rule_counts_epochs_when_rows_carry_none():
    rule = FloorRule(FLOOR, patience=2, metric="robust_kl")
    assert feed(rule, [0.5, 0.01, 0.01], metric="robust_kl") == 3
    rule2 = FloorRule(FLOOR, patience=2, metric="robust_kl")
    for v in (0.5, 0.01, 0.01):
        stopped = rule2.should_stop({"robust_kl": v})
    assert stopped and rule2.stopped_epoch == 3 and rule2.first_below_epoch == 2


@pytest.mark.parametrize("kwargs", [dict(floor=-0.1), dict(floor=float("nan")), dict(floor=0.1, patience=0)])
def test_floor_rule_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        FloorRule(**kwargs)


# ----------------------------------------------------------------------------- PlateauRule


def test_plateau_rule_stops_when_the_metric_stops_improving():
    rule = PlateauRule("val_pgd_acc", mode="max", patience=3)
    #                                   1     2     3     4      5     6
    assert feed(rule, [0.30, 0.40, 0.41, 0.40, 0.39, 0.405], metric="val_pgd_acc") == 6
    assert rule.best == 0.41 and rule.best_epoch == 3
    assert rule.reason.startswith("plateau: val_pgd_acc has not improved on 0.41 (epoch 3) for 3 epochs")


def test_plateau_rule_improvement_resets_and_min_delta_counts_small_gains_as_none():
    rule = PlateauRule("val_pgd_acc", patience=2)
    assert feed(rule, [0.3, 0.29, 0.31, 0.30, 0.32, 0.31], metric="val_pgd_acc") is None
    strict = PlateauRule("val_pgd_acc", patience=2, min_delta=0.05)
    assert feed(strict, [0.3, 0.31, 0.32], metric="val_pgd_acc") == 3


def test_plateau_rule_min_mode():
    rule = PlateauRule("val_loss", mode="min", patience=2)
    assert feed(rule, [1.0, 0.8, 0.9, 0.85], metric="val_loss") == 4
    with pytest.raises(ValueError):
        PlateauRule(mode="up")


def test_build_stopper_maps_the_config():
    from scoretune.config import build_config

    assert build_stopper(None) is None
    assert build_stopper({"rule": "none"}) is None
    rule = build_stopper({"rule": "floor", "floor": 0.05, "patience": 3})
    assert isinstance(rule, FloorRule) and rule.floor == 0.05 and rule.patience == 3
    cfg = build_config({"early_stop": {"rule": "floor", "floor": 0.1}})
    from_cfg = build_stopper(cfg.early_stop)
    assert isinstance(from_cfg, FloorRule) and from_cfg.floor == 0.1 and from_cfg.patience == 2
    assert build_stopper(build_config({}).early_stop) is None
    with pytest.raises(ValueError, match="floor"):
        build_stopper({"rule": "floor"})


# ----------------------------------------------------------------------------- the Ray Tune adapter


def test_tune_floor_stopper_keeps_one_rule_per_trial_and_records_reasons():
    from ray.tune import Stopper

    from trainables.stoppers import FloorStopper

    stopper = FloorStopper(floor=FLOOR, patience=2)
    assert isinstance(stopper, Stopper)
    a = [0.5, 0.02, 0.01, 0.01]  # trial a: below from epoch 2, stops at 3
    b = [0.5, 0.02, 0.05, 0.02]  # trial b: rises at epoch 3, never 2 in a row
    decisions = {"a": [], "b": []}
    for epoch in range(4):
        for tid, curve in (("a", a), ("b", b)):
            decisions[tid].append(stopper(tid, {"epoch": epoch + 1, "train_r_madry": curve[epoch],
                                                "training_iteration": epoch + 1}))
    assert decisions["a"] == [False, False, True, True]
    assert decisions["b"] == [False, False, False, False]
    assert stopper.stop_all() is False
    assert set(stopper.stops) == {"a"}
    assert stopper.stops["a"].reason == "floor: train_r_madry below (C^l1)^2/2=0.03 for 2 epochs since epoch 2"
    assert stopper.stops["a"].epoch == 3
    assert (stopper.stops["a"].kind, stopper.stops["a"].value, stopper.stops["a"].floor) == ("floor", a[2], 0.03)


def test_tune_rule_stopper_with_any_rule_and_pickles():
    import functools

    from trainables.stoppers import FloorStopper, RuleStopper

    stopper = RuleStopper(functools.partial(PlateauRule, "val_pgd_acc", "max", 2))
    for i, acc in enumerate([0.5, 0.4, 0.3], 1):
        stop = stopper("t1", {"training_iteration": i, "val_pgd_acc": acc})
    assert stop and stopper.stops["t1"].reason.startswith("plateau:") and stopper.stops["t1"].kind == "plateau"
    assert stopper("t2", {"training_iteration": 1, "val_pgd_acc": 0.1}) is False
    clone = pickle.loads(pickle.dumps(FloorStopper(0.1, 3)))
    assert clone.floor == 0.1 and clone.patience == 3 and clone("x", {"train_r_madry": 0.0}) is False
    with pytest.raises(ValueError):
        FloorStopper(floor=-1)


# ----------------------------------------------------------------------------- `scoretune train --early-stop floor`


def test_train_early_stop_floor_stops_early(tmp_path, capsys, one_thread):
    from scoretune.cli import main
    from scoretune.engine import load_checkpoint

    rc = main(["train", DIGITS_CONFIG, "--set", "epochs=4", "--set", "attack.steps=1", "--set", "batch_size=128",
               "--set", "eval.pgd_steps=1", "--set", "eval.test=false", "--set", f"output_dir={tmp_path}", "--set", "name=es",
               "--no-mlflow", "--early-stop", "floor", "--floor", "100", "--patience", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "early stop after epoch 1: floor: train_r_madry below (C^l1)^2/2=100 for 1 epochs since epoch 1" in out
    assert load_checkpoint(tmp_path / "es" / "last.pt")["epoch"] == 1


def test_train_floor_without_a_value_is_a_one_line_error(capsys):
    from scoretune.cli import main

    rc = main(["train", DIGITS_CONFIG, "--early-stop", "floor", "--no-mlflow"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "early_stop.floor" in err


def test_train_floor_auto_flag_is_accepted_and_bad_values_are_one_line_errors(capsys):
    from scoretune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", DIGITS_CONFIG, "--early-stop", "floor", "--floor", "soon", "--no-mlflow"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--floor" in err and "'auto'" in err


def test_floor_rule_on_a_metric_that_is_not_measured_is_refused():
    from scoretune.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["early_stop.rule=floor", "early_stop.floor=0.1", "eval.pgd_steps=0"])
    assert "early_stop.metric" in str(e.value) and "eval.pgd_steps" in str(e.value)


def test_build_stopper_refuses_an_unresolved_auto_floor():
    with pytest.raises(ValueError, match="early_stop.floor: 'auto'"):
        build_stopper({"rule": "floor", "floor": "auto"})


# ----------------------------------------------------------------------------- the floor refined from the best model


def rows(accs, cs, losses):
    """Epoch rows with val_pgd_acc, val_c_l1 (None: not measured) and train_r_madry."""
    out = []
    for epoch, (acc, c, loss) in enumerate(zip(accs, cs, losses), start=1):
        row = {"epoch": epoch, "val_pgd_acc": acc, "train_r_madry": loss}
        if c is not None:
            row["val_c_l1"] = c
        out.append(row)
    return out


def test_refiner_takes_c_l1_of_the_best_model_so_far_and_never_rises_above_the_start():
    from scoretune.stopping import FloorRefiner

    refiner = FloorRefiner(0.2)
    floors = [refiner.observe(r) for r in rows(
        accs=[0.5, 0.7, 0.6, 0.8, 0.75, 0.8],
        cs=[0.9, 0.6, 0.1, 0.5, 0.05, 0.01],
        losses=[1.0] * 6)]
    # epoch 1: 0.9^2/2 = 0.405 > 0.2 keeps 0.2; epochs 3, 5 and 6 do not improve val_pgd_acc (6 only ties)
    assert floors == pytest.approx([0.2, 0.18, 0.18, 0.125, 0.125, 0.125])
    assert refiner.epoch == 4 and refiner.c_l1 == 0.5 and refiner.best == 0.8
    assert "C^l1 0.5 of the model of best val_pgd_acc 0.8, epoch 4; started at 0.2" in refiner.describe()


def test_refiner_ignores_rows_without_a_finite_c_l1():
    from scoretune.stopping import FloorRefiner

    refiner = FloorRefiner(0.2)
    for r in rows(accs=[0.5, 0.9, 0.95], cs=[0.4, None, float("nan")], losses=[1.0] * 3):
        refiner.observe(r)
    assert refiner.floor == pytest.approx(0.08) and refiner.epoch == 1


def test_refined_floor_rule_waits_for_the_lower_floor_of_the_best_model():
    # the proxy's floor 0.2 is crossed at epoch 3; the best model's C^l1 0.4 puts the floor at 0.08
    data = rows(accs=[0.5, 0.8, 0.79, 0.78, 0.77, 0.76, 0.75],
                cs=[0.2, 0.4, None, None, None, None, None],
                losses=[1.0, 0.3, 0.15, 0.12, 0.07, 0.06, 0.05])
    assert feed_rows(FloorRule(0.2, patience=2), data) == 4
    refined = FloorRule(0.2, patience=2, refine=True)
    assert feed_rows(refined, data) == 6
    assert refined.stopped_floor == pytest.approx(0.08)
    assert refined.reason.startswith("floor: train_r_madry below (C^l1)^2/2=0.08 (C^l1 0.4 of the model of best "
                                     "val_pgd_acc 0.8, epoch 2; started at 0.2) for 2 epochs since epoch 5")


def feed_rows(rule, data):
    for row in data:
        if rule.should_stop(row):
            return int(row["epoch"])
    return None


def test_build_stopper_passes_refine():
    rule = build_stopper({"rule": "floor", "floor": 0.05, "refine": True})
    assert rule.refiner is not None and rule.refiner.base == 0.05
    assert build_stopper({"rule": "floor", "floor": 0.05}).refiner is None


def test_tune_floor_stopper_refines_every_trial_from_the_best_trial_so_far():
    from trainables.stoppers import FloorStopper

    stopper = FloorStopper(floor=0.2, patience=1, refine=True)
    # trial a is the better one (val PGD 0.9) and its model's C^l1 is 0.3: the floor of both is 0.045
    assert stopper("a", {"epoch": 1, "val_pgd_acc": 0.9, "val_c_l1": 0.3, "train_r_madry": 0.5}) is False
    assert stopper("b", {"epoch": 1, "val_pgd_acc": 0.6, "val_c_l1": 0.5, "train_r_madry": 0.1}) is False
    assert stopper("b", {"epoch": 2, "val_pgd_acc": 0.6, "train_r_madry": 0.04}) is True
    assert stopper.stops["b"].floor == pytest.approx(0.045)
    assert stopper.rule("a").refiner is stopper.rule("b").refiner
    clone = pickle.loads(pickle.dumps(stopper))
    assert clone.rule("a").refiner is clone.rule("b").refiner is clone.refiner
    assert clone.refiner.floor == pytest.approx(0.045)


def test_refine_without_a_validation_split_is_refused():
    from scoretune.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["early_stop.refine=true", "data.val_size=0"])
    assert "early_stop.refine" in str(e.value) and "data.val_size" in str(e.value)
