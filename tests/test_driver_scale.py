"""benchmarks/driver_scale.py: the pieces of its ``--stock`` comparison, and a tiny ``--stock`` run end to end
(so the stock arm cannot rot between the rare runs at scale)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ds():
    from benchmarks import driver_scale

    return driver_scale


def test_driver_vs_stock_is_the_ratio_of_the_medians(ds):
    ours = [{"driver_ms_per_result": v} for v in (30.0, 10.0, 20.0)]
    stock = [{"driver_ms_per_result": v} for v in (40.0, 80.0)]
    assert ds.driver_vs_stock_line(ours, stock) == "driver_vs_stock 20.00 60.00 0.333"


def test_env_set_restores_what_was_there(ds, monkeypatch):
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    with ds.env_set("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0"):
        assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "0"
    assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"
    monkeypatch.delenv("DRIVER_SCALE_TEST_UNSET", raising=False)
    with ds.env_set("DRIVER_SCALE_TEST_UNSET", "x"):
        pass
    assert "DRIVER_SCALE_TEST_UNSET" not in os.environ


@pytest.mark.slow
def test_stock_at_a_tiny_size_prints_driver_vs_stock(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "driver_scale.py"), "--trials", "4",
                           "--concurrent", "2", "--epochs", "3", "--num-cpus", "4", "--stock",
                           "--json", str(tmp_path / "out.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = re.search(r"^driver_vs_stock (\S+) (\S+) (\S+)$", proc.stdout, re.MULTILINE)
    assert line, proc.stdout[-3000:]
    ours, stock, ratio = map(float, line.groups())
    assert ours > 0 and stock > 0 and ratio == pytest.approx(ours / stock, rel=0.01)
    stock_row = re.search(r"^stock +4 x concurrent +2: +\d+ results, .*errors 0", proc.stdout, re.MULTILINE)
    assert stock_row, proc.stdout[-3000:]
