"""attack.eps_warmup_epochs: a linear eps ramp of the training attack (the evaluation attack keeps eps)."""

import pytest
from scoretune import engine
from scoretune.attacks import AttackConfig
from scoretune.config import ConfigError, build_config
from scoretune.engine import Trainer, eps_ramp_factor, ramped_attack


def test_the_factor_ramps_linearly_per_epoch_then_stays_at_one():
    assert [eps_ramp_factor(e, 4) for e in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert [eps_ramp_factor(e, 2.5) for e in range(3)] == pytest.approx([0.4, 0.8, 1.0])
    assert eps_ramp_factor(0, 0) == 1.0


def test_a_ramped_attack_scales_eps_and_an_explicit_step_size():
    a = AttackConfig(eps=0.3, steps=5, step_size=0.1)
    half = ramped_attack(a, 0.5)
    assert (half.eps, half.step_size, half.steps) == pytest.approx((0.15, 0.05, 5))
    default = ramped_attack(AttackConfig(eps=0.3, steps=5), 0.5)
    assert default.alpha == pytest.approx(2.5 * 0.15 / 5)
    assert ramped_attack(a, 1.0) is a


def test_negative_warmup_is_refused():
    with pytest.raises(ConfigError, match="attack.eps_warmup_epochs"):
        build_config({"attack": {"eps_warmup_epochs": -1}})


def test_the_trainer_trains_each_epoch_at_the_ramped_eps_and_evaluates_at_full_eps(monkeypatch):
    cfg = build_config({"data": {"name": "digits"}, "model": {"name": "small_cnn"}, "epochs": 4, "batch_size": 64,
                        "attack": {"eps": 0.2, "steps": 2, "eps_warmup_epochs": 2},
                        "eval": {"pgd_steps": 1, "test": False, "max_samples": 16},
                        "early_stop": {"probe_fraction": 0.0}})
    seen = []
    monkeypatch.setattr(engine, "train_epoch",
                        lambda model, loader, objective, attack, *a, **k: seen.append(attack) or {})
    trainer = Trainer(cfg)
    for _ in range(3):
        trainer.train_one_epoch()
    assert [a.eps for a in seen] == pytest.approx([0.1, 0.2, 0.2])
    assert trainer.eval_attack.eps == pytest.approx(0.2)
