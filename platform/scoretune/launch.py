"""What ``scoretune launch`` runs, as data: pure functions that build commands, no Ray, no subprocess.

A search runs on a cluster as a Ray job whose entrypoint is ``scoretune search SPACE --name NAME``.
Two ways in:

* ``--cluster cluster/X.yaml`` (a Ray cluster-launcher config): ``ray up``, a port-forward of the
  head's dashboard (``ray dashboard``), ``ray job submit`` through it, optionally ``ray down``.
  :func:`cluster_plan` returns those commands; ``--dry-run`` prints them.
* ``--address http://HOST:8265`` (a running cluster's dashboard): ``JobSubmissionClient.submit_job``
  with :func:`runtime_env` (the repo as working dir) and :func:`job_metadata`.

Every command is meant to run from the repository root (:func:`find_repo_root`): the job's
working directory is the repo, uploaded by Ray, and the package ``platform/scoretune`` travels
as a ``py_module`` so the job always runs the code you have, whatever a node installed earlier.
Cluster YAMLs carry scoretune's own settings under ``metadata.scoretune`` (Ray ignores that
field): see :class:`ClusterSettings`.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import UserError
from .names import is_valid_name
from .names import validate_name as _validate_name
from .tracking import masked, uri_has_credentials

DASHBOARD_PORT = 8265  # Ray's default dashboard port, local and remote
PACKAGE_DIR = "platform/scoretune"
# gitignore-style patterns (Ray runtime_env ``excludes``); a leading "/" anchors at the repo root,
# no trailing "/" so a whole directory is skipped without walking it.
JOB_EXCLUDES = (
    ".git", "/.venv", "/runs", "/ray_results", "/mlruns", "/mlartifacts", "/data",
    "mlflow.db", "__pycache__", ".pytest_cache", "*.egg-info", "*.pt", "*.pth", "*.ckpt",
)
PLACEHOLDER = re.compile(r"change[-_ ]?me", re.IGNORECASE)
SECRET_KEY = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
MASK = "***"
METADATA_KEY = "scoretune_search"
SUBMISSION_PREFIX = "scoretune-"


# ----------------------------------------------------------------------------- names
def validate_name(name: str) -> str:
    """A search name (it becomes part of the job's submission id): the one rule of :mod:`scoretune.names`."""
    return _validate_name(name, "search name", "--name")


def default_name(space: str | Path) -> str:
    """The search name when ``--name`` is not given: the space's own ``name:`` (what ``scoretune search``
    uses), else the file's stem (``quickstart.yaml`` -> ``quickstart``)."""
    from .safe_yaml import YamlError, read

    try:
        own = (read(space) or {}).get("name")
    except (YamlError, AttributeError):
        own = None
    if is_valid_name(own):
        return own
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(space).stem).strip("-.") or "search"


def timestamp(now: float | None = None) -> str:
    """``YYYYmmdd-HHMMSS`` in local time; part of the submission id so that each launch is unique."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))


def submission_id(name: str, ts: str) -> str:
    """``scoretune-<name>-<ts>``: the Ray job's submission id (``scoretune status NAME`` finds it by prefix)."""
    return f"{SUBMISSION_PREFIX}{validate_name(name)}-{ts}"


def job_metadata(name: str, space: str) -> dict[str, str]:
    """Ray job metadata: ``scoretune_search=<name>`` is what ``scoretune status`` filters on."""
    return {METADATA_KEY: name, "scoretune_space": space}


def is_search_job(submission: str | None, metadata: Mapping[str, str] | None, name: str) -> bool:
    """Whether a Ray job (its submission id and metadata) belongs to the search ``name``."""
    if metadata and metadata.get(METADATA_KEY) == name:
        return True
    if not submission or not submission.startswith(f"{SUBMISSION_PREFIX}{name}-"):
        return False
    rest = submission[len(SUBMISSION_PREFIX) + len(name) + 1:]
    return re.fullmatch(r"\d{8}-\d{6}", rest) is not None  # not a longer name sharing the prefix


