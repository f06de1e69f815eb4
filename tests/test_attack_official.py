"""The training attack as the official SCORE code runs it (P2333/SCORE, without_DDPM/train_cifar.py).

PGD-AT (``attack_pgd_divergence``) attacks while the model is in train mode: BatchNorm normalises
with batch statistics and every attack forward updates the running statistics; it attacks toward
the plain one-hot (label smoothing enters the loss only). TRADES attacks in eval mode. These are
scoretune's defaults (``attack.bn: auto``, ``attack.target: auto``); the old behaviour (eval mode,
smoothed target) is one setting away.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ATTACK, OBJECTIVES, fixed_batch, reference_step, seeded_model, sgd  # noqa: E402
from scoretune.attacks import AttackConfig, bn_mode, resolve_attack_mode, training_attack  # noqa: E402
from scoretune.config import AttackSettings, ConfigError, build_config  # noqa: E402
from scoretune.engine import train_step  # noqa: E402
from scoretune.losses import Objective  # noqa: E402
from scoretune.models import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EPS, ALPHA, STEPS = 0.1, 0.025, 10
LO, HI = 0.0, 1.0


# ----------------------------------------------------------------------------- the official algorithm


def _official_distance(output: torch.Tensor, target: torch.Tensor, divergence: str) -> torch.Tensor:
    """``distance_func`` of the official code for the divergences tested here (output, target: rows sum to 1)."""
    if divergence == "LSE":
        return ((output - target) ** 2).sum(dim=-1)
    if divergence == "KL":
        return F.kl_div(output.log(), target, reduction="none").sum(dim=-1)
    return torch.norm(output - target, dim=-1, p=float(divergence))  # '1': the l1 distance


def official_attack_pgd_divergence(model, X, y, delta0, *, epsilon, alpha, attack_iters, divergence, num_classes):
    """``attack_pgd_divergence`` (linf, one restart) written independently from the official description:
    the model is called as it is (train mode in the official training loop), the parameters keep
    requiring gradients, the attack target is ``one_hot(y)``, the gradient is that of the batch-mean
    loss via ``backward()``, and delta is clipped to the eps-ball and then to ``[lo - X, hi - X]``.
    ``delta0`` is the uniform start (the official code draws it with ``delta.uniform_(-eps, eps)``).
    Returns ``clamp(X + delta, lo, hi)``, the point the official loop trains on."""
    onehot = F.one_hot(y, num_classes=num_classes)
    delta = torch.min(torch.max(delta0.clone(), LO - X), HI - X)
    delta.requires_grad = True
    for _ in range(attack_iters):
        output = F.softmax(model(X + delta), dim=1)
        loss = _official_distance(output, onehot.to(output.dtype), divergence)
        loss.mean().backward()
        grad = delta.grad.detach()
        delta.data = torch.clamp(delta + alpha * torch.sign(grad), min=-epsilon, max=epsilon)
        delta.data = torch.min(torch.max(delta, LO - X), HI - X)
        delta.grad.zero_()
    model.zero_grad(set_to_none=True)
    return torch.clamp(X + delta.detach(), min=LO, max=HI)


@pytest.fixture(scope="module")
def float64_setup():
    """A float64 small CNN (with BatchNorm) in train mode and a fixed batch of 8x8 images."""
    torch.manual_seed(0)
    net = build_model("small_cnn", input_shape=(1, 8, 8), num_classes=10).double().train()
    g = torch.Generator().manual_seed(5)
    x = torch.rand((48, 1, 8, 8), generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (48,), generator=g)
    return net, x, y


def _bn_buffers(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("loss,official_name", [("se", "LSE"), ("kl", "KL"), ("l1", "1")])
def test_default_pgdat_attack_equals_the_official_algorithm_in_float64(float64_setup, loss, official_name):
    """Same weights, batch and start point: x_adv and the BatchNorm running statistics after the attack
    agree to 1e-12 (label smoothing 0.1 in the objective: the default attack target ignores it)."""
    base, x, y = float64_setup
    cfg = AttackConfig(eps=EPS, steps=STEPS, step_size=ALPHA)
    objective = Objective(method="pgdat", loss=loss, label_smoothing=0.1)

    ours_net = copy.deepcopy(base)
    ours = training_attack(ours_net, x, y, objective, cfg, generator=torch.Generator().manual_seed(7))
    # the engine's start: one uniform draw in [0, 1) scaled to [-eps, eps)
    delta0 = (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype) - 1) * EPS
    official_net = copy.deepcopy(base)
    official = official_attack_pgd_divergence(official_net, x, y, delta0, epsilon=EPS, alpha=ALPHA,
                                              attack_iters=STEPS, divergence=official_name, num_classes=10)

    assert ours.dtype == torch.float64
    assert (ours - x).abs().max().item() > 0.5 * EPS  # the attack moved
    assert (ours - official).abs().max().item() <= 1e-12
    ours_bn, official_bn = _bn_buffers(ours_net), _bn_buffers(official_net)
    for k, v in official_bn.items():
        assert (ours_bn[k].double() - v.double()).abs().max().item() <= 1e-12, k
    assert ours_net.training


def test_the_old_eval_mode_attack_is_not_the_official_one(float64_setup):
    """The float64 comparison has teeth: the pre-setting behaviour (eval mode) lands elsewhere."""
    base, x, y = float64_setup
    objective = Objective(method="pgdat", loss="se")
    new = training_attack(copy.deepcopy(base), x, y, objective, AttackConfig(eps=EPS, steps=STEPS, step_size=ALPHA),
                          generator=torch.Generator().manual_seed(7))
    old = training_attack(copy.deepcopy(base), x, y, objective,
                          AttackConfig(eps=EPS, steps=STEPS, step_size=ALPHA, bn="eval", target="smoothed"),
                          generator=torch.Generator().manual_seed(7))
    assert (new != old).double().mean().item() > 0.1


# ----------------------------------------------------------------------------- BatchNorm modes


@pytest.mark.parametrize("bn,changes", [("train", True), ("eval", False), ("train_frozen", False)])
def test_running_statistics_change_during_a_pgdat_attack_only_with_bn_train(float64_setup, bn, changes):
    base, x, y = float64_setup
    net = copy.deepcopy(base)
    bn_layers = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn_layers, "the model must have BatchNorm for this test to mean anything"
    before = _bn_buffers(net)
    training_attack(net, x, y, Objective(method="pgdat", loss="se"), AttackConfig(eps=EPS, steps=5, bn=bn),
                    generator=torch.Generator().manual_seed(1))
    after = _bn_buffers(net)
    running = [k for k in before if "running" in k]
    if changes:
        assert all(not torch.equal(before[k], after[k]) for k in running)
        assert all(int(after[k]) == int(before[k]) + 5 for k in before if "num_batches" in k)  # one per step
    else:
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training and all(m.track_running_stats for m in bn_layers)


def test_train_frozen_uses_batch_statistics_like_train(float64_setup):
    """train_frozen normalises with batch statistics (the same x_adv as train, whose running-statistics
    updates do not feed back into train-mode forwards), which eval mode does not."""
    base, x, y = float64_setup
    objective = Objective(method="pgdat", loss="se")

    def attack(bn):
        return training_attack(copy.deepcopy(base), x, y, objective, AttackConfig(eps=EPS, steps=5, bn=bn),
                               generator=torch.Generator().manual_seed(1))

    frozen, train, evald = attack("train_frozen"), attack("train"), attack("eval")
    assert torch.equal(frozen, train)
    assert not torch.equal(frozen, evald)


def test_bn_mode_restores_modes_and_tracking_after_an_error():
    net = build_model("small_cnn", input_shape=(1, 8, 8), num_classes=10).eval()
    with pytest.raises(RuntimeError, match="boom"):
        with bn_mode(net, "train_frozen"):
            assert net.training and not any(
                m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
            raise RuntimeError("boom")
    assert not any(m.training for m in net.modules())
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


# ----------------------------------------------------------------------------- the attack target


def _pgdat(base, x, y, smoothing, target="auto"):
    return training_attack(copy.deepcopy(base), x, y, Objective(method="pgdat", loss="se", label_smoothing=smoothing),
                           AttackConfig(eps=EPS, steps=STEPS, step_size=ALPHA, target=target),
                           generator=torch.Generator().manual_seed(3))


def test_label_smoothing_does_not_change_the_default_attack_target(float64_setup):
    base, x, y = float64_setup
    assert torch.equal(_pgdat(base, x, y, 0.0), _pgdat(base, x, y, 0.2))


def test_the_smoothed_target_follows_label_smoothing(float64_setup):
    base, x, y = float64_setup
    plain, smoothed = _pgdat(base, x, y, 0.0, "smoothed"), _pgdat(base, x, y, 0.2, "smoothed")
    assert torch.equal(plain, _pgdat(base, x, y, 0.0))  # no smoothing: the same target
    assert (plain != smoothed).double().mean().item() > 0.05


# ----------------------------------------------------------------------------- settings


def test_defaults_follow_the_official_code_per_objective():
    assert resolve_attack_mode("pgdat") == ("train", "onehot")
    assert resolve_attack_mode("trades") == ("eval", "onehot")
    assert resolve_attack_mode("pgdat", "eval", "smoothed") == ("eval", "smoothed")
    settings = AttackSettings()
    assert (settings.bn, settings.target) == ("auto", "auto")
    assert settings.resolved("pgdat") == ("train", "onehot")
    built = build_config({"attack": {"bn": "train_frozen", "target": "smoothed"}}).attack.build((0.0, 1.0))
    assert (built.bn, built.target) == ("train_frozen", "smoothed")


@pytest.mark.parametrize("key,value,allowed", [("bn", "batch", "'auto', 'eval', 'train' or 'train_frozen'"),
                                               ("target", "soft", "'auto', 'onehot' or 'smoothed'")])
def test_an_unknown_attack_mode_names_the_key_and_the_choices(key, value, allowed):
    with pytest.raises(ConfigError, match=f"attack.{key}") as info:
        build_config({"attack": {key: value}})
    assert "\n" not in str(info.value).strip()
    for choice in allowed.replace("'", "").replace(" or ", ", ").split(", "):
        assert choice in str(info.value)


def test_attack_config_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="unknown attack bn mode 'batch'"):
        AttackConfig(eps=0.1, bn="batch")
    with pytest.raises(ValueError, match="unknown attack target 'soft'"):
        AttackConfig(eps=0.1, target="soft")


# ----------------------------------------------------------------------------- the benchmark reference


def test_the_step_reference_notices_the_old_eval_mode_attack():
    """benchmarks/step_throughput.py's equality check (fp32, 1e-5) fails for the old PGD-AT attack."""
    base, batch = seeded_model("small_cnn", seed=0), fixed_batch(16, seed=3)
    objective = OBJECTIVES["pgdat_se"]
    ref_model = copy.deepcopy(base)
    ref = reference_step(ref_model, *batch, objective, ATTACK, sgd(ref_model), torch.Generator().manual_seed(1))
    losses = {}
    for name, attack in (("new", ATTACK), ("old", AttackConfig(**{**ATTACK.__dict__, "bn": "eval", "target": "smoothed"}))):
        model = copy.deepcopy(base)
        terms, _, _ = train_step(model, *batch, objective, attack, sgd(model), device=torch.device("cpu"), amp="off",
                                 generator=torch.Generator().manual_seed(1))
        losses[name] = float(terms["loss"].mean())
    assert losses["new"] == pytest.approx(ref["loss"], abs=1e-5)
    assert abs(losses["old"] - ref["loss"]) > 1e-5


