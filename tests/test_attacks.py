"""PGD for training and evaluation: stays in the threat model, increases the attacked loss; the
evaluation attack and the TRADES training attack never touch BatchNorm running statistics (the
PGD-AT attack's BatchNorm modes: tests/test_attack_official.py)."""

import pytest
import torch
import torch.nn.functional as F

from scoretune.attacks import AttackConfig, eval_mode, pgd, pgd_ce, project, training_attack
from scoretune.losses import Objective
from scoretune.models import build_model


@pytest.fixture(scope="module")
def trained_digits_model():
    """A small CNN trained cleanly for 3 epochs on digits (~95% accurate)."""
    from scoretune.data import BatchLoader, load_dataset

    torch.manual_seed(0)
    ds = load_dataset("digits")
    net = build_model("small_cnn", input_shape=ds.info.input_shape, num_classes=10, mean=ds.info.mean, std=ds.info.std)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loader = BatchLoader(ds.train, 64, shuffle=True, seed=0)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    net.eval()
    return net, ds.test.x[:200], ds.test.y[:200]


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_pgd_result_stays_in_the_ball_and_the_pixel_box(trained_digits_model, norm, eps):
    net, x, y = trained_digits_model
    cfg = AttackConfig(eps=eps, norm=norm, steps=10)
    x_adv = pgd_ce(net, x, y, cfg)
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max().item() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max().item() <= eps + 1e-5
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_pgd_increases_the_attacked_loss_on_a_trained_model(trained_digits_model, norm, eps):
    net, x, y = trained_digits_model
    x_adv = pgd_ce(net, x, y, AttackConfig(eps=eps, norm=norm, steps=10))
    with torch.no_grad():
        clean = F.cross_entropy(net(x), y).item()
        adv = F.cross_entropy(net(x_adv), y).item()
        acc_clean = (net(x).argmax(1) == y).float().mean().item()
        acc_adv = (net(x_adv).argmax(1) == y).float().mean().item()
    assert acc_clean > 0.9
    assert adv > 2 * clean
    assert acc_adv < acc_clean - 0.2


@pytest.mark.parametrize("method,loss", [("trades", "se"), ("trades", "kl"), ("pgdat", "se"), ("pgdat", "kl")])
def test_training_attack_increases_its_objective_divergence(trained_digits_model, method, loss):
    net, x, y = trained_digits_model
    obj = Objective(method=method, loss=loss, beta=6.0)
    cfg = AttackConfig(eps=0.1, steps=10)
    x_adv = training_attack(net, x, y, obj, cfg)
    with torch.no_grad():
        p_nat = F.softmax(net(x), -1)
        target = p_nat if method == "trades" else F.one_hot(y, 10).float()
        before = obj.divergence(target, p_nat).mean().item()
        after = obj.divergence(target, F.softmax(net(x_adv), -1)).mean().item()
    assert after > before + 1e-3
    assert (x_adv - x).abs().max().item() <= 0.1 + 1e-6


def test_attack_does_not_change_batchnorm_running_stats():
    torch.manual_seed(0)
    net = build_model("small_cnn", input_shape=(1, 8, 8), num_classes=10)
    net.train()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    assert before, "the model must have BatchNorm buffers for this test to mean anything"
    training_attack(net, x, y, Objective(method="trades", loss="se"), AttackConfig(eps=0.1, steps=5))
    pgd_ce(net, x, y, AttackConfig(eps=0.1, steps=5))
    after = net.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert net.training, "the attack must restore the model's training mode"


def test_the_evaluation_attack_runs_in_eval_mode_whatever_the_training_attack_bn_mode():
    torch.manual_seed(0)
    net = build_model("small_cnn", input_shape=(1, 8, 8), num_classes=10).train()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    pgd_ce(net, x, y, AttackConfig(eps=0.1, steps=3, bn="train"))
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_eval_mode_restores_each_submodule_mode():
    net = build_model("small_cnn", input_shape=(1, 8, 8), num_classes=10)
    net.train()
    first_bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first_bn.eval()
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert net.training and not first_bn.training


def test_projection_without_pixel_range_leaves_inputs_unbounded():
    x = torch.full((4, 1), 5.0)
    out = project(x + 3.0, x, AttackConfig(eps=1.0, pixel_range=None))
    torch.testing.assert_close(out, torch.full((4, 1), 6.0))


def test_step_size_defaults_to_two_and_a_half_eps_over_steps():
    assert AttackConfig(eps=0.1, steps=10).alpha == pytest.approx(0.025)
    assert AttackConfig(eps=0.1, steps=10, step_size=0.01).alpha == 0.01


def test_unknown_norm_is_rejected():
    with pytest.raises(ValueError, match="unknown norm 'l3'; choose one of: linf, l2"):
        AttackConfig(eps=0.1, norm="l3")


def test_pgd_on_an_unbounded_1d_input_moves_at_most_eps():
    net = build_model("toy_mlp", input_shape=(1,), num_classes=2, activation="tanh")
    x = torch.linspace(-3, 3, 50).unsqueeze(1)
    y = torch.zeros(50, dtype=torch.long)
    x_adv = pgd(net, x, lambda z: F.cross_entropy(z, y, reduction="none"),
                AttackConfig(eps=1.0, steps=10, pixel_range=None))
    assert (x_adv - x).abs().max().item() <= 1.0 + 1e-6


def test_attacks_freeze_the_parameters_and_give_them_back():
    """The attack needs input gradients only: parameters stop requiring grad during it (no
    weight-gradient graph), the result is bit-identical, and requires_grad is restored after."""
    import contextlib

    from scoretune import attacks

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    net[0].bias.requires_grad_(False)  # a parameter that was frozen before stays frozen
    x, y = torch.rand(16, 4), torch.randint(0, 3, (16,))
    cfg = AttackConfig(eps=0.1, steps=5, pixel_range=None)
    seen = []

    def ce(logits):
        seen.append([p.requires_grad for p in net.parameters()])
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")

    frozen = pgd(net, x, ce, cfg, generator=torch.Generator().manual_seed(1))
    assert seen and all(not any(flags) for flags in seen)
    assert [p.requires_grad for p in net.parameters()] == [True, False, True, True]
    original = attacks.frozen_parameters
    try:
        attacks.frozen_parameters = lambda model: contextlib.nullcontext(model)
        unfrozen = pgd(net, x, ce, cfg, generator=torch.Generator().manual_seed(1))
    finally:
        attacks.frozen_parameters = original
    assert torch.equal(frozen, unfrozen)


def test_a_failing_attack_still_gives_the_parameters_back():
    net = torch.nn.Linear(4, 3)

    def boom(logits):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        pgd(net, torch.rand(2, 4), boom, AttackConfig(eps=0.1, steps=2, pixel_range=None))
    assert all(p.requires_grad for p in net.parameters())
