"""The MLflow store is data, not code: evaluating a logged model never unpickles it; the tracking layer
fails fast on an unreachable server and survives concurrent first use of a store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MARKER_ENV = "SCORETUNE_TEST_PICKLE_MARKER"


class Payload(torch.nn.Linear):
    """A module whose unpickling writes a marker file (what a hostile pickle-format model would do)."""

    def __init__(self, marker: str):
        super().__init__(2, 2)
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _log_pickle_model(uri: str, marker: Path) -> tuple[str, str]:
    """A run holding a pickle-format MLflow PyTorch model whose loading creates ``marker``."""
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("hostile")
    with mlflow.start_run() as run:
        info = mlflow.pytorch.log_model(Payload(str(marker)), name="model", serialization_format="pickle",
                                        pip_requirements=["torch"])
    assert not marker.exists()  # logging did not run it
    return run.info.run_id, info.model_uri


def _scoretune(*argv: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "scoretune"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "scoretune.cli"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(cmd + list(argv), capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.mark.parametrize("which", ["run_id", "model_uri"])
def test_pickle_format_model_is_refused_and_never_unpickled(which, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    marker = tmp_path / "pwned"
    run_id, model_uri = _log_pickle_model(uri, marker)
    ref = run_id if which == "run_id" else model_uri
    proc = _scoretune("evaluate", ref, "--data", "digits", "--eps", "0.1", "--attack", "clean",
                      "--no-mlflow", "--tracking-uri", uri, cwd=tmp_path)
    assert not marker.exists(), "the pickle payload ran"
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "pickle" in lines[0] and "re-log it" in lines[0] and "Traceback" not in proc.stderr


def test_library_load_refuses_pickle_even_when_mlflow_would_allow_it(tmp_path, monkeypatch):
    from scoretune.errors import UserError
    from scoretune.tracking.model_refs import load_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    marker = tmp_path / "pwned"
    run_id, _ = _log_pickle_model(uri, marker)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    with pytest.raises(UserError, match="pickle"):
        load_model(run_id, tracking_uri=uri)
    assert not marker.exists()
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
