"""Every numeric config field finite and in range, every error one line naming the field.

One test per hole that used to be accepted and failed later (or never), then a property test
that throws random values at every field of ``build_config`` (as a mapping and as ``--set``
strings): each case validates or raises a one-line :class:`ConfigError` naming a field.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scoretune.config import ConfigError, ExperimentConfig, build_config, flatten, parse_overrides, set_dotted


def _error(overrides, raw=None):
    with pytest.raises(ConfigError) as e:
        build_config(raw or {}, overrides)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    return msg


# ----------------------------------------------------------------------------- the holes, one test each


def test_infinite_lr_is_refused_naming_optim_lr():
    assert "optim.lr: must be finite (got inf)" in _error(["optim.lr=.inf"])


def test_infinite_beta_is_refused_naming_objective_beta_not_the_lr():
    msg = _error(["objective.beta=.inf"])
    assert "objective.beta: must be finite (got inf)" in msg and "optim.lr" not in msg


def test_infinite_l2_eps_is_refused():
    assert "attack.eps: must be finite (got inf)" in _error(["attack.eps=.inf", "attack.norm=l2"])


@pytest.mark.parametrize("field", ["optim.gamma", "objective.clip", "optim.warmup_epochs"])
def test_infinite_gamma_clip_warmup_are_refused(field):
    assert f"{field}: must be finite (got inf)" in _error([f"{field}=.inf"])


def test_nan_milestone_is_refused_naming_its_index():
    assert "optim.milestones.0: must be finite (got nan)" in _error(["optim.milestones=[.nan]"])


@pytest.mark.parametrize("bad", ["[0.0]", "[1.0]", "[0.5, 2]", "[-0.1]"])
def test_milestones_are_fractions_of_the_schedule(bad):
    # engine.lr_factor multiplies by gamma once progress in [0, 1) reaches a milestone
    assert "optim.milestones: each milestone is a fraction of the schedule in (0, 1)" in _error(
        [f"optim.milestones={bad}"])


def test_gamma_above_one_is_refused():
    assert "optim.gamma: Input should be less than or equal to 1" in _error(["optim.gamma=2"])


@pytest.mark.parametrize("field", ["epochs", "batch_size", "attack.steps", "eval.pgd_steps", "scaling.workers"])
def test_a_boolean_is_not_an_int(field):
    assert f"{field}: must be a number, not true/false (got True)" in _error([f"{field}=true"])


def test_a_boolean_is_not_a_float():
    assert "objective.beta: must be a number, not true/false" in _error(["objective.beta=true"])


def test_the_name_follows_the_one_naming_rule():
    msg = _error(["name=../escape"])
    assert msg.startswith("config: name: '../escape' is not allowed: use ASCII letters")
    assert build_config({"name": "cifar10-trades_se.v2"}).name == "cifar10-trades_se.v2"


def test_l2_eps_larger_than_the_pixel_box_is_refused_when_the_data_is_known():
    from scoretune.engine import Trainer

    raw = {"data": {"name": "digits"}, "model": {"name": "mlp"}, "device": "cpu", "attack": {"norm": "l2", "eps": 2.0}}
    with pytest.raises(ConfigError, match=r"attack\.eps: 9 is larger than the l2 diameter 8 "):
        build_config(raw, ["attack.eps=9"])  # digits: 8x8 in [0,1], l2 diameter 8 (its registered shape)
    cfg = build_config(raw)
    assert Trainer(cfg).train_attack.eps == 2.0
    # and once the data is loaded (a dataset registered without its shape is checked only there)
    unchecked = cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"eps": 9.0})})
    with pytest.raises(ConfigError, match=r"attack\.eps: 9 is larger than the l2 diameter 8 "):
        Trainer(unchecked)


def test_batch_size_must_split_over_the_workers_at_validation():
    msg = _error(["batch_size=63", "scaling.workers=2"])
    assert "batch_size 63 is not divisible by 2 workers (scaling.workers)" in msg
    assert build_config({}, ["batch_size=64", "scaling.workers=2"]).scaling.workers == 2


def test_rules_between_fields_name_the_field_they_blame():
    assert "data.ddpm_fraction: > 0 needs data.ddpm_path" in _error(["data.ddpm_fraction=0.5"])
    assert "objective.clip: clip_mode 'smoothing' takes a clip value c in [0, 1) (got 1.0)" in _error(
        ["objective.clip_mode=smoothing", "objective.clip=1.0"])
    assert _error(["early_stop.rule=floor"]).startswith("config: early_stop.floor: rule 'floor' needs")


def test_malformed_set_value_is_a_config_error():
    with pytest.raises(ConfigError, match=r"--set optim.milestones: malformed value"):
        parse_overrides(["optim.milestones=[0.5,"])
    with pytest.raises(ConfigError, match="--set 'optim..lr'"):
        parse_overrides(["optim..lr=1"])


def test_bound_eps_is_checked_against_the_data_pixel_range(tmp_path, capsys, one_thread):
    from scoretune.cli import main
    from scoretune.engine import Trainer

    cfg = build_config({"name": "proxy", "data": {"name": "digits"}, "model": {"name": "mlp"},
                        "output_dir": str(tmp_path), "device": "cpu"})
    ckpt = Trainer(cfg).save(tmp_path / "proxy.pt")
    common = ["--data", "digits", "--proxy", str(ckpt), "--n", "8", "--restarts", "1", "--steps", "1", "--no-mlflow"]
    assert main(["bound", "--eps", "5", *common]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "--eps: 5 is out of range for linf on [0,1] pixel data" in err[0]
    assert "C^D on" not in captured.out  # refused before any estimate
    assert main(["bound", "--eps", "9", "--norm", "l2", *common]) == 2
    assert "--eps: 9 is larger than the l2 diameter 8" in capsys.readouterr().err


def test_toy_eps_stays_unbounded_but_finite():
    assert build_config({"data": {"name": "toy"}, "model": {"name": "toy_mlp"}, "attack": {"eps": 3.0}}).attack.eps == 3
    assert "attack.eps: must be finite" in _error(["attack.eps=.inf"], {"data": {"name": "toy"}})


def test_inner_max_and_attack_config_refuse_a_non_finite_eps():
    from scoretune.attacks import AttackConfig
    from scoretune.bounds import InnerMax

    for bad in (math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="eps must be"):
            AttackConfig(eps=bad)
        with pytest.raises(ValueError, match="eps must be"):
            InnerMax(eps=bad)


# ----------------------------------------------------------------------------- the config builds the runtime objects


def test_config_builds_the_objective_and_both_attacks():
    from scoretune.attacks import AttackConfig
    from scoretune.losses import Objective

    cfg = build_config({"objective": {"method": "pgdat", "loss": "kl", "beta": 2.0, "label_smoothing": 0.1},
                        "attack": {"eps": 0.1, "steps": 7, "step_size": 0.02}, "eval": {"pgd_steps": 20}})
    assert cfg.objective.build() == Objective(method="pgdat", loss="kl", beta=2.0, label_smoothing=0.1)
    assert cfg.attack.build((0.0, 1.0)) == AttackConfig(eps=0.1, steps=7, step_size=0.02, pixel_range=(0.0, 1.0))
    # the eval attack keeps the step size only for the same number of steps
    assert cfg.eval_attack(None) == AttackConfig(eps=0.1, steps=20, step_size=None, pixel_range=None)
    same = build_config({"attack": {"eps": 0.1, "steps": 20, "step_size": 0.02}, "eval": {"pgd_steps": 20}})
    assert same.eval_attack((0.0, 1.0)).step_size == 0.02
    assert build_config({"eval": {"pgd_steps": 0}}).eval_attack((0.0, 1.0)) is None


# ----------------------------------------------------------------------------- the property test

FIELDS = sorted(flatten(ExperimentConfig().model_dump())) + ["data.options.x", "model.options.width"]
SECTIONS = sorted(ExperimentConfig.model_fields)
ALL_KEYS = FIELDS + SECTIONS

WEIRD = ["../", "../../etc/passwd", "a/../b", "..", ".", "", " ", "ü", "名前", "\n", "a\u2028b", "inf", "-inf", "nan",
         "-1", "1e309", "true", "cuda:x", "cuda:0", "toy", "digits", "l2", "linf", "floor", "smoothing", "value",
         "pgdat", "kl", "sgd", "piecewise", "mlp", "2020-13-45"]

VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, 1, 2, 3, 63, 64, 2**32, -1, 0.5, 0.999, 1.0, 1.5, 8 / 255]),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.sampled_from(WEIRD),
    st.lists(st.one_of(st.floats(allow_nan=True), st.integers(-3, 3), st.booleans()), max_size=3),
    st.dictionaries(st.sampled_from(["x", "beta", "eps", "name", "1"]), st.integers(-2, 2), max_size=2),
)

DEFAULTS = ExperimentConfig().flat()

NUMERIC = {k for k, v in DEFAULTS.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} | {
    "attack.step_size", "eval.max_samples", "early_stop.floor", "scaling.gpus_per_worker", "scaling.num_to_keep",
    "ema_decay"}

SETTINGS = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _must_fail(raw: dict) -> bool:
    """A boolean or a non-finite number at a numeric field (or in the milestones) is never valid."""
    for key, value in flatten(raw).items():
        items = value if key == "optim.milestones" and isinstance(value, list) else [value]
        numeric = key in NUMERIC or key == "optim.milestones"
        if numeric and any(isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)) for v in items):
            return True
    return False


def _check(call, touched: list[str], must_fail: bool = False) -> None:
    try:
        cfg = call()
    except ConfigError as e:
        msg = str(e)
        assert len(msg.splitlines()) == 1 and msg.strip(), repr(msg)
        # names a field: the section (or top-level field) of one of the keys that were set
        assert any(k.split(".")[0] in msg for k in touched), (msg, touched)
        return
    assert isinstance(cfg, ExperimentConfig)
    assert not must_fail, "a boolean or a non-finite number was accepted"
    # what validates is usable: every number finite, an int field never a boolean
    for key, value in cfg.flat().items():
        if key.startswith(("data.options", "model.options")):
            continue
        for v in value if isinstance(value, list) else [value]:
            assert not (isinstance(v, float) and not math.isfinite(v)), (key, value)
        default = DEFAULTS.get(key)
        if isinstance(default, int) and not isinstance(default, bool) and value is not None:  # None: an Optional
            assert isinstance(value, int) and not isinstance(value, bool), (key, value)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(ALL_KEYS), VALUES), min_size=1, max_size=3))
def test_random_values_at_every_field_validate_or_name_the_field(pairs):
    raw: dict = {}
    for key, value in pairs:
        set_dotted(raw, key, value)
    _check(lambda: build_config(raw), [k for k, _ in pairs], _must_fail(raw))


KEYS = st.one_of(st.sampled_from(ALL_KEYS), st.sampled_from(["", ".", "objective.", "objective..beta", "beta.x",
                                                             "objective.beta.x", "unknown", "名前"]))
TEXTS = st.one_of(st.text(max_size=12), st.sampled_from(WEIRD + ["[0.5,", "{a: 1", "[.nan]", ".inf", "[1, 2]", "!!python/x",
                                                                 "*a", "&a b", "'", '"', "- 1", "a: b: c", "%"]),
                  VALUES.map(repr))


@SETTINGS
@given(st.lists(st.tuples(KEYS, TEXTS), min_size=1, max_size=3))
def test_random_set_strings_validate_or_name_the_field(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    _check(lambda: build_config({}, overrides), [k or "--set" for k, _ in pairs] + ["--set"])


@pytest.mark.parametrize("value", [False, True])
def test_a_boolean_for_a_number_or_keyword_field_names_the_field(value):
    """``early_stop.floor`` takes a number or 'auto': ``false`` is neither (found by the property test)."""
    with pytest.raises(ConfigError, match=r"early_stop\.floor"):
        build_config({"early_stop": {"rule": "floor", "floor": value}})
