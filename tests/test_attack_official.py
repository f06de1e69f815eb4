"""The training attack as the official SCORE code runs it (P2333/SCORE, without_DDPM/train_cifar.py,
and core/utils/trades.py's ``trades_loss_LSE``, the TRADES pipeline of the paper's Tables 3-4).

PGD-AT (``attack_pgd_divergence``) attacks while the model is in train mode: BatchNorm normalises
with batch statistics and every attack forward updates the running statistics; it attacks toward
the plain one-hot (label smoothing enters the loss only). TRADES attacks in eval mode. These are
scoretune's defaults (``attack.bn: auto``, ``attack.target: auto``); the old behaviour (eval mode,
smoothed target) is one setting away. ``trades_loss_LSE`` attacks with batch statistics, running
statistics frozen, from a uniform start in the eps-ball: ``attack.bn: train_frozen, attack.start: uniform``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from scoretune.attacks import AttackConfig, bn_mode, resolve_attack_mode, resolve_start, training_attack
from scoretune.config import AttackSettings, ConfigError, build_config
from scoretune.engine import train_step
from scoretune.losses import Objective
from scoretune.models import build_model

from benchmarks._common import ATTACK, OBJECTIVES, fixed_batch, reference_step, seeded_model, sgd

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


def official_trades_loss_lse(model, x_natural, y, delta0, optimizer, *, epsilon, step_size, perturb_steps, beta,
                             label_smoothing, clip_value, num_classes):
    """One training step of ``trades_loss_LSE`` (linf) written independently from the official description:
    the model in train mode with ``track_running_stats`` off on every BatchNorm (batch statistics, running
    statistics untouched) for the attack; the start ``clamp(x + delta0, 0, 1)`` (the official code draws
    ``delta0`` with ``uniform_(-epsilon, epsilon)``); ``perturb_steps`` signed steps on
    ``sum((softmax(model(x_adv)) - p_natural)^2)`` with ``p_natural = softmax(model(x_natural))`` detached,
    each projected with min/max onto the eps-ball and clamped to [0, 1]; then, tracking statistics again,
    ``mean(SE(softmax(model(x)), smoothed onehot)) + beta mean(relu(SE(softmax(model(x_adv)),
    softmax(model(x))) - clip_value))``, backward and ``optimizer.step()``. Returns (loss, natural mean,
    robust mean, x_adv)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.train()
    for m in bns:
        m.track_running_stats = False
    x_adv = torch.clamp(x_natural.detach() + delta0, 0.0, 1.0)
    p_natural = F.softmax(model(x_natural), dim=1).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        output_adv = F.softmax(model(x_adv), dim=1)
        loss_lse = torch.sum((output_adv - p_natural) ** 2)
        grad = torch.autograd.grad(loss_lse, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    for m in bns:
        m.track_running_stats = True
    optimizer.zero_grad()
    y_onehot = ((1 - num_classes * label_smoothing / (num_classes - 1)) * F.one_hot(y, num_classes=num_classes)
                + label_smoothing / (num_classes - 1))
    p_nat = F.softmax(model(x_natural), dim=1)
    p_adv = F.softmax(model(x_adv), dim=1)
    loss_natural = torch.sum((p_nat - y_onehot) ** 2, dim=-1)
    loss_robust = F.relu(torch.sum((p_adv - p_nat) ** 2, dim=-1) - clip_value)
    loss = loss_natural.mean() + beta * loss_robust.mean()
    loss.backward()
    optimizer.step()
    return loss.item(), loss_natural.mean().item(), loss_robust.mean().item(), x_adv.detach()


LSE_ATTACK = AttackConfig(eps=EPS, steps=STEPS, step_size=ALPHA, bn="train_frozen", start="uniform")


def _lse_steps(base, x, y, objective, attack=LSE_ATTACK):
    """(ours, official): the engine's train_step and the reference, each on a copy of ``base`` with the
    same SGD and the same uniform start (the engine draws it as one ``rand`` scaled to [-eps, eps))."""
    ours_net, official_net = copy.deepcopy(base), copy.deepcopy(base)
    terms, _, _ = train_step(ours_net, x, y, objective, attack, torch.optim.SGD(ours_net.parameters(), lr=0.1),
                             device=torch.device("cpu"), amp="off", generator=torch.Generator().manual_seed(7))
    delta0 = (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype) - 1) * EPS
    official = official_trades_loss_lse(
        official_net, x, y, delta0, torch.optim.SGD(official_net.parameters(), lr=0.1), epsilon=EPS,
        step_size=ALPHA, perturb_steps=STEPS, beta=objective.beta, label_smoothing=objective.label_smoothing,
        clip_value=objective.clip if objective.clip_mode == "value" else 0.0, num_classes=10)
    return ({k: float(v.mean()) for k, v in terms.items()}, ours_net), (official, official_net)


