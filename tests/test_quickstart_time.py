"""benchmarks/quickstart_time.py splits a search's output at the lines the search prints today."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def qt():
    from benchmarks import quickstart_time

    return quickstart_time


def test_the_split_reads_the_stamped_autoattack_lines_of_the_search(qt):
    lines = [(0.0, ""), (20.0, "[10:00:20] start         0b57b1bc  beta=3.7 lr=0.18"),
             (120.0, "logged model of trial 0b57b1bc as trial-0b57b1bc: models:/m-1"),
             (125.0, "[10:02:05] AutoAttack (fast, val split, n_ex=200) of 2 models in parallel: trial a (epoch 3)"),
             (160.0, "[10:02:40]   trial 0b57b1bc: aa_acc=0.512 +- 0.035  (35 s)"),
             (170.0, "[10:02:50]   trial 5055c2ae: failed (see the run's scoretune.autoattack_error tag)  (45 s)")]
    phases = qt.split_phases(lines, 180.0)
    assert phases == pytest.approx({"total": 180.0, "setup": 20.0, "trials": 100.0, "autoattack": 45.0,
                                    "finalize": 15.0})