# ----------------------------------------------------------------------------- training with the defaults

DIGITS_PGDAT_SE = {
    "data": {"name": "digits"},
    "model": {"name": "small_cnn"},
    "objective": {"method": "pgdat", "loss": "se"},
    "attack": {"eps": 0.2, "steps": 10},
    "eval": {"pgd_steps": 20, "test": False, "max_samples": 64},
    "optim": {"lr": 0.2},
    "epochs": 10,
    "batch_size": 64,
}


def test_resuming_a_default_pgdat_run_reproduces_it_exactly(tmp_path):
    """The running statistics the attack updates are in the checkpoint: a resumed run matches bit for bit."""
    from resume_check import assert_same_weights, straight_and_resumed

    cfg = build_config({**DIGITS_PGDAT_SE, "epochs": 2, "attack": {"eps": 0.2, "steps": 2},
                        "eval": {"pgd_steps": 2, "test": False, "max_samples": 32}})
    straight, resumed = straight_and_resumed(cfg, tmp_path / "ckpt.pt", 2)
    resumed.train_one_epoch()
    assert_same_weights(straight.net, resumed.net)


@pytest.mark.slow
def test_pgdat_se_with_the_official_attack_on_digits_beats_85_clean_and_35_pgd20():
    """The engine tests' accuracy bar (tests/test_engine.py, TRADES-SE), for PGD-AT-SE with the default attack
    (bn train, one-hot target). Slow: ten training epochs (about 6 s each on one free core)."""
    from scoretune.engine import Trainer, evaluate_loader

    cfg = build_config(DIGITS_PGDAT_SE)
    assert cfg.attack.resolved(cfg.objective.method) == ("train", "onehot")
    trainer = Trainer(cfg)
    for _ in range(cfg.epochs):
        trainer.train_one_epoch()
    metrics = evaluate_loader(trainer.eval_model, trainer.test_loader, trainer.eval_attack, device=trainer.device,
                       prefix="test", generator=torch.Generator().manual_seed(0))
    assert metrics["test_clean_acc"] > 0.85
    assert metrics["test_pgd_acc"] > 0.35