@pytest.mark.parametrize("objective", [
    Objective(method="trades", loss="se", beta=4.0),  # the Table 3 recipe (--LSE --ls 0)
    Objective(method="trades", loss="se", beta=3.0, label_smoothing=0.1, clip_mode="value", clip=1e-3),
], ids=["table3", "smoothing+clip"])
def test_trades_step_with_train_frozen_and_uniform_start_equals_the_official_lse_pipeline(float64_setup, objective):
    """One TRADES-SE step (attack, loss, update) with ``bn: train_frozen, start: uniform`` gives the
    official ``trades_loss_LSE``'s loss terms, weights and BatchNorm buffers to 1e-6 (the engine's
    losses are float32)."""
    base, x, y = float64_setup
    (ours, ours_net), ((loss, natural, robust, x_adv), official_net) = _lse_steps(base, x, y, objective)
    assert (x_adv - x).abs().max().item() > 0.5 * EPS and robust > 1e-4  # the attack moved and the term counts
    for name, value in (("loss", loss), ("natural", natural), ("robust", robust)):
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    moved = 0.0
    for (k, a), b, start in zip(official_net.state_dict().items(), ours_net.state_dict().values(),
                                base.state_dict().values()):
        assert (b.double() - a.double()).abs().max().item() <= 1e-6, k
        moved = max(moved, (a.double() - start.double()).abs().max().item())
    assert moved > 1e-4  # the step changed the weights (and the running statistics)


@pytest.mark.parametrize("other", [{"start": "auto"}, {"bn": "auto"}], ids=["normal-start", "eval-bn"])
def test_the_lse_comparison_notices_the_default_start_or_bn_mode(float64_setup, other):
    """The reference has teeth: TRADES' default start (x + 0.001 N(0, I)) or BatchNorm mode (eval)
    moves the step's loss away from the official LSE pipeline."""
    base, x, y = float64_setup
    objective = Objective(method="trades", loss="se", beta=4.0)
    attack = AttackConfig(**{**LSE_ATTACK.__dict__, **other})
    (ours, _), ((loss, _, _, _), _) = _lse_steps(base, x, y, objective, attack)
    assert abs(ours["loss"] - loss) > 1e-5


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
    assert (resolve_start("pgdat"), resolve_start("trades"), resolve_start("trades", "uniform")) == (
        "uniform", "normal", "uniform")
    settings = AttackSettings()
    assert (settings.bn, settings.target, settings.start) == ("auto", "auto", "auto")
    assert settings.resolved("pgdat") == ("train", "onehot")
    built = build_config({"attack": {"bn": "train_frozen", "target": "smoothed", "start": "uniform"}}).attack.build(
        (0.0, 1.0))
    assert (built.bn, built.target, built.start) == ("train_frozen", "smoothed", "uniform")


def test_a_uniform_trades_start_lies_in_the_ball_and_differs_from_the_normal_one(float64_setup):
    """With no attack steps the attack returns its start: uniform in B(x) (spread over the whole
    ball), where the default TRADES start stays within a few 0.001 of x."""
    base, x, y = float64_setup
    objective = Objective(method="trades", loss="se")

    def start(kind):
        return training_attack(copy.deepcopy(base), x, y, objective, AttackConfig(eps=EPS, steps=0, start=kind),
                               generator=torch.Generator().manual_seed(2)) - x

    uniform, normal = start("uniform"), start("auto")
    assert uniform.abs().max().item() <= EPS + 1e-12 and uniform.abs().max().item() > 0.9 * EPS
    assert normal.abs().max().item() < 0.01


@pytest.mark.parametrize("key,value,allowed", [("bn", "batch", "'auto', 'eval', 'train' or 'train_frozen'"),
                                               ("target", "soft", "'auto', 'onehot' or 'smoothed'"),
                                               ("start", "gaussian", "'auto', 'normal' or 'uniform'")])
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
    with pytest.raises(ValueError, match="unknown attack start 'gaussian'"):
        AttackConfig(eps=0.1, start="gaussian")


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
