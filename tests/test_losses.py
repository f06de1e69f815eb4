"""The loss table of SCORE (Table 1), the objectives, label smoothing and loss clipping."""

import math

import pytest
import torch
import torch.nn.functional as F

from scoretune.losses import (
    DIVERGENCES,
    LOSS_NAMES,
    Objective,
    clip_bound,
    clip_loss,
    divergence,
    get_divergence,
    smooth_onehot,
)

P = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
Q = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)

# Hand-computed: P - Q = (0.2, -0.1, -0.1); M = (0.6, 0.25, 0.15).
KL_PQ = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
KL_PM = 0.7 * math.log(0.7 / 0.6) + 0.2 * math.log(0.2 / 0.25) + 0.1 * math.log(0.1 / 0.15)
KL_QM = 0.5 * math.log(0.5 / 0.6) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.15)
EXPECTED = {
    "l2": math.sqrt(0.06),
    "l1": 0.4,
    "linf": 0.2,
    "sqrt_js": math.sqrt(0.5 * KL_PM + 0.5 * KL_QM),
    "js": 0.5 * KL_PM + 0.5 * KL_QM,
    "kl": KL_PQ,
    "l1_sq": 0.16,
    "se": 0.06,
}


def test_table_has_the_eight_losses_of_the_paper():
    assert set(LOSS_NAMES) == {"l2", "l1", "linf", "sqrt_js", "js", "kl", "l1_sq", "se"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_divergence_matches_hand_computed_value(name):
    assert divergence(name, P, Q).item() == pytest.approx(EXPECTED[name], rel=1e-5, abs=1e-9)


def test_hand_values_are_what_we_think():
    assert KL_PQ == pytest.approx(0.085123, abs=1e-6)
    assert EXPECTED["js"] == pytest.approx(0.021901, abs=1e-6)


@pytest.mark.parametrize("name", [n for n, d in DIVERGENCES.items() if d.symmetric])
def test_symmetric_divergences_are_symmetric(name):
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(16, 10, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(16, 10, generator=g, dtype=torch.float64), -1)
    torch.testing.assert_close(divergence(name, p, q), divergence(name, q, p))


def test_kl_is_not_symmetric():
    assert abs(divergence("kl", P, Q).item() - divergence("kl", Q, P).item()) > 1e-3


def test_kl_matches_torch_kl_div():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(32, 10, generator=g), -1)
    q = torch.softmax(torch.randn(32, 10, generator=g), -1)
    ref = F.kl_div(q.log(), p, reduction="none").sum(-1)
    torch.testing.assert_close(divergence("kl", p, q), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_divergence_of_a_distribution_with_itself_is_zero(name):
    p = torch.softmax(torch.randn(4, 10), -1)
    assert divergence(name, p, p).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("where", ["equal_onehots", "onehot_vs_soft"])
def test_gradients_are_finite_at_one_hot_inputs(name, where):
    onehot = F.one_hot(torch.tensor([2, 0]), 4).float()
    logits = torch.tensor([[30.0, -30.0, 60.0, 0.0], [0.0, 1.0, 2.0, 3.0]], requires_grad=True)
    q = torch.softmax(logits, -1)
    if where == "equal_onehots":
        q = q * 0 + onehot + 0 * logits  # exactly one-hot, still attached to the graph
    p = onehot.clone().requires_grad_(True)
    d = divergence(name, p, q).sum()
    assert torch.isfinite(d)
    gp, gl = torch.autograd.grad(d, [p, logits])
    assert torch.isfinite(gp).all() and torch.isfinite(gl).all()


def test_unknown_loss_lists_the_choices():
    with pytest.raises(ValueError, match="unknown loss 'foo'; choose one of: l2, l1, linf"):
        get_divergence("foo")


def test_label_smoothing_puts_1_minus_c_on_the_true_class():
    t = smooth_onehot(torch.tensor([1]), 5, 0.2)
    torch.testing.assert_close(t, torch.tensor([[0.05, 0.8, 0.05, 0.05, 0.05]]))
    assert t.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "name,c,expected",
    [
        ("se", 0.4, 0.4**2 + 9 * (0.4 / 9) ** 2),
        ("se", 0.3, 0.3**2 + 9 * (0.3 / 9) ** 2),
        ("kl", 0.4, -math.log(0.6)),
        ("kl", 0.3, -math.log(0.7)),
        ("l1", 0.4, 0.8),
        ("l1", 0.3, 0.6),
        ("linf", 0.3, 0.3),
        ("l2", 0.4, math.sqrt(0.4**2 + 9 * (0.4 / 9) ** 2)),
    ],
)
def test_clip_bound_matches_formula(name, c, expected):
    assert clip_bound(name, c, 10) == pytest.approx(expected, rel=1e-6)


