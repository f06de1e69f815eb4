"""benchmarks/gpu_check.sh --dry-run: the GPU check's steps on CPU with tiny sizes, so it cannot rot
before a GPU is at hand (the numbers mean nothing; that every step runs and reports does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_writes_one_json(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["ok"] is True
    assert set(report["steps"]) == {"tests", "step", "train"}
    assert report["steps"]["tests"]["counts"]["tests"] >= 6  # the cuda-marked tests collect (and skip here)
    variants = {r["variant"] for r in report["steps"]["step"]["results"]}
    assert {"ours", "ours-channels_last", "ours+bf16"} <= variants
    assert all(r["ours_img_per_s"] > 0 and r["ratio"] > 0 for r in report["steps"]["step"]["results"])
    assert report["steps"]["train"]["summary"]["epoch"] == 3.0


def test_gpu_check_without_a_gpu_says_to_use_dry_run(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real check would run")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
