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


# ----------------------------------------------------------------------------- an unreachable server


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


@pytest.mark.parametrize("argv", [["promote", "--search", "x"], ["evaluate", "0123456789abcdef0123456789abcdef"]])
def test_unreachable_tracking_server_fails_fast_with_one_line(argv, tmp_path):
    import time

    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    proc = _scoretune(*argv, "--tracking-uri", uri, cwd=tmp_path, timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode != 0
    assert took < 15, f"took {took:.1f} s"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0] and "--tracking-uri" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- concurrent first use

_RACER = """
import sys, time
from pathlib import Path
from scoretune.tracking import client, get_or_create_experiment
d = Path(sys.argv[2])
(d / f"ready{sys.argv[3]}").touch()
while not (d / "go").exists():
    time.sleep(0.005)
print(get_or_create_experiment(client(sys.argv[1]), "shared"))
"""


def test_three_processes_create_the_same_experiment_on_a_new_sqlite_store(tmp_path):
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for rnd in range(3):
        d = tmp_path / f"round{rnd}"
        d.mkdir()
        uri = f"sqlite:///{d / 'mlflow.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", _RACER, uri, str(d), str(i)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for i in range(3)]
        deadline = time.monotonic() + 120
        while not all((d / f"ready{i}").exists() for i in range(3)) and time.monotonic() < deadline:
            time.sleep(0.05)
        (d / "go").touch()
        outs = [p.communicate(timeout=180) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        ids = {out.strip().splitlines()[-1] for out, _ in outs}
        assert len(ids) == 1, ids


# ----------------------------------------------------------------------------- benchmark's own checks


def _digits_net():
    from scoretune.models import build_model

    torch.manual_seed(0)
    return build_model("mlp", input_shape=(1, 8, 8), num_classes=10, mean=(0.0,), std=(1.0,), hidden=[16]).eval()


def test_benchmark_takes_an_in_memory_module():
    from scoretune.evaluate import benchmark

    r = benchmark(_digits_net(), data="digits", n_ex=20, attack="pgd-20", eps=0.1, device="cpu")
    assert r.n == 20 and r.robust_acc <= r.clean_acc and r.logged is None
    assert r.settings["dataset"] == "digits" and r.settings["eps"] == 0.1 and r.settings["norm"] == "linf"


@pytest.mark.parametrize("eps,norm", [(5.0, "linf"), (8.5, "l2")])  # digits: 64 values in [0, 1], diagonal 8
def test_eps_larger_than_the_pixel_range_is_a_one_line_error_naming_eps(eps, norm):
    from scoretune.errors import UserError
    from scoretune.evaluate import benchmark, check_eps

    with pytest.raises(UserError, match=r"^--eps .* larger than") as e:
        benchmark(_digits_net(), data="digits", n_ex=4, attack="clean", eps=eps, norm=norm, device="cpu")
    assert "\n" not in str(e.value)
    check_eps(1.0, "linf", (0.0, 1.0), (1, 8, 8))  # the bounds themselves are allowed
    check_eps(8.0, "l2", (0.0, 1.0), (1, 8, 8))
    check_eps(100.0, "linf", None, (2,))  # unbounded inputs: nothing to compare with


def test_missing_dataset_hint_names_the_evaluate_flag(tmp_path):
    from scoretune.errors import UserError
    from scoretune.evaluate import benchmark

    with pytest.raises(UserError) as e:
        benchmark(_digits_net(), data="cifar10", data_root=str(tmp_path), attack="clean", eps=0.03, device="cpu")
    assert "--data-root DIR" in str(e.value) and "--set data.root" not in str(e.value)