def test_clipping_never_raises_a_loss_and_floors_at_zero():
    loss = torch.linspace(0, 2, 101)
    clipped = clip_loss(loss, 0.5)
    assert (clipped <= loss).all()
    assert (clipped >= 0).all()
    assert clipped[0].item() == 0.0 and clipped[-1].item() == pytest.approx(1.5)


def _independent_trades_se(logits_nat, logits_adv, y, beta, ls):
    k = logits_nat.shape[1]
    target = torch.full((len(y), k), ls / (k - 1))
    target[torch.arange(len(y)), y] = 1 - ls
    pn, pa = torch.softmax(logits_nat, 1), torch.softmax(logits_adv, 1)
    nat = ((pn - target) ** 2).sum(1)
    rob = ((pa - pn) ** 2).sum(1)
    return (nat + beta * rob).mean()


def test_trades_se_equals_the_formula():
    g = torch.Generator().manual_seed(3)
    ln, la = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    obj = Objective(method="trades", loss="se", beta=4.0, label_smoothing=0.1)
    assert obj(la, y, ln).item() == pytest.approx(_independent_trades_se(ln, la, y, 4.0, 0.1).item(), rel=1e-6)


def test_trades_kl_is_ce_plus_beta_kl():
    g = torch.Generator().manual_seed(4)
    ln, la = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    ref = F.cross_entropy(ln, y) + 6.0 * F.kl_div(F.log_softmax(la, 1), F.softmax(ln, 1), reduction="batchmean")
    assert Objective(method="trades", loss="kl", beta=6.0)(la, y, ln).item() == pytest.approx(ref.item(), rel=1e-5)


def test_pgdat_kl_is_cross_entropy_on_the_adversarial_input():
    la = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    assert Objective(method="pgdat", loss="kl")(la, y).item() == pytest.approx(F.cross_entropy(la, y).item(), rel=1e-6)


def test_pgdat_se_is_squared_error_to_the_onehot():
    la = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    ref = ((torch.softmax(la, 1) - F.one_hot(y, 10)) ** 2).sum(1).mean()
    assert Objective(method="pgdat", loss="se")(la, y).item() == pytest.approx(ref.item(), rel=1e-6)


def test_value_clip_applies_to_the_trades_robust_term_only():
    g = torch.Generator().manual_seed(5)
    ln, la = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    pn, pa = torch.softmax(ln, 1), torch.softmax(la, 1)
    nat = ((pn - F.one_hot(y, 10)) ** 2).sum(1)
    rob = F.relu(((pa - pn) ** 2).sum(1) - 0.3)
    obj = Objective(method="trades", loss="se", beta=2.0, clip_mode="value", clip=0.3)
    assert obj(la, y, ln).item() == pytest.approx((nat + 2.0 * rob).mean().item(), rel=1e-6)


def test_smoothing_clip_subtracts_the_bound_from_the_whole_loss():
    la = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    raw = Objective(method="pgdat", loss="se").per_sample(la, y)["loss"]
    clipped = Objective(method="pgdat", loss="se", clip_mode="smoothing", clip=0.4).per_sample(la, y)["loss"]
    torch.testing.assert_close(clipped, F.relu(raw - clip_bound("se", 0.4, 10)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "mart"}, "unknown method 'mart'"),
        ({"loss": "hinge"}, "unknown loss 'hinge'"),
        ({"beta": -1.0}, "beta: must be a finite number >= 0"),
        ({"beta": float("inf")}, "beta: must be a finite number >= 0"),
        ({"clip": float("nan")}, "clip: must be a finite number >= 0"),
        ({"label_smoothing": 1.0}, r"label_smoothing: must be in \[0, 1\)"),
        ({"method": "pgdat", "clip_mode": "value", "clip": 0.1}, "clip_mode: clip_mode 'value'"),
        ({"clip_mode": "smoothing", "clip": 1.0}, r"clip: clip_mode 'smoothing' takes a clip value c in \[0, 1\)"),
    ],
)
def test_bad_objective_settings_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Objective(**kwargs)
