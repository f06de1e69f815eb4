"""The team tracking server as processes: PostgreSQL (``initdb`` + ``pg_ctl``) and
``mlflow server --app-name basic-auth`` on it, with artifacts proxied by the server.

``scoretune server`` and the tests start the same stack from here:

    pg = Postgres(Path("~/.scoretune/server/pgdata").expanduser())
    pg.init()                       # first start only: initdb, a random DB password in a 0600 pgpass file
    pg.start(port=5432)             # bound to 127.0.0.1 only; MLflow is its one client
    pg.create_database("mlflow"); pg.create_database("mlflow_auth")
    srv = MlflowServer(backend_uri=pg.uri("mlflow"), auth_db_uri=pg.uri("mlflow_auth"), state_dir=...,
                       host="10.0.0.5", port=5000, artifacts_destination="s3://bucket/mlartifacts",
                       allowed_hosts=["10.0.0.5:5000", "head.internal:5000"])
    srv.start(env)                  # env: MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY

No secret is put on a command line (``ps`` shows those to every user): the database URI reaches MLflow
as ``MLFLOW_BACKEND_STORE_URI``, its password through a ``PGPASSFILE`` (mode 0600), the auth database
through an auth config file (0600, ``MLFLOW_AUTH_CONFIG_PATH``), the admin password and the Flask secret
key through the environment. PostgreSQL refuses to run as root: as root, its processes run as the
``postgres`` system user (Debian's package creates it), which must own the data directory.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import UserError

ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
DB_USER = "mlflow"
PG_SEARCH = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")


class ServerError(UserError):
    """The tracking stack could not be started (missing binary, port taken, bad setting)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pg_bin(name: str) -> str:
    """The path of PostgreSQL program ``name`` (``initdb``, ``pg_ctl``, ``pg_dump``...): on PATH, else the
    newest Debian/Ubuntu ``/usr/lib/postgresql/<version>/bin`` (the package does not put them on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for pattern in PG_SEARCH:
        dirs = sorted(glob.glob(pattern), key=lambda d: [int(p) if p.isdigit() else 0 for p in d.split("/")])
        for d in reversed(dirs):
            if os.access(os.path.join(d, name), os.X_OK):
                return os.path.join(d, name)
    raise ServerError(f"PostgreSQL's {name} was not found on PATH nor in /usr/lib/postgresql/*/bin: install it "
                      "(Debian/Ubuntu: sudo apt-get install -y postgresql) or pass --backend-store-uri for a "
                      "managed database")


@dataclass
class Postgres:
    """A PostgreSQL cluster of our own in ``data_dir``, listening on ``host:port`` (loopback by default)."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int | None = None
    _run_as: tuple[int, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).absolute()
        if os.geteuid() == 0:  # postgres will not run as root
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise ServerError("PostgreSQL refuses to run as root and there is no 'postgres' user: run "
                                  "scoretune server as an ordinary user (or install Debian's postgresql)") from None
            self._run_as = (pw.pw_uid, pw.pw_gid)

    # -- files
    @property
    def pgpass(self) -> Path:
        """The DB password as a libpq password file (0600, next to the data dir, readable by MLflow only)."""
        return self.data_dir.parent / "pgpass"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir.parent / "pgsock"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    def password(self) -> str:
        line = self.pgpass.read_text().strip().splitlines()[0]
        return line.rsplit(":", 1)[1]

    def _popen_kw(self) -> dict:
        if self._run_as is None:
            return {}
        uid, gid = self._run_as
        return {"user": uid, "group": gid, "extra_groups": []}

    def _chown(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, *self._run_as)

    def _check_reachable_by_owner(self) -> None:
        if self._run_as is None:
            return
        for d in self.data_dir.parent.parents:  # the parent itself is chowned to postgres
            if not d.stat().st_mode & 0o001:
                raise ServerError(f"PostgreSQL runs as the 'postgres' user and cannot enter {d} (mode "
                                  f"{oct(d.stat().st_mode & 0o777)}): pick a --dir under /srv or /var/lib")

    def run(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              **self._popen_kw(), **kw)

    # -- lifecycle
    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def init(self) -> bool:
        """``initdb`` (scram-sha-256, superuser ``mlflow`` with a random password) unless done; True if new."""
        if self.initialized:
            return False
        parent = self.data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._check_reachable_by_owner()
        self._chown(parent)
        password = secrets.token_urlsafe(24)
        pwfile = parent / ".initdb-pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        self._chown(pwfile)
        try:
            r = self.run([pg_bin("initdb"), "-D", str(self.data_dir), "-U", DB_USER, "--pwfile", str(pwfile),
                          "-A", "scram-sha-256", "-E", "UTF8", "--locale", "C.UTF-8", "--no-instructions"])
        finally:
            pwfile.unlink(missing_ok=True)
        if r.returncode != 0:
            raise ServerError(f"initdb {self.data_dir} failed: {(r.stderr or r.stdout).strip()[-400:]}")
        fd = os.open(self.pgpass, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:  # host:port:db:user:password, any host/port/db
            f.write(f"*:*:*:{DB_USER}:{password}\n")
        return True

    def pid(self) -> int | None:
        """The postmaster's pid (first line of ``postmaster.pid``) when it is running."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def start(self, port: int | None = None, *, fast: bool = False, timeout: float = 60.0) -> int:
        """``pg_ctl start`` on ``host:port`` (a free port when None); returns the port. ``fast`` turns
        fsync off (tests only: a crash of the machine could then corrupt the database)."""
        if self.pid() is not None:
            raise ServerError(f"PostgreSQL is already running on {self.data_dir} (pid {self.pid()}); stop it "
                              "first or use it")
        self.port = port or free_port(self.host)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.socket_dir)
        self.log_file.touch()
        self._chown(self.log_file)
        opts = f"-p {self.port} -c listen_addresses={self.host} -k {self.socket_dir}"
        if fast:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        r = self.run([pg_bin("pg_ctl"), "-D", str(self.data_dir), "-o", opts, "-l", str(self.log_file), "-w",
                      "-t", str(int(timeout)), "start"])
        if r.returncode != 0:
            tail = self.log_file.read_text(errors="replace")[-600:] if self.log_file.exists() else ""
            raise ServerError(f"PostgreSQL did not start on {self.host}:{self.port}: {r.stdout.strip()[-300:]} "
                              f"{tail.strip()}")
        return self.port

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown by pid (SIGINT to the postmaster), SIGKILL if it is still there after ``timeout``."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid() is None:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    # -- databases
    def env(self) -> dict[str, str]:
        """What a client of this cluster needs in its environment (the password file)."""
        return {"PGPASSFILE": str(self.pgpass)}

    def uri(self, database: str) -> str:
        """The SQLAlchemy URI of ``database`` (psycopg v3 driver; no password: it is in :attr:`pgpass`)."""
        return f"postgresql+psycopg://{DB_USER}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> bool:
        """Create ``name`` unless it exists; True if created."""
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=DB_USER, dbname="postgres",
                             password=self.password(), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return False
            conn.execute(f'CREATE DATABASE "{name}"')
        return True

    def dump(self, database: str, out: Path) -> None:
        """``pg_dump -Fc`` of ``database`` into ``out`` (restore with ``pg_restore -d DB --clean out``)."""
        r = subprocess.run([pg_bin("pg_dump"), "-h", self.host, "-p", str(self.port), "-U", DB_USER, "-Fc",
                            "-f", str(out), database], capture_output=True, text=True,
                           env={**os.environ, **self.env()})
        if r.returncode != 0:
            raise ServerError(f"pg_dump {database} failed: {r.stderr.strip()[-400:]}")


def normalize_db_uri(uri: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; with only psycopg (v3) installed (the ``[server]``
    extra), name that driver: ``postgresql+psycopg://``."""
    if uri.startswith(("postgresql://", "postgres://")):
        import importlib.util

        if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
            return "postgresql+psycopg://" + uri.split("://", 1)[1]
    return uri


def write_auth_config(path: Path, auth_db_uri: str, *, admin_username: str = "admin",
                      default_permission: str = "READ") -> Path:
    """The basic-auth app's config file (0600: it names the auth database). New users get
    ``default_permission`` on others' experiments (READ: everyone sees, only owners and admins write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("[mlflow]\n"
                f"default_permission = {default_permission}\n"
                f"database_uri = {auth_db_uri}\n"
                f"admin_username = {admin_username}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                # a successful login is remembered for 30 s per worker: the password hash (PBKDF2) is not
                # recomputed for every one of a search's writes; a changed password is honoured within 30 s
                "auth_cache_ttl_seconds = 30\n")
    return path


def require_secrets(env: Mapping[str, str]) -> None:
    """The admin password and the Flask secret key must come from the environment (never a flag or a file
    in the repo); a one-line error names the variable and how to set it."""
    for key, how in ((ADMIN_PASSWORD_ENV, "the admin's password (at least 12 characters; the admin account is "
                                          "created with it on the first start)"),
                     (SECRET_KEY_ENV, "a random key shared by the server's workers, e.g. "
                                      "export MLFLOW_FLASK_SERVER_SECRET_KEY=$(openssl rand -hex 32)")):
        if not env.get(key):
            raise ServerError(f"{key} is not set: export it first ({how}); it is read from the environment only")
    if len(env[ADMIN_PASSWORD_ENV]) < 12:
        raise ServerError(f"{ADMIN_PASSWORD_ENV} is shorter than 12 characters: pick a longer admin password")


@dataclass
class MlflowServer:
    """``mlflow server --app-name basic-auth`` on ``backend_uri``, artifacts proxied to
    ``artifacts_destination``, Host headers limited to ``allowed_hosts``."""

    backend_uri: str
    auth_db_uri: str
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 5000
    artifacts_destination: str | None = None
    allowed_hosts: Sequence[str] = ()
    workers: int = 2
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def auth_config(self) -> Path:
        return Path(self.state_dir) / "basic_auth.ini"

    @property
    def log_file(self) -> Path:
        return Path(self.state_dir) / "mlflow-server.log"

    def hosts(self) -> list[str]:
        """``--allowed-hosts``: the given names, plus this server's own ``host:port`` and ``localhost:port`` /
        ``127.0.0.1:port`` (what a browser sends through an SSH tunnel); every other Host header is refused."""
        own = [f"{self.host}:{self.port}", f"localhost:{self.port}", f"127.0.0.1:{self.port}"]
        return list(dict.fromkeys([*self.allowed_hosts, *own]))

    def command(self) -> list[str]:
        """The server's argv: no secret in it (see the module docstring)."""
        if self.host in ("0.0.0.0", "::", ""):
            raise ServerError("refusing to bind the tracking server to every interface: pass --host with the "
                              "machine's private address (e.g. $(hostname -I | cut -d' ' -f1)) or 127.0.0.1")
        argv = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                "--host", self.host, "--port", str(self.port), "--workers", str(self.workers),
                "--allowed-hosts", ",".join(self.hosts()), "--serve-artifacts"]
        dest = self.artifacts_destination or str(Path(self.state_dir).absolute() / "mlartifacts")
        return argv + ["--artifacts-destination", dest]

    def environment(self, env: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
        require_secrets(env)
        write_auth_config(self.auth_config, normalize_db_uri(self.auth_db_uri))
        out = {**env, **(extra or {})}
        out.update({"MLFLOW_BACKEND_STORE_URI": normalize_db_uri(self.backend_uri),
                    "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config),
                    # the GenAI job runner is not needed for training runs; it only slows the start
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")})
        return out

    def start(self, env: Mapping[str, str], extra_env: Mapping[str, str] | None = None, *,
              wait: float = 180.0) -> "MlflowServer":
        """Start the server in its own session (log in :attr:`log_file`) and wait for ``/health``."""
        self.launch(env, extra_env)
        self.wait_healthy(wait)
        return self

    def launch(self, env: Mapping[str, str], extra_env: Mapping[str, str] | None = None) -> "MlflowServer":
        """Start the server without waiting for it (see :meth:`wait_healthy`)."""
        if port_open(self.host, self.port):
            raise ServerError(f"{self.host}:{self.port} is already in use: pass --port with a free port")
        full_env = self.environment(env, extra_env)
        Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(self.command(), env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def wait_healthy(self, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"mlflow server exited with code {self.proc.returncode}: "
                                  f"{self.log_file.read_text(errors='replace')[-800:].strip()}")
            try:
                with opener.open(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise ServerError(f"mlflow server did not answer on {self.url}/health within {timeout:.0f} s "
                          f"(log: {self.log_file})")

    def kill(self) -> None:
        """SIGKILL the server's whole process group (its uvicorn workers too), as a crash would."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            self.kill()
