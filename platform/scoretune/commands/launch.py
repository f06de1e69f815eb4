"""``scoretune launch``: run a search on a Ray cluster as a Ray job.

``--cluster cluster/X.yaml``: ``ray up`` (unless the head is already up), forward the head's dashboard
with ``ray dashboard``, ``ray job submit`` the search through it and follow its logs, ``--down`` tears
the cluster down afterwards. ``--address http://HOST:8265``: submit to a running cluster's dashboard
with ``JobSubmissionClient``. The commands themselves are built in :mod:`scoretune.launch`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELP = "run a search on a Ray cluster (a cluster/*.yaml config or a running cluster's dashboard) as a Ray job"

FORWARD_TIMEOUT_S = 180.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", help="search space YAML inside this repo (e.g. search_spaces/quickstart.yaml)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--cluster", metavar="CLUSTER_YAML",
                       help="Ray cluster-launcher config (cluster/local.yaml, cluster/aws-gpu.yaml, cluster/gcp-gpu.yaml)")
    where.add_argument("--address", metavar="URL",
                       help="dashboard of a running Ray cluster, e.g. http://127.0.0.1:8265")
    p.add_argument("--name", default=None, help="search name (default: the space's name)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI as seen from the cluster (default: the cluster config's, "
                        "else each node's MLFLOW_TRACKING_URI)")
    p.add_argument("--storage-path", default=None,
                   help="where the search keeps trials and checkpoints, reachable from every node "
                        "(s3://..., gs://..., NFS path; default: the cluster config's storage_path, else the space's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a space field, passed to scoretune search (e.g. --set num_samples=16)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job, e.g. --env SCORETUNE_DATA=/mnt/data (repeatable)")
    p.add_argument("--resume", action="store_true", help="pass --resume to scoretune search")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit without running anything")
    p.add_argument("--no-follow", action="store_true", help="submit and return; print how to follow the logs")
    p.add_argument("--down", action="store_true",
                   help="with --cluster: tear the cluster down when the job ends (its MLflow DB is copied back first)")
    p.add_argument("--dashboard-port", type=int, default=None,
                   help="with --cluster: local port for the forwarded dashboard (default 8265)")


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    from ..errors import UserError

    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected KEY=VALUE, e.g. --env SCORETUNE_DATA=/mnt/data")
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    from .. import launch as L
    from ..errors import UserError

    root = L.find_repo_root()
    space = L.repo_relative(args.space, root, "search space")
    name = L.validate_name(args.name or L.default_name(root / space))
    check_space(root / space, args.set)
    env = {**L.forwarded_credentials(os.environ), **_env_pairs(args.env)}
    if args.down and args.no_follow:
        raise UserError("--down waits for the job to end, so it cannot be combined with --no-follow")
    if args.address is not None:
        if args.down or args.dashboard_port is not None:
            raise UserError("--down and --dashboard-port only apply with --cluster")
        return _run_address(args, L, root, space, name, env)
    return _run_cluster(args, L, root, space, name, env)


def check_space(path: Path, sets: list[str]) -> None:
    """Validate the space and its ``--set`` overrides here, exactly as ``scoretune search`` will on the
    cluster, before any cluster command runs (a bad key would otherwise fail after ``ray up``)."""
    from ..search import load_space

    load_space(path, list(sets))


def _say(L, text: str, secrets: list[str], **kw) -> None:
    print(L.mask(text, secrets), **kw)


# ----------------------------------------------------------------------------- --address
def _normalize_address(address: str) -> str:
    return address if "://" in address else f"http://{address}"


def _run_address(args, L, root: Path, space: str, name: str, env: dict) -> int:
    from ..tracking import resolve_tracking_uri

    address = _normalize_address(args.address)
    uri = resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else None
    if args.storage_path and "://" not in args.storage_path:  # the job runs elsewhere: no relative paths
        args.storage_path = str(Path(args.storage_path).expanduser().absolute())
    ts = L.timestamp()
    secrets = L.secret_values(env, uri)
    if args.dry_run:
        print(f"# from {root}: submit the search as a Ray job" + ("" if args.no_follow else " and follow its logs"))
        _say(L, L.format_command(L.address_submit_command(
            address, space, name, ts, tracking_uri=uri, storage_path=args.storage_path, sets=args.set,
            resume=args.resume, env=env, follow=not args.no_follow)), secrets)
        return 0

    client = job_client(address)
    sid = client.submit_job(
        entrypoint=L.format_command(L.search_entrypoint(space, name, tracking_uri=uri, storage_path=args.storage_path,
                                                        sets=args.set, resume=args.resume)),
        submission_id=L.submission_id(name, ts),
        runtime_env=L.runtime_env(str(root), L.job_env(tracking_uri=uri, env=env)),
        metadata=L.job_metadata(name, space),
    )
    status_cmd = ["scoretune", "status", name, "--address", address] + (["--tracking-uri", uri] if uri else [])
    print(f"submitted Ray job {sid} (search {name!r}) to {address}")
    print(f"Ray dashboard: {address}")
    _say(L, L.mlflow_ui_hint(uri), secrets)
    _say(L, f"status: {L.format_command(status_cmd)}", secrets)
    if args.no_follow:
        print(f"logs:   {L.format_command(['ray', 'job', 'logs', '--address', address, '--follow', sid])}")
        return 0
    return _follow(client, sid, status_cmd, L, secrets)


def job_client(address: str):
    """A ``JobSubmissionClient`` for the dashboard at ``address``; when the cluster uses Ray token auth,
    the token this machine holds (see :func:`scoretune.launch.ray_auth_token`) is sent."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from .. import launch as L
    from ..errors import UserError

    try:
        try:
            return JobSubmissionClient(address)
        except AuthenticationError:
            token = L.ray_auth_token()
            if token is None:
                raise UserError(f"the Ray cluster at {address} requires its auth token: run `ray get-auth-token` on "
                                "its head and put the token in RAY_AUTH_TOKEN or ~/.ray/auth_token") from None
            return JobSubmissionClient(address, headers=L.auth_headers(token))
    except AuthenticationError as e:
        raise UserError(f"the Ray cluster at {address} refused this machine's auth token ({e}); set RAY_AUTH_TOKEN "
                        "to the head's token (`ray get-auth-token` there)") from None
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise UserError(f"cannot reach the Ray dashboard at {address} ({type(e).__name__}: {e}); start a cluster "
                        "(ray start --head) or forward one's dashboard (ray dashboard cluster/X.yaml)") from None


