"""The engine's training step computes the textbook TRADES-SE / PGD-AT-SE step (not timed).

The reference is the one ``benchmarks/step_throughput.py`` times (``benchmarks/_common.py``):
clean target forward, 10 ``torch.autograd.grad`` PGD steps (linf, eps 8/255, step 2/255),
separate clean and adversarial train-mode forwards, fp32.  Same initial weights, same batch,
same random start (one seeded generator each).
"""

import copy

import pytest
import torch
from scoretune.attacks import AttackConfig
from scoretune.engine import train_epoch, train_step

from benchmarks._common import ATTACK, OBJECTIVES, fixed_batch, reference_step, seeded_model, sgd

CPU = torch.device("cpu")
BATCH = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch():
    return fixed_batch(BATCH, seed=3)


@pytest.fixture(scope="module")
def small_cnn():
    return seeded_model("small_cnn", seed=0)


def _reference(base, batch, objective, attack=ATTACK, seed=1):
    model = copy.deepcopy(base)
    out = reference_step(model, *batch, objective, attack, sgd(model), torch.Generator().manual_seed(seed))
    return out, model


def _engine(base, batch, objective, attack=ATTACK, seed=1):
    model = copy.deepcopy(base)
    terms, _, _ = train_step(model, *batch, objective, attack, sgd(model), device=CPU, amp="off",
                             generator=torch.Generator().manual_seed(seed))
    return {k: float(v.mean()) for k, v in terms.items()}, model


@pytest.fixture(scope="module")
def steps(small_cnn, batch):
    """``steps(kind, objective)`` -> (losses, model after the step), each computed once."""
    cache = {}

    def get(kind, objective):
        if (kind, objective) not in cache:
            run = _reference if kind == "ref" else _engine
            cache[kind, objective] = run(small_cnn, batch, OBJECTIVES[objective])
        return cache[kind, objective]

    return get


@pytest.mark.parametrize("objective", ["trades_se", "pgdat_se"])
def test_engine_step_gives_the_reference_loss_in_fp32(steps, objective):
    ref, _ = steps("ref", objective)
    ours, _ = steps("ours", objective)
    for term in ("loss", "natural", "robust"):
        assert ours[term] == pytest.approx(ref[term], abs=1e-5), term
    assert ref["robust"] > 0


@pytest.mark.parametrize("objective", ["trades_se", "pgdat_se"])
def test_engine_step_makes_the_reference_update(small_cnn, steps, objective):
    _, ref_model = steps("ref", objective)
    _, our_model = steps("ours", objective)
    moved = 0.0
    for (name, a), b, start in zip(ref_model.state_dict().items(), our_model.state_dict().values(),
                                   small_cnn.state_dict().values()):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
            moved = max(moved, (a - start).abs().max().item())
    assert moved > 1e-4  # the step did change the weights


def test_train_epoch_reports_the_reference_loss(small_cnn, batch, steps):
    objective = OBJECTIVES["trades_se"]
    ref, _ = steps("ref", "trades_se")
    model = copy.deepcopy(small_cnn)
    metrics = train_epoch(model, [batch], objective, ATTACK, sgd(model), device=CPU, amp="off",
                          generator=torch.Generator().manual_seed(1))
    assert metrics["train_loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert metrics["train_robust"] == pytest.approx(ref["robust"], abs=1e-5)


def test_the_comparison_notices_a_weaker_attack(small_cnn, batch, steps):
    """One PGD step fewer in the engine moves the PGD-AT loss beyond the 1e-5 tolerance (about 5e-5)."""
    ref, _ = steps("ref", "pgdat_se")
    weaker = AttackConfig(eps=ATTACK.eps, steps=ATTACK.steps - 1, step_size=ATTACK.step_size)
    ours, _ = _engine(small_cnn, batch, OBJECTIVES["pgdat_se"], attack=weaker)
    assert abs(ours["loss"] - ref["loss"]) > 1e-5


def test_the_comparison_notices_another_random_start(small_cnn, batch, steps):
    ref, _ = steps("ref", "pgdat_se")
    ours, _ = _engine(small_cnn, batch, OBJECTIVES["pgdat_se"], seed=2)
    assert abs(ours["loss"] - ref["loss"]) > 1e-5


@pytest.mark.parametrize("method, per_forward", [("trades", 1 + 3 * 2 + 2 * 2), ("pgdat", 3 * 2 + 2)])
def test_step_flops_count_every_forward_and_backward_of_the_step(method, per_forward):
    """A Linear(d, c) layer on n samples: forward F = 2ndc FLOPs; the attack's input-only backward and the
    training backward (weights only: the batch needs no gradient) 2ndc each. A 3-step attack, so TRADES
    F + 3 (F + B_in) + 2 (F + B) = 11 F and PGD-AT 3 (F + B_in) + F + B = 8 F."""
    from scoretune.losses import Objective

    from benchmarks.step_throughput import bf16_peak_tflops, step_flops

    n, d, c = 8, 12, 5
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, c))
    flops = step_flops(model, torch.rand(n, d), Objective(method=method, loss="se"), AttackConfig(eps=0.1, steps=3))
    assert flops == per_forward * 2 * n * d * c
    assert bf16_peak_tflops(CPU, None) is None and bf16_peak_tflops(CPU, 7.5) == 7.5
