"""SCORE's toy demos (scoretune.toy) and `scoretune toy`."""

from __future__ import annotations

import pytest
import torch

from scoretune.cli import main
from scoretune.data import toy_posterior
from scoretune.toy import (
    EXPECTATION_VARIANTS,
    FINITE_VARIANTS,
    ToyConfig,
    finite_pairs,
    posterior_gap,
    sample_toy,
    train_expectation_variant,
    train_finite_variant,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_samples_follow_the_mixture():
    x, y = sample_toy(60_000, torch.Generator().manual_seed(0))
    assert x.shape == (60_000, 1) and y.dtype == torch.int64
    assert float(y.float().mean()) == pytest.approx(1 / 6, abs=0.01)
    assert float(x[y == 0].mean()) == pytest.approx(-1.0, abs=0.05)
    assert float(x[y == 0].std()) == pytest.approx(2.0, abs=0.05)
    assert float(x[y == 1].std()) == pytest.approx(1.0, abs=0.05)


def test_posterior_gap_of_the_exact_posterior_is_zero():
    class Exact(torch.nn.Module):
        def forward(self, x):
            return torch.log(toy_posterior(x))

    exact = Exact()
    exact.register_parameter("dummy", torch.nn.Parameter(torch.zeros(1)))
    assert posterior_gap(exact) == pytest.approx(0.0, abs=1e-6)


def test_score_ends_closer_to_the_data_posterior_than_pgd_at_kl():
    cfg = ToyConfig(n_samples=2000, iters=80, lr=0.03, eval_every=40, n_eval=1000, risk_grid=21)
    score = train_expectation_variant("score", cfg)
    madry = train_expectation_variant("pgdat_kl", cfg)
    # closer to p_d, under p(x) and on the grid over [-10, 10]
    assert score.final["gap_data"] < 0.6 * madry.final["gap_data"]
    assert score.final["gap_grid"] < madry.final["gap_grid"]
    # and it is SCORE's risk that training drives down
    assert score.final["R_score_l1"] < 0.5 * madry.final["R_score_l1"]
    assert score.history[0]["R_score_l1"] > 3 * score.final["R_score_l1"]
    # PGD-AT (KL) minimises its own risk better than SCORE does
    assert madry.final["R_madry_kl"] < score.final["R_madry_kl"]


def test_finite_sample_score_beats_standard():
    cfg = ToyConfig(finite_iters=150, lr=0.03, eval_every=1000, n_eval=1000, risk_grid=11)
    x, y = finite_pairs(cfg)
    assert x.shape == (6, 1) and 0 < int(y.sum()) < 6
    standard = train_finite_variant("standard", cfg, x, y)
    score = train_finite_variant("score", cfg, x, y)
    assert score.final["gap_data"] < 0.5 * standard.final["gap_data"]


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        train_expectation_variant("madry", ToyConfig(iters=1))
    assert set(EXPECTATION_VARIANTS) == {"standard", "pgdat_kl", "pgdat_se", "score", "trades"}
    assert "standard" in FINITE_VARIANTS and "score" in FINITE_VARIANTS


def test_toy_cli_saves_plots_and_logs_to_mlflow(tmp_path, tracking_uri, capsys):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "plots"
    rc = main(["toy", "--iters", "2", "--finite-iters", "2", "--n-samples", "300", "--out", str(out),
               "--tracking-uri", tracking_uri])
    assert rc == 0
    text = capsys.readouterr().out
    assert "C^l1 = 0.24" in text and "floor (C^l1)^2/2 = 0.02" in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["toy_expectation_posterior.png", "toy_expectation_risks.png",
                    "toy_finite_posterior.png", "toy_finite_risks.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    cl = MlflowClient(tracking_uri)
    run = cl.search_runs([cl.get_experiment_by_name("scoretune-toy").experiment_id])[0]
    m = run.data.metrics
    assert m["madry_floor"] == pytest.approx(m["C_l1"] ** 2 / 2)
    for v in EXPECTATION_VARIANTS:
        assert f"expectation.{v}.gap_grid" in m and f"expectation.{v}.R_score_l1" in m
    for v in FINITE_VARIANTS:
        assert f"finite.{v}.gap_data" in m
    history = cl.get_metric_history(run.info.run_id, "expectation.score.R_standard_l1")
    assert sorted(h.step for h in history) == [1, 2]
    artifacts = {a.path for a in cl.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {f"plots/{p}" for p in pngs}