# ----------------------------------------------------------------------------- paths
def find_repo_root(start: str | Path | None = None) -> Path:
    """The scoretune checkout holding ``start`` (default: the working dir): the nearest parent with
    ``pyproject.toml`` and ``platform/scoretune/``."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() and (d / PACKAGE_DIR).is_dir():
            return d
    raise UserError(f"{here} is not inside a scoretune checkout (no pyproject.toml with {PACKAGE_DIR}/ above it): "
                    "run scoretune launch from the repository root")


def repo_relative(path: str | Path, root: Path, what: str) -> str:
    """``path`` as a POSIX path relative to ``root``; it must exist and lie inside the repo, since the
    job sees only the uploaded repository."""
    p = Path(path).expanduser()
    p = (p if p.is_absolute() else Path.cwd() / p).resolve()
    if not p.exists():
        raise UserError(f"{what} {path} does not exist")
    try:
        return p.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise UserError(f"{what} {path} is outside the repository {root}: the job only sees the uploaded repo, "
                        f"so put it under {root} (e.g. search_spaces/)") from None


# ----------------------------------------------------------------------------- cluster YAMLs
@dataclass(frozen=True)
class ClusterSettings:
    """scoretune's settings in a cluster YAML, under ``metadata: {scoretune: {...}}``.

    ``storage_path``: where Tune keeps the search's trials and checkpoints (``s3://``, ``gs://`` or a
    path shared by every node), passed to the search as ``--set storage_path=...``;
    ``tracking_uri``: the MLflow URI the search logs to; leave it unset to use the
    ``MLFLOW_TRACKING_URI`` each node exports (the configs here start an MLflow server on the head);
    ``mlflow_port``: that server's port on the head (for the forwarding hints);
    ``mlflow_server_dir``: the head's ``scoretune server --dir``; ``--down`` runs its ``--backup`` (pg_dump)
    and copies the dumps back before teardown;
    ``mlflow_db``: (older configs) a SQLite database on the head, copied back by ``--down``;
    ``mlflow_auth``: the server wants a login, so ``scoretune launch`` needs ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` in your shell (it passes them to the job, never prints them);
    ``env``: extra environment variables for the job (e.g. ``SCORETUNE_DATA``).
    """

    cluster_name: str
    storage_path: str | None = None
    tracking_uri: str | None = None
    mlflow_port: int | None = None
    mlflow_db: str | None = None
    mlflow_server_dir: str | None = None
    mlflow_auth: bool = False
    env: Mapping[str, str] = field(default_factory=dict)


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """Read a Ray cluster-launcher YAML; a one-line UserError when it is missing, malformed or not one."""
    from .config import ConfigError, read_yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"cluster config {path} not found: pick one of cluster/local.yaml, cluster/aws-gpu.yaml, "
                        "cluster/gcp-gpu.yaml (see cluster/README.md)")
    try:
        cfg = read_yaml(p)
    except ConfigError as e:
        raise UserError(f"cluster config {e}; fix the YAML (see cluster/README.md)") from None
    if "provider" not in cfg or "cluster_name" not in cfg:
        raise UserError(f"{path} is not a Ray cluster config (it needs cluster_name and provider); "
                        "KubeRay manifests are applied with kubectl, see cluster/README.md")
    return cfg


def cluster_settings(cfg: Mapping[str, Any]) -> ClusterSettings:
    """The :class:`ClusterSettings` of a loaded cluster config."""
    meta = ((cfg.get("metadata") or {}).get("scoretune") or {})
    env = {str(k): str(v) for k, v in (meta.get("env") or {}).items()}
    port = meta.get("mlflow_port")
    return ClusterSettings(
        cluster_name=str(cfg["cluster_name"]),
        storage_path=meta.get("storage_path") or None,
        tracking_uri=meta.get("tracking_uri") or None,
        mlflow_port=int(port) if port else None,
        mlflow_db=meta.get("mlflow_db") or None,
        mlflow_server_dir=meta.get("mlflow_server_dir") or None,
        mlflow_auth=bool(meta.get("mlflow_auth", False)),
        env=env,
    )


def find_placeholders(obj: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every string value still holding a ``CHANGE-ME`` placeholder."""
    found: list[str] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            found += find_placeholders(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += find_placeholders(v, f"{prefix}[{i}]")
    elif isinstance(obj, str) and PLACEHOLDER.search(obj):
        found.append(prefix)
    return found


# ----------------------------------------------------------------------------- secrets


def is_secret_env(key: str, value: str) -> bool:
    """An environment entry to keep out of logs and command lines: a key naming a key, secret, token or
    password, or a value that is a URI with credentials."""
    return bool(SECRET_KEY.search(key)) or uri_has_credentials(value)


def secret_values(env: Mapping[str, str], tracking_uri: str | None = None) -> list[str]:
    """Every secret string the job gets (env values of secret keys, credential-bearing URIs)."""
    out = [v for k, v in env.items() if v and is_secret_env(k, v)]
    if tracking_uri and uri_has_credentials(tracking_uri):
        out.append(tracking_uri)
    return sorted(set(out), key=len, reverse=True)


def mask(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret replaced: a credential URI by its masked form, anything else by ``***``."""
    for value in secrets:
        text = text.replace(value, masked(value) if uri_has_credentials(value) else MASK)
    return text


CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def forwarded_credentials(local_env: Mapping[str, str]) -> dict[str, str]:
    """The MLflow server credentials of this shell, passed to the job (never printed, never in a file that
    outlives the submission: a secret-bearing runtime env goes through a 0600 temp file)."""
    return {k: local_env[k] for k in CREDENTIAL_KEYS if local_env.get(k)}


def check_credentials(settings: ClusterSettings, env: Mapping[str, str], cluster: str) -> str | None:
    """When the cluster's MLflow server wants a login (``mlflow_auth: true``) and ``env`` (this shell plus
    ``--env``) has none, the one-line problem (the job would fail at its first MLflow write)."""
    if not settings.mlflow_auth or env.get("MLFLOW_TRACKING_TOKEN") or uri_has_credentials(settings.tracking_uri):
        return None
    missing = [k for k in CREDENTIAL_KEYS[:2] if not env.get(k)]
    if not missing:
        return None
    return (f"the MLflow server of {cluster} requires a login: export {' and '.join(missing)} (e.g. "
            "MLFLOW_TRACKING_USERNAME=admin and the admin password from your secret store); scoretune launch "
            "passes them to the job without printing them")


# ----------------------------------------------------------------------------- the job
def search_entrypoint(space: str, name: str, *, tracking_uri: str | None = None, storage_path: str | None = None,
                      sets: Sequence[str] = (), resume: bool = False) -> list[str]:
    """``scoretune search SPACE --name NAME [--tracking-uri U] [--set storage_path=S] [--set K=V...] [--resume]``:
    the job's entrypoint, as argv. ``storage_path`` (where Tune keeps the search's trials and checkpoints)
    overrides the space's: on a cluster it must be storage every node reaches (s3://, gs://, NFS)."""
    argv = ["scoretune", "search", space, "--name", validate_name(name)]
    if tracking_uri and not uri_has_credentials(tracking_uri):  # else it reaches the job as MLFLOW_TRACKING_URI only
        argv += ["--tracking-uri", tracking_uri]
    if storage_path:
        argv += ["--set", f"storage_path={storage_path}"]
    for item in sets:
        argv += ["--set", item]
    return argv + (["--resume"] if resume else [])


def job_env(*, tracking_uri: str | None = None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables for every process of the job (driver and trial workers, on every node)."""
    out = dict(env or {})
    if tracking_uri:
        out["MLFLOW_TRACKING_URI"] = tracking_uri
    return out


def runtime_env(working_dir: str, env_vars: Mapping[str, str] | None = None, *,
                with_working_dir: bool = True) -> dict[str, Any]:
    """The job's Ray runtime_env: the repo as ``working_dir`` (uploaded without ``.venv``, ``runs/``,
    ``mlflow.db``, ``ray_results``, ``.git``, data and checkpoints), ``platform/scoretune`` as a
    ``py_module`` (so it shadows whatever version a node installed), and ``env_vars``.

    ``working_dir`` is the repo root ('.' for the ``ray job submit`` CLI, which takes it as
    ``--working-dir``; pass ``with_working_dir=False`` to leave it out of the dict).
    """
    base = working_dir.rstrip("/") or "."
    module = PACKAGE_DIR if base == "." else f"{base}/{PACKAGE_DIR}"
    out: dict[str, Any] = {}
    if with_working_dir:
        out["working_dir"] = working_dir
    out["py_modules"] = [module]
    out["excludes"] = list(JOB_EXCLUDES)
    if env_vars:
        out["env_vars"] = dict(env_vars)
    return out


def runtime_env_args(renv: Mapping[str, Any], runtime_env_file: str | None) -> list[str]:
    """``--runtime-env-json JSON``, or ``--runtime-env FILE`` when the env holds secrets (``renv`` is then
    in that file, which the caller writes with mode 0600 and removes afterwards)."""
    env = renv.get("env_vars") or {}
    if any(is_secret_env(k, v) for k, v in env.items()):
        return ["--runtime-env", runtime_env_file or "RUNTIME_ENV_FILE"]
    return ["--runtime-env-json", json.dumps(dict(renv))]


def write_runtime_env_file(renv: Mapping[str, Any], directory: str | None = None) -> str:
    """Write ``renv`` as YAML to a new private file (0600); returns its path."""
    import os
    import tempfile

    import yaml

    fd, path = tempfile.mkstemp(prefix="scoretune-runtime-env-", suffix=".yaml", dir=directory)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(dict(renv), f)
    return path


# ----------------------------------------------------------------------------- Ray token auth
def ray_auth_token(env: Mapping[str, str] | None = None, home: str | Path | None = None) -> str | None:
    """The Ray auth token this machine holds, where Ray's own clients look: ``$RAY_AUTH_TOKEN``, else the
    file ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``; None when there is none.

    Ray >= 2.5x turns token authentication on for clusters started where a token exists; its dashboard
    then answers 401 to clients that send no ``Authorization: Bearer <token>`` header.
    """
    import os

    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else \
        Path(home if home is not None else Path.home()) / ".ray" / "auth_token"
    try:
        token = path.expanduser().read_text().strip()
    except OSError:
        return None
    return token or None


def auth_headers(token: str | None) -> dict[str, str]:
    """HTTP headers that authenticate to a token-protected Ray dashboard (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


# ----------------------------------------------------------------------------- command plans
def format_command(argv: Sequence[str]) -> str:
    """One shell-ready line (POSIX quoting), exactly what a user would paste."""
    return shlex.join(list(argv))


def dashboard_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class ClusterPlan:
    """The commands of ``scoretune launch --cluster``, in the order they run (all from the repo root)."""

    head_check: list[str]   # exit 0 (and prints the head IP) when the cluster is already up
    up: list[str]
    forward: list[str]      # long-running: forwards the head's dashboard to 127.0.0.1:<port>
    submit: list[str]
    save_db: list[str] | None  # with --down: copy the head's MLflow database (or its backups) back first
    down: list[str] | None
    submission_id: str
    dashboard: str          # the forwarded dashboard's URL
    backup: list[str] | None = None  # with --down and a `scoretune server` head: pg_dump on the head first

    def steps(self) -> list[tuple[str, list[str]]]:
        """(comment, argv) for each command, as ``--dry-run`` prints them."""
        out = [
            ("start the cluster (skipped when `ray get-head-ip` finds it up)", self.up),
            ("forward the head's dashboard to this machine (runs while the job is submitted/followed)", self.forward),
            ("submit the search as a Ray job" + ("" if "--no-wait" in self.submit else " and follow its logs"),
             self.submit),
        ]
        if self.backup:
            out.append(("back the head's tracking server up (pg_dump of its databases, on the head)", self.backup))
        if self.save_db:
            out.append(("copy the head's MLflow database here before teardown", self.save_db))
        if self.down:
            out.append(("tear the cluster down", self.down))
        return out


def cluster_plan(cluster: str, space: str, name: str, ts: str, settings: ClusterSettings, *,
                 tracking_uri: str | None = None, storage_path: str | None = None, sets: Sequence[str] = (),
                 resume: bool = False, follow: bool = True, down: bool = False,
                 dashboard_port: int = DASHBOARD_PORT, runtime_env_file: str | None = None) -> ClusterPlan:
    """The commands that run search ``name`` of ``space`` (both repo-relative) on the cluster of
    config ``cluster``. ``tracking_uri`` (else the config's ``tracking_uri``) is passed to the search
    and exported to the job; without either, each node's ``MLFLOW_TRACKING_URI`` applies.
    ``storage_path`` (else the config's) becomes the search's ``--set storage_path=...``.
    When the job's environment holds secrets, ``runtime_env_file`` names the file (written by the caller,
    mode 0600) that carries the runtime env instead of ``--runtime-env-json`` on the command line."""
    sid = submission_id(name, ts)
    uri = tracking_uri or settings.tracking_uri
    storage = storage_path or settings.storage_path
    env = job_env(tracking_uri=uri, env=settings.env)
    renv = runtime_env(".", env, with_working_dir=False)
    url = dashboard_url(dashboard_port)
    submit = ["ray", "job", "submit", "--address", url, "--submission-id", sid, "--working-dir", ".",
              *runtime_env_args(renv, runtime_env_file), "--metadata-json", json.dumps(job_metadata(name, space))]
    if not follow:
        submit.append("--no-wait")
    submit += ["--", *search_entrypoint(space, name, tracking_uri=uri, storage_path=storage, sets=sets,
                                        resume=resume)]
    save_db = backup = None
    if down and settings.mlflow_server_dir:
        d = settings.mlflow_server_dir.rstrip("/")
        backup = ["ray", "exec", cluster, f"scoretune server --dir {d} --backup {d}/backups"]
        save_db = ["ray", "rsync-down", cluster, f"{d}/backups/", f"mlflow-backup-{settings.cluster_name}/"]
    elif down and settings.mlflow_db:
        save_db = ["ray", "rsync-down", cluster, settings.mlflow_db, f"mlflow-{settings.cluster_name}.db"]
    return ClusterPlan(
        head_check=["ray", "get-head-ip", cluster],
        up=["ray", "up", "-y", cluster],
        forward=["ray", "dashboard", "--port", str(dashboard_port), cluster],
        submit=submit,
        save_db=save_db,
        down=["ray", "down", "-y", cluster] if down else None,
        submission_id=sid,
        dashboard=url,
        backup=backup,
    )


def address_submit_command(address: str, space: str, name: str, ts: str, *,
                           tracking_uri: str | None = None, storage_path: str | None = None,
                           sets: Sequence[str] = (), resume: bool = False,
                           env: Mapping[str, str] | None = None, follow: bool = True,
                           runtime_env_file: str | None = None) -> list[str]:
    """The ``ray job submit`` equivalent of ``scoretune launch --address`` (printed by ``--dry-run``)."""
    renv = runtime_env(".", job_env(tracking_uri=tracking_uri, env=env), with_working_dir=False)
    argv = ["ray", "job", "submit", "--address", address, "--submission-id", submission_id(name, ts),
            "--working-dir", ".", *runtime_env_args(renv, runtime_env_file),
            "--metadata-json", json.dumps(job_metadata(name, space))]
    if not follow:
        argv.append("--no-wait")
    return argv + ["--", *search_entrypoint(space, name, tracking_uri=tracking_uri, storage_path=storage_path,
                                            sets=sets, resume=resume)]


def cluster_hints(cluster: str, settings: ClusterSettings, name: str, sid: str,
                  dashboard_port: int = DASHBOARD_PORT) -> list[str]:
    """What to run afterwards to watch a search on a launched cluster (each line stands alone)."""
    ports = ["-p", str(dashboard_port)]
    if settings.mlflow_port and not settings.mlflow_server_dir:  # a server on the head's loopback (older configs)
        ports += ["-p", str(settings.mlflow_port)]
    follow = ["ray", "exec", cluster, f"ray job logs --address http://127.0.0.1:{DASHBOARD_PORT} --follow {sid}"]
    status = ["scoretune", "status", name, "--address", dashboard_url(dashboard_port)]
    if settings.mlflow_port:
        status += ["--tracking-uri", f"http://127.0.0.1:{settings.mlflow_port}"]
    lines = [
        f"follow the logs:   {format_command(follow)}",
        f"forward the UIs:   {format_command(['ray', 'attach', cluster, *ports])}   (keep it open)",
        f"  Ray dashboard:   {dashboard_url(dashboard_port)}",
    ]
    if settings.mlflow_port and settings.mlflow_server_dir:
        port = settings.mlflow_port
        lines.append(f"  MLflow UI:       http://127.0.0.1:{port}   after an SSH tunnel to the head's private address: "
                     f"ssh -N -L {port}:$(ray exec {cluster} 'hostname -I' | tail -1 | cut -d' ' -f1):{port} "
                     f"<ssh_user>@$(ray get-head-ip {cluster} | tail -1)   (see cluster/README.md)")
    elif settings.mlflow_port:
        lines.append(f"  MLflow UI:       http://127.0.0.1:{settings.mlflow_port}   (server on the head node)")
    lines += [
        f"  search status:   {format_command(status)}",
        f"stop the job:      {format_command(['ray', 'exec', cluster, f'ray job stop --address http://127.0.0.1:{DASHBOARD_PORT} {sid}'])}",
        f"tear down:         {format_command(['ray', 'down', '-y', cluster])}",
    ]
    return lines


def mlflow_ui_hint(tracking_uri: str | None) -> str:
    """Where to look at the runs of ``tracking_uri``: its URL for a server, else the ``mlflow ui`` line."""
    if not tracking_uri:
        return "MLflow: the cluster's MLFLOW_TRACKING_URI (set --tracking-uri to choose)"
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI: {tracking_uri}"
    return f"MLflow UI: {format_command(['mlflow', 'ui', '--backend-store-uri', tracking_uri])}"
