"""The one way scoretune starts or joins Ray.

    with ray_session(address, num_cpus=4) as where:   # "local Ray" | "Ray cluster at ..."
        ...

* A Ray this process is already connected to is used as is (and left running).
* ``address`` (or ``$RAY_ADDRESS``): join that cluster ('auto', host:port, ray://host:10001).
* Otherwise a local Ray is started with node address 127.0.0.1, without the dashboard, and shut down at
  the end; a watchdog (:mod:`scoretune.drivers.ray_watchdog`) ends all of its processes if this process
  dies without shutting it down (SIGKILL). Ray 2.60's GCS and raylet still listen on every interface
  (their gRPC servers bind the wildcard address whatever the node address: there is no setting for it),
  so the local Ray relies on Ray's token authentication: the token file is created, or tightened, 0600.
* The thread policy (:mod:`scoretune.threads`) reaches every worker: a joined cluster's through the job's
  runtime environment (the wait setting), a local Ray's by inheritance; a local Ray starts without the
  policy's ``OMP_NUM_THREADS``, so Ray sizes each worker's count to its task's ``num_cpus``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

from .. import threads
from ..errors import UserError


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                out: Callable[[str], None] = print) -> Iterator[str]:
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        yield "the connected Ray"
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            env_vars = threads.ray_env_vars()
            ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env_vars} if env_vars else None)
            where = f"Ray cluster at {address}"
        else:
            private_auth_token()
            with threads.ray_start_env():
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")  # no public hook for the node address
            where = "local Ray"
    except ConnectionError as e:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {e} (start it with `ray start --head`, "
                        "or leave --address out to run locally)") from None
    watchdog = _start_watchdog() if where == "local Ray" else None
    try:
        res = ray.cluster_resources()
        out(f"{where}: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")
        yield where
    finally:
        ray.shutdown()
        if watchdog is not None:
            with contextlib.suppress(OSError):
                watchdog.stdin.write(b"done")
                watchdog.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                watchdog.wait(timeout=5)


def private_auth_token(env: dict[str, str] | None = None) -> Path | None:
    """The Ray token file this process will use, created (random, 0600) when missing and made 0600 when it
    is ours and readable by others (Ray writes it 0644). None when the token comes from ``$RAY_AUTH_TOKEN``."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return None
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another scoretune process created it first: use theirs
            return path
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    elif path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path


def _start_watchdog() -> subprocess.Popen | None:
    import ray

    session = ray.get_runtime_context().get_session_name()  # the name of the session folder Ray passes on
    return subprocess.Popen([sys.executable, "-m", "scoretune.drivers.ray_watchdog", session],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
