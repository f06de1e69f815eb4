"""The public API: every name in ``scoretune.__all__`` resolves, and ``import scoretune`` stays light."""

import subprocess
import sys

import scoretune


def test_every_public_name_resolves():
    missing = [n for n in scoretune.__all__ if getattr(scoretune, n, None) is None]
    assert missing == []
    assert scoretune.benchmark.__module__ == "scoretune.evaluate" and scoretune.train.__module__ == "scoretune.drivers.train"


def test_import_scoretune_loads_no_framework():
    code = "import sys, scoretune; print(sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
