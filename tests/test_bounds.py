"""SCORE's bounds (scoretune.bounds) and `scoretune bound`.

C^D of the toy mixture is checked against an independent numerical integration written here
(numpy only: mixture density, posterior, quadrature over x, dense grid for the inner max).
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scoretune.bounds import (
    BoundEstimate,
    InnerMax,
    corollary1_check,
    estimate_C,
    madry_floor,
    madry_risk,
    score_risk,
    standard_risk,
    theorem1_check,
)
from scoretune.cli import main
from scoretune.data import toy_posterior
from scoretune.losses import LOSS_NAMES
from scoretune.toy import ToyConfig, sample_toy, train_expectation_variant

# ----------------------------------------------------------------------------- independent reference


def _normal_pdf(x, mu, var):
    return np.exp(-((x - mu) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)


def _mixture(x):
    """p(x) and p(y=1|x) for p(y=0)=5/6, x|0 ~ N(-1, 4); p(y=1)=1/6, x|1 ~ N(1, 1)."""
    j0 = 5 / 6 * _normal_pdf(x, -1.0, 4.0)
    j1 = 1 / 6 * _normal_pdf(x, 1.0, 1.0)
    return j0 + j1, j1 / (j0 + j1)


@functools.lru_cache(maxsize=None)
def _reference_C(eps: float, divergence: str) -> float:
    """int p(x) max_{|d|<=eps} D(p(.|x), p(.|x+d)) dx by the trapezoid rule on [-17, 15]."""
    x = np.linspace(-17.0, 15.0, 8001)
    d = np.linspace(-eps, eps, 801)
    dens, a = _mixture(x)
    _, b = _mixture(x[:, None] + d[None, :])
    a = a[:, None]
    if divergence == "l1":
        vals = 2 * np.abs(a - b)
    else:  # KL(p(.|x) || p(.|x'))
        vals = a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))
    return float(np.trapezoid(dens * vals.max(axis=1), x))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_points():
    gen = torch.Generator().manual_seed(123)
    return sample_toy(20_000, gen)[0].double()


@pytest.mark.parametrize("eps", [0.5, 1.0])
@pytest.mark.parametrize("divergence", ["l1", "kl"])
def test_toy_C_matches_independent_quadrature_within_2_percent(toy_points, eps, divergence):
    ref = _reference_C(eps, divergence)
    est = estimate_C(toy_posterior, toy_points, InnerMax(eps, grid=61), divergence)
    assert est.method == "grid" and est.n == toy_points.shape[0]
    assert est.mean == pytest.approx(ref, rel=0.02)
    assert est.stderr < 0.01 * ref  # the 2% agreement is not luck of a noisy estimate


def test_reference_values_are_what_the_readme_reports():
    # C^l1 and C^KL of the toy at eps = 1, and the floor (C^l1)^2/2
    c_l1, c_kl = _reference_C(1.0, "l1"), _reference_C(1.0, "kl")
    assert c_l1 == pytest.approx(0.244, abs=0.002)
    assert c_kl == pytest.approx(0.0772, abs=0.001)
    assert madry_floor(c_l1) == pytest.approx(0.0298, abs=0.0003)


def test_pgd_inner_max_agrees_with_exact_grid(toy_points):
    xs = toy_points[:1500]
    gen = torch.Generator().manual_seed(0)
    grid = estimate_C(toy_posterior, xs, InnerMax(1.0, grid=401), "l1")
    pgd = estimate_C(toy_posterior, xs, InnerMax(1.0, restarts=3, steps=30, generator=gen), "l1")
    assert pgd.method == "pgd"
    assert pgd.mean == pytest.approx(grid.mean, rel=0.005)
    # PGD is a lower bound of the true per-sample maximum (up to the grid spacing)
    assert np.all(pgd.values <= grid.values + 1e-2)


def test_a_single_pgd_restart_leaves_x_where_the_gradient_of_C_vanishes(toy_points):
    # x' = x is the minimum of D(p_d(x), p_d(x')): a run started there would never move
    xs = toy_points[:300]
    one = estimate_C(toy_posterior, xs, InnerMax(1.0, restarts=1, steps=10,
                                                   generator=torch.Generator().manual_seed(0)), "se")
    exact = estimate_C(toy_posterior, xs, InnerMax(1.0, grid=201), "se")
    assert one.mean > 0.4 * exact.mean  # one random side of each ball: well above 0
    # an antithetic pair of restarts explores both sides of every 1-D ball
    pair = estimate_C(toy_posterior, xs, InnerMax(1.0, restarts=2, steps=10,
                                                    generator=torch.Generator().manual_seed(0)), "se")
    assert pair.mean == pytest.approx(exact.mean, rel=0.01)


def test_C_is_zero_at_eps_zero_and_grows_with_eps(toy_points):
    xs = toy_points[:2000]
    values = [estimate_C(toy_posterior, xs, InnerMax(e, grid=51), "l1").mean for e in (0.0, 0.25, 0.5, 1.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert values == sorted(values) and values[-1] > 2 * values[1]


def test_estimate_reports_mean_and_standard_error():
    est = BoundEstimate.from_values(torch.tensor([1.0, 2.0, 3.0, 4.0]), "grid", "l1")
    assert est.mean == pytest.approx(2.5)
    assert est.stderr == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert est.n == 4 and float(est) == 2.5 and "±" in str(est)


def test_madry_floor_is_half_the_square():
    assert madry_floor(0.2) == pytest.approx(0.02)
    assert madry_floor(BoundEstimate(0.3, 0.01, 10, "grid", "l1")) == pytest.approx(0.045)
    with pytest.raises(ValueError):
        madry_floor(-1.0)


# ----------------------------------------------------------------------------- risks on models


class ExactPosterior(nn.Module):
    """A 'model' whose logits are log p_d(y|x): p_theta = p_d."""

    def forward(self, x):
        return torch.log(toy_posterior(x.double()).clamp_min(1e-300)).to(x.dtype)


def test_at_the_self_consistent_optimum_score_is_zero_and_madry_equals_C(toy_points):
    xs = toy_points[:2000]
    model = ExactPosterior()
    s = score_risk(model, toy_posterior, xs, InnerMax(1.0, grid=101), "l1")
    m = madry_risk(model, toy_posterior, xs, InnerMax(1.0, grid=101), "l1")
    c = estimate_C(toy_posterior, xs, InnerMax(1.0, grid=101), "l1")
    assert s.mean == pytest.approx(0.0, abs=1e-9)
    assert m.mean == pytest.approx(c.mean, rel=1e-6)
    assert standard_risk(model, toy_posterior, xs, "kl").mean == pytest.approx(0.0, abs=1e-9)


def test_madry_risk_with_one_hot_labels_is_the_cross_entropy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(64, 1)
    y = (torch.rand(64) < 0.3).long()
    onehot = F.one_hot(y, 2).float()
    at_x = madry_risk(model, onehot, x, InnerMax(0.0), "kl")
    with torch.no_grad():
        ce = float(F.cross_entropy(model(x), y))
    assert at_x.mean == pytest.approx(ce, rel=1e-5)
    robust = madry_risk(model, onehot, x, InnerMax(0.5, restarts=2, steps=10), "kl")
    assert robust.mean > at_x.mean


@pytest.fixture(scope="module")
def trained_toy_models():
    """Three small quickly-trained toy models (few steps, few samples)."""
    cfg = ToyConfig(n_samples=1000, iters=15, eval_every=1000, n_eval=100, risk_grid=5, lr=0.03)
    return {v: train_expectation_variant(v, cfg).model for v in ("standard", "pgdat_kl", "score")}


@pytest.mark.parametrize("divergence", ["l1", "l2", "sqrt_js"])
def test_theorem1_sandwich_holds_for_trained_toy_models(trained_toy_models, toy_points, divergence):
    xs = toy_points[:1000]
    for name, model in trained_toy_models.items():
        t = theorem1_check(model, toy_posterior, xs, InnerMax(1.0, grid=101), divergence, tol=1e-4)
        assert t.holds, (name, t)
        assert t.lower <= t.R_score.mean + 1e-4 <= t.upper + 2e-4
        assert t.slack == pytest.approx(min(t.slack_lower, t.slack_upper))
        assert t.pointwise_fraction == 1.0  # the theorem holds for each x, not just on average
        assert t.R_score.mean > 0.01  # not a trivial model: the check has something to check


def test_theorem1_with_pgd_estimates_holds_up_to_estimation_error(trained_toy_models, toy_points):
    gen = torch.Generator().manual_seed(1)
    t = theorem1_check(trained_toy_models["pgdat_kl"], toy_posterior, toy_points[:500],
                       InnerMax(1.0, restarts=3, steps=20, generator=gen), "l1", tol=1e-3)
    assert t.holds and t.R_madry.method == "pgd"


def test_theorem1_sandwich_fails_for_a_wrong_data_constant(trained_toy_models, toy_points):
    # the check can fail: pair R_Madry and R_SCORE at eps=1 with a C from a much smaller ball
    xs = toy_points[:1000]
    model = trained_toy_models["pgdat_kl"]
    m = madry_risk(model, toy_posterior, xs, InnerMax(1.0, grid=101), "l1").mean
    s = score_risk(model, toy_posterior, xs, InnerMax(1.0, grid=101), "l1").mean
    c_small = estimate_C(toy_posterior, xs, InnerMax(0.05, grid=101), "l1").mean
    assert s > m + c_small


def test_theorem1_needs_a_distance(trained_toy_models, toy_points):
    with pytest.raises(ValueError, match="distance"):
        theorem1_check(trained_toy_models["score"], toy_posterior, toy_points[:10], InnerMax(1.0, grid=11), "kl")


def test_corollary1_holds_and_gives_the_floor(trained_toy_models, toy_points):
    xs = toy_points[:1000]
    for name, model in trained_toy_models.items():
        c = corollary1_check(model, toy_posterior, xs, InnerMax(1.0, grid=101))
        assert c.holds, (name, c)
        assert c.lhs == pytest.approx(abs(c.R_score_l1.mean - c.C_l1.mean))
        assert c.rhs == pytest.approx(math.sqrt(2 * c.R_madry_kl.mean))
        assert c.floor == pytest.approx(c.C_l1.mean ** 2 / 2)


# ----------------------------------------------------------------------------- `scoretune bound`


def test_bound_cli_toy_prints_eight_values_and_the_floor(capsys):
    rc = main(["bound", "--data", "toy", "--eps", "1", "--n", "4000", "--grid", "101", "--no-mlflow"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in LOSS_NAMES}
    assert set(rows) == set(LOSS_NAMES)
    c_l1 = float(rows["l1"][1])
    assert c_l1 == pytest.approx(0.244, rel=0.05)
    assert float(rows["kl"][1]) == pytest.approx(0.0772, rel=0.05)
    floor_line = next(line for line in out.splitlines() if line.startswith("floor"))
    assert float(floor_line.split("=")[1].split()[0]) == pytest.approx(c_l1 ** 2 / 2, rel=1e-3)


def test_bound_cli_logs_to_mlflow(tracking_uri, capsys):
    from mlflow.tracking import MlflowClient

    rc = main(["bound", "--data", "toy", "--eps", "0.5", "--n", "2000", "--grid", "51", "--tracking-uri", tracking_uri])
    assert rc == 0
    cl = MlflowClient(tracking_uri)
    exp = cl.get_experiment_by_name("scoretune-bounds")
    runs = cl.search_runs([exp.experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    for name in LOSS_NAMES:
        assert f"C_{name}" in metrics and f"C_{name}_stderr" in metrics
    assert metrics["madry_floor"] == pytest.approx(metrics["C_l1"] ** 2 / 2)
    assert runs[0].data.params["eps"] == "0.5"


def test_bound_cli_needs_a_proxy_for_real_data():
    proc = subprocess.run([sys.executable, "-m", "scoretune.cli", "bound", "--data", "digits", "--eps", "0.1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "--proxy" in err and "toy" in err


def test_bound_cli_with_a_proxy_checkpoint(tmp_path, capsys):
    from scoretune.config import build_config
    from scoretune.engine import Trainer

    cfg = build_config({"name": "proxy", "data": {"name": "digits"}, "model": {"name": "mlp"},
                        "output_dir": str(tmp_path), "device": "cpu"})
    ckpt = Trainer(cfg).save(tmp_path / "proxy.pt")  # an untrained proxy is enough to exercise the path
    rc = main(["bound", "--data", "digits", "--eps", "0.1", "--proxy", str(ckpt), "--n", "64",
               "--restarts", "1", "--steps", "5", "--no-mlflow"])
    out = capsys.readouterr().out
    assert rc == 0 and "inner max: pgd" in out and f"proxy {ckpt}" in out
    values = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
              if line.split() and line.split()[0] in LOSS_NAMES}
    assert set(values) == set(LOSS_NAMES) and all(v >= 0 for v in values.values())
    rc = main(["bound", "--data", "toy", "--eps", "0.1", "--proxy", str(ckpt), "--no-mlflow"])
    assert rc == 2 and "drop --proxy" in capsys.readouterr().err
