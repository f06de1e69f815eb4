"""benchmarks/paper_table.py builds valid Table 2 spaces (6 cells x seeds); no training here."""

from __future__ import annotations

from collections import Counter

import pytest


@pytest.fixture(scope="module")
def pt():
    from benchmarks import paper_table

    return paper_table


@pytest.mark.parametrize("argv", [["--seeds", "3"],
                                  ["--data", "cifar10", "--model", "preact_resnet18", "--device", "cuda",
                                   "--epochs", "110", "--seeds", "2"]])
def test_the_space_validates_and_runs_the_six_cells_once_per_seed(pt, argv):
    proto = pt.protocol_from_args(pt.parse_args(argv))
    space = pt.validated_space(proto)
    seeds = int(argv[argv.index("--seeds") + 1])
    assert space.sampler.type == "grid" and space.scheduler.type == "none"
    assert space.total_samples == 6 * seeds == space.top_k
    cells = Counter((p["method"], p["loss"], p["clip_mode"]) for p in space.points_to_evaluate)
    assert set(cells) == {(c.method, c.loss, c.clip_mode) for c in pt.table_cells()}
    assert set(cells.values()) == {seeds}
    assert space.autoattack.version == "standard" and space.autoattack.split == "test"
    epochs = {space.experiment_config(p).epochs for p in space.points_to_evaluate}
    assert len(epochs) == 1  # the same schedule for every cell


def test_the_cifar_protocol_is_the_papers(pt):
    proto = pt.protocol_from_args(pt.parse_args(["--data", "cifar10", "--epochs", "110"]))
    cfg = pt.validated_space(proto).base_config()
    assert (cfg.data.name, cfg.model.name, cfg.device, cfg.epochs) == ("cifar10", "preact_resnet18", "cuda", 110)
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.attack.eps_warmup_epochs == 0


def test_claims_are_mean_differences_in_points_with_their_standard_error(pt):
    from scoretune.search.report import group_by_config

    def trial(method, loss, clip, seed, aa):
        return {"point": {"method": method, "loss": loss, "clip_mode": clip, "seed": seed},
                "metrics": {"aa_acc": aa}, "run": f"{method}{loss}{clip}{seed}"}

    trials = [trial("pgdat", "se", "none", 0, 0.50), trial("pgdat", "se", "none", 1, 0.54),
              trial("pgdat", "kl", "none", 0, 0.40), trial("pgdat", "kl", "none", 1, 0.44)]
    rows = group_by_config(trials, ["method", "loss", "clip_mode"])
    lines = [c.line() for c in pt.paper_claims(rows)]
    # diff 10 points; se = sqrt(2.83^2/2 + 2.83^2/2) = 2.83 points
    assert lines[0] == "claim SE>=KL pgdat +10.00 2.83"
    assert lines[1:] == ["claim SE>=KL trades - -", "claim clip>=noclip pgdat - -", "claim clip>=noclip trades - -"]
