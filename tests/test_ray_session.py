"""The one Ray helper: a local Ray dies with the driver (SIGKILL included), its token file is private."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from scoretune.drivers.ray_session import private_auth_token
from scoretune.drivers.ray_watchdog import session_pids

DRIVER = """
import time
import ray
from scoretune.drivers.ray_session import ray_session
with ray_session(num_cpus=1, out=lambda s: None):
    print(ray._private.worker._global_node.get_session_dir_path().rstrip('/').split('/')[-1], flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_sigkilled_driver_takes_its_local_ray_with_it():
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    session = proc.stdout.readline().strip()
    assert session.startswith("session_") and session_pids(session)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while session_pids(session) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_pids(session) == []


def test_the_token_file_is_created_private(tmp_path):
    path = private_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "ray" / "auth_token")})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) == 64


def test_a_world_readable_token_file_is_made_private(tmp_path):
    path = tmp_path / "auth_token"
    path.write_text("x" * 64)
    path.chmod(0o644)
    private_auth_token({"RAY_AUTH_TOKEN_PATH": str(path)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "x" * 64