def _follow(client, sid: str, status_cmd: list[str], L, secrets: list[str]) -> int:
    """Stream the job's logs until it ends; 0 when it SUCCEEDED."""
    import asyncio

    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in client.tail_job_logs(sid):
            print(L.mask(lines, secrets), end="", flush=True)

    try:
        asyncio.run(tail())
        status = client.get_job_status(sid)
        while not status.is_terminal():
            time.sleep(1.0)
            status = client.get_job_status(sid)
    except KeyboardInterrupt:
        print(L.mask(f"\nstopped following; the job keeps running: {L.format_command(status_cmd)}", secrets),
              file=sys.stderr)
        return 130
    info = client.get_job_info(sid)
    print(f"job {sid}: {status.value}" + (f" ({info.message})" if info.message and status != JobStatus.SUCCEEDED
                                           else ""))
    return 0 if status == JobStatus.SUCCEEDED else 1


# ----------------------------------------------------------------------------- --cluster
def _ray_exe() -> str:
    """The ``ray`` next to this Python (same venv as scoretune), else the one on PATH."""
    sibling = Path(sys.executable).parent / "ray"
    return str(sibling) if sibling.exists() else (shutil.which("ray") or "ray")


def _relative_to(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else absolute."""
    p = path.expanduser().resolve()
    try:
        return p.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run_cluster(args, L, root: Path, space: str, name: str, env: dict) -> int:

    cfg = L.load_cluster_config(args.cluster)
    cluster = _relative_to(Path(args.cluster), root)  # the ray commands run from the repo root
    settings = L.cluster_settings(cfg)
    if env:
        settings = type(settings)(**{**settings.__dict__, "env": {**settings.env, **env}})
    port = args.dashboard_port or L.DASHBOARD_PORT
    uri = args.tracking_uri or settings.tracking_uri
    secrets = L.secret_values(settings.env, uri)
    renv_file = None
    if secrets and not args.dry_run:
        renv_file = L.write_runtime_env_file(L.runtime_env(".", L.job_env(tracking_uri=uri, env=settings.env),
                                                           with_working_dir=False))
    try:
        return _launch_cluster(args, L, root, cluster, cfg, settings, space, name, port, secrets, renv_file)
    finally:
        if renv_file:
            os.unlink(renv_file)


def _launch_cluster(args, L, root: Path, cluster: str, cfg: dict, settings, space: str, name: str, port: int,
                    secrets: list[str], renv_file: str | None) -> int:
    from ..errors import UserError

    login = L.check_credentials(settings, {**os.environ, **settings.env}, cluster)

    plan = L.cluster_plan(cluster, space, name, L.timestamp(), settings, tracking_uri=args.tracking_uri,
                          storage_path=args.storage_path, sets=args.set, resume=args.resume,
                          follow=not args.no_follow, down=args.down, dashboard_port=port,
                          runtime_env_file=renv_file)
    placeholders = L.find_placeholders(cfg)
    if args.dry_run:
        print(f"# from {root}")
        for i, (comment, argv) in enumerate(plan.steps(), 1):
            print(f"# {i}. {comment}")
            _say(L, L.format_command(argv), secrets)
        if placeholders:
            print(f"note: {cluster} still has CHANGE-ME placeholders: {', '.join(placeholders)}", file=sys.stderr)
        if login:
            print(f"note: {login}", file=sys.stderr)
        return 0
    if placeholders:
        raise UserError(f"{cluster}: replace the CHANGE-ME placeholders first ({', '.join(placeholders)}); "
                        "see the '# CHANGE ME' comments and cluster/README.md")
    if login:
        raise UserError(login)

    ray = _ray_exe()

    def argv(cmd: list[str]) -> list[str]:
        return [ray, *cmd[1:]] if cmd and cmd[0] == "ray" else cmd

    head = subprocess.run(argv(plan.head_check), cwd=root, capture_output=True, text=True)
    head_ip = head.stdout.strip().splitlines()[-1] if head.returncode == 0 and head.stdout.strip() else ""
    if head_ip:
        print(f"cluster {settings.cluster_name} is up (head {head_ip}); not running `ray up` "
              f"(run `ray up -y --no-restart {cluster}` yourself to push config changes)")
    else:
        print(f"$ {L.format_command(plan.up)}", flush=True)
        if subprocess.run(argv(plan.up), cwd=root).returncode != 0:
            raise UserError(f"`{L.format_command(plan.up)}` failed (its output is above): check your cloud "
                            f"credentials and quotas, and the CHANGE ME fields of {cluster}")

    if _port_open(port):
        raise UserError(f"local port {port} is already in use, so the dashboard cannot be forwarded there: "
                        "pass --dashboard-port with a free port")
    log = tempfile.NamedTemporaryFile(prefix="scoretune-forward-", suffix=".log", delete=False)
    print(f"$ {L.format_command(plan.forward)} &", flush=True)
    forward = subprocess.Popen(argv(plan.forward), cwd=root, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    rc, interrupted = 1, False
    try:
        deadline = time.monotonic() + FORWARD_TIMEOUT_S
        while not _port_open(port):
            if forward.poll() is not None or time.monotonic() > deadline:
                tail = Path(log.name).read_text(errors="replace")[-2000:]
                raise UserError(f"could not forward the dashboard of {cluster} to 127.0.0.1:{port} "
                                f"(is the cluster up? `ray status` via `ray exec {cluster} 'ray status'`): {tail}")
            time.sleep(1.0)
        print(f"Ray dashboard: {plan.dashboard}   (while this command runs)")
        _say(L, f"$ {L.format_command(plan.submit)}", secrets, flush=True)
        rc = subprocess.run(argv(plan.submit), cwd=root).returncode
    except KeyboardInterrupt:
        interrupted = True
    finally:
        _stop(forward)
        log.close()
        os.unlink(log.name)
    print()
    for line in L.cluster_hints(cluster, settings, name, plan.submission_id, port):
        print(line)
    if interrupted:
        print(f"stopped following; job {plan.submission_id} keeps running on the cluster"
              + (" and the cluster stays up (--down skipped)" if args.down else ""), file=sys.stderr)
        return 130
    if args.down:
        if plan.backup:
            print(f"$ {L.format_command(plan.backup)}", flush=True)
            if subprocess.run(argv(plan.backup), cwd=root).returncode != 0:
                print("warning: the tracking server's backup failed (its output is above)", file=sys.stderr)
        if plan.save_db:
            print(f"$ {L.format_command(plan.save_db)}", flush=True)
            if subprocess.run(argv(plan.save_db), cwd=root).returncode == 0:
                if plan.backup:
                    print(f"tracking server backups saved in {root / plan.save_db[-1]} (pg_restore them into a "
                          "PostgreSQL for `scoretune server`, see cluster/README.md)")
                else:
                    print(f"MLflow database saved: {root / plan.save_db[-1]} "
                          f"(mlflow ui --backend-store-uri sqlite:///{plan.save_db[-1]})")
        print(f"$ {L.format_command(plan.down)}", flush=True)
        if subprocess.run(argv(plan.down), cwd=root).returncode != 0:
            print(f"warning: `{L.format_command(plan.down)}` failed: run it again, or the nodes keep costing",
                  file=sys.stderr)
            return rc or 1
    return rc


def _stop(proc: subprocess.Popen) -> None:
    """End the port-forward we started (its own process group: ``ray dashboard`` and its ssh)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
