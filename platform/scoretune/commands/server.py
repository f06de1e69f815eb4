"""``scoretune server``: the team's tracking server on one machine -- PostgreSQL (its own data directory,
loopback only) and ``mlflow server --app-name basic-auth`` on it, artifacts proxied by the server.

    export MLFLOW_AUTH_ADMIN_PASSWORD='...'                          # the admin account's password
    export MLFLOW_FLASK_SERVER_SECRET_KEY=$(openssl rand -hex 32)    # shared by the server's workers
    scoretune server --host 10.0.0.5 --port 5000                     # Ctrl-C stops both
    scoretune server --backup ~/backups                              # pg_dump of both databases, while it runs

The first start runs ``initdb`` in ``--dir`` (default ``~/.scoretune/server``) with a random database
password (kept in a 0600 ``pgpass`` file there) and creates the admin account with
``MLFLOW_AUTH_ADMIN_PASSWORD``. With ``SCORETUNE_SERVER_DB_URI`` (and ``SCORETUNE_SERVER_AUTH_DB_URI``)
set to a managed PostgreSQL, no local database is started. See cluster/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

HELP = "run the team tracking server: MLflow with basic auth on PostgreSQL, artifacts proxied (Ctrl-C stops it)"
DB_URI_ENV = "SCORETUNE_SERVER_DB_URI"
AUTH_DB_URI_ENV = "SCORETUNE_SERVER_AUTH_DB_URI"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=os.environ.get("SCORETUNE_SERVER_DIR", "~/.scoretune/server"),
                   help="server state: PostgreSQL data, pgpass, auth config, logs, local artifacts "
                        "(default $SCORETUNE_SERVER_DIR or ~/.scoretune/server)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on: 127.0.0.1 (this machine) or the machine's private address; "
                        "never 0.0.0.0")
    p.add_argument("--port", type=int, default=5000, help="MLflow port (default 5000)")
    p.add_argument("--db-port", type=int, default=None, help="PostgreSQL port on 127.0.0.1 (default: a free one)")
    p.add_argument("--artifacts-destination", default=None,
                   help="where the server stores artifacts (s3://..., gs://..., a shared path; default DIR/mlartifacts)")
    p.add_argument("--allowed-hosts", default="",
                   help="comma-separated Host headers to accept besides HOST:PORT and localhost:PORT, e.g. "
                        "'mlflow.lab.internal:5000,head-1:5000'")
    p.add_argument("--workers", type=int, default=2, help="MLflow worker processes (default 2)")
    p.add_argument("--env-file", default=None, metavar="FILE",
                   help="read MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY (and SCORETUNE_SERVER_DB_URI...) "
                        "from FILE (KEY=VALUE lines, mode 0600; what the cluster configs fetch from the secret store)")
    p.add_argument("--backup", metavar="DIR", default=None,
                   help="instead of serving: pg_dump the running server's databases into DIR and exit")
    p.add_argument("--print-command", action="store_true",
                   help="print the mlflow server command and the environment it gets (names only) and exit")


ENV_FILE_KEYS = ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_USERNAME",
                 DB_URI_ENV, AUTH_DB_URI_ENV)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, optional ``export``, optional quotes; no shell expansion) of a
    private file: one that group or others can read is refused, as is a key that is not a server secret."""
    from ..errors import UserError

    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"--env-file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--env-file {path} is not a text file of KEY=VALUE lines (byte {e.object[e.start]:#04x} at "
                        f"offset {e.start} is not UTF-8); give the file with {', '.join(ENV_FILE_KEYS)}") from None
    if st.st_mode & 0o077:
        raise UserError(f"--env-file {path} can be read by others (mode {oct(st.st_mode & 0o777)}): chmod 600 {path}")
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in ENV_FILE_KEYS:
            raise UserError(f"--env-file {path}:{n}: expected KEY=VALUE with KEY one of {', '.join(ENV_FILE_KEYS)}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


def state_file(d: Path) -> Path:
    return d / "server.json"


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..tracking.server import MlflowServer, Postgres, ServerError, require_secrets

    d = Path(args.dir).expanduser().absolute()
    if args.backup:
        return backup(d, Path(args.backup).expanduser())
    if args.env_file and not args.print_command:
        os.environ.update(read_env_file(Path(args.env_file).expanduser()))
    managed = os.environ.get(DB_URI_ENV)
    if managed and not os.environ.get(AUTH_DB_URI_ENV):
        raise UserError(f"{DB_URI_ENV} is set but {AUTH_DB_URI_ENV} is not: give the auth database its own URI "
                        "(a second database on the same server, e.g. .../mlflow_auth)")
    hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    pg = None if managed else Postgres(d / "pgdata")
    if args.print_command:
        srv = MlflowServer("<db>", "<auth db>", d, host=args.host, port=args.port,
                           artifacts_destination=args.artifacts_destination, allowed_hosts=hosts, workers=args.workers)
        print(" ".join(srv.command()))
        print("environment: MLFLOW_BACKEND_STORE_URI, MLFLOW_AUTH_CONFIG_PATH, PGPASSFILE, "
              "MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY")
        return 0
    require_secrets(os.environ)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    srv = None
    try:
        if pg is not None:
            if pg.init():
                print(f"initialized PostgreSQL in {pg.data_dir} (database password in {pg.pgpass}, mode 0600)")
            pg.start(args.db_port)
            for db in ("mlflow", "mlflow_auth"):
                pg.create_database(db)
            backend, auth_db, extra = pg.uri("mlflow"), pg.uri("mlflow_auth"), pg.env()
        else:
            backend, auth_db, extra = managed, os.environ[AUTH_DB_URI_ENV], {}
        srv = MlflowServer(backend, auth_db, d, host=args.host, port=args.port,
                           artifacts_destination=args.artifacts_destination, allowed_hosts=hosts, workers=args.workers)
        print(f"starting MLflow (basic auth) on {srv.url}; log: {srv.log_file}", flush=True)
        srv.start(os.environ, extra)
        _write_state(d, srv, pg)
        print(f"MLflow server: {srv.url}   (Ctrl-C stops it)")
        print(f"  database:  {'PostgreSQL on 127.0.0.1:%s, data in %s' % (pg.port, pg.data_dir) if pg else 'managed (' + DB_URI_ENV + ')'}")
        print(f"  artifacts: {srv.command()[-1]} (proxied: clients need no storage credentials)")
        print(f"  allowed Host headers: {', '.join(srv.hosts())}")
        print(f"  clients:   export MLFLOW_TRACKING_URI={srv.url} MLFLOW_TRACKING_USERNAME=admin "
              "MLFLOW_TRACKING_PASSWORD=<the admin password>")
        print(f"  backup:    scoretune server --dir {d} --backup DIR", flush=True)
        while srv.proc.poll() is None:
            time.sleep(1.0)
        raise ServerError(f"mlflow server exited with code {srv.proc.returncode} (log: {srv.log_file})")
    except KeyboardInterrupt:
        print("stopping the tracking server", flush=True)
        return 0
    finally:
        if srv is not None:
            srv.stop()
        if pg is not None:
            pg.stop()
        state_file(d).unlink(missing_ok=True)


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # the finally block stops MLflow, then PostgreSQL


def _write_state(d: Path, srv, pg) -> None:
    state = {"url": srv.url, "mlflow_pid": srv.proc.pid, "db_port": pg.port if pg else None,
             "db_host": pg.host if pg else None, "started": time.time()}
    state_file(d).write_text(json.dumps(state))


def backup(d: Path, out_dir: Path) -> int:
    """``pg_dump -Fc`` of both databases of the server running from ``d`` into ``out_dir``."""
    from ..errors import UserError
    from ..tracking.server import Postgres

    try:
        state = json.loads(state_file(d).read_text())
    except (OSError, ValueError):
        raise UserError(f"no running scoretune server in {d} (no {state_file(d).name}): start it, or pass its --dir; "
                        "a managed database is backed up by its provider (or pg_dump against its URI)") from None
    if not state.get("db_port"):
        raise UserError("this server uses a managed database: back it up with the provider's snapshots or "
                        "`pg_dump -Fc \"$SCORETUNE_SERVER_DB_URI\"`")
    pg = Postgres(d / "pgdata", host=state["db_host"], port=int(state["db_port"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for db in ("mlflow", "mlflow_auth"):
        target = out_dir / f"{db}-{stamp}.dump"
        pg.dump(db, target)
        print(f"{target}  ({target.stat().st_size} bytes; restore: pg_restore --clean -d {db} {target})")
    return 0
