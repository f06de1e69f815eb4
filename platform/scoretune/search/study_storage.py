"""Where a search's Optuna study lives: an RDB storage, one study per search name.

* ``study_storage:`` in the space (any SQLAlchemy URL Optuna accepts, e.g. the cluster's
  ``postgresql://user@db-host/optuna``) wins;
* else, for a local MLflow store, a SQLite file beside it: ``sqlite:///DIR/mlflow.db`` ->
  ``sqlite:///DIR/optuna.db``; ``file:///DIR/mlruns`` -> ``sqlite:///DIR/optuna.db``;
* else, for an MLflow store in PostgreSQL (``postgresql://...``), the same database with Optuna's
  tables in their own schema ``optuna`` (``?options=-csearch_path=optuna``; created on first use):
  MLflow and Optuna both keep an ``alembic_version`` table, so they cannot share a schema;
* else (a tracking server, whose database the client does not see) ``optuna.db`` in the local Ray
  ``storage_path``; on a cluster give the server's PostgreSQL as ``study_storage`` (its own database or
  a URL with ``options=-csearch_path=optuna``). With a tracking server *and* remote Ray storage
  (``s3://``) and no ``study_storage`` there is no place for it: the study stays in memory (and in
  Ray's searcher checkpoint) as before, and the driver says so in one line.

``scoretune dashboard`` opens the same URL (:func:`study_storage_url`).

The study is named after the search (``--name``), so ``--resume`` (Ray restores the pickled searcher,
whose study points at the same URL) and the dashboard find it; a fresh search refuses a study of its
name that is already there (delete it or pick another name).
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

from ..errors import UserError

STUDY_FILE = "optuna.db"
SCHEMA = "optuna"


class StudyStorageError(UserError):
    """The Optuna study storage cannot be opened or already holds a study of this name."""


def study_storage_url(tracking_uri: str, storage_path: str, explicit: str | None = None) -> str | None:
    """The Optuna storage URL of a search (see the module docstring); None: no place for one."""
    if explicit:
        return explicit
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        db = Path(unquote(tracking_uri[len("sqlite:///"):]))
        return f"sqlite:///{db.parent / STUDY_FILE}"
    if parsed.scheme == "file":
        return f"sqlite:///{Path(unquote(parsed.path)).parent / STUDY_FILE}"
    if parsed.scheme.startswith("postgresql"):
        sep = "&" if parsed.query else "?"
        return f"{tracking_uri}{sep}options={quote(f'-csearch_path={SCHEMA}')}"
    if "://" not in storage_path:
        return f"sqlite:///{Path(storage_path).expanduser().absolute() / STUDY_FILE}"
    return None


def no_storage_note(tracking_uri: str, storage_path: str) -> str:
    return (f"note: the Optuna study is kept in memory and in Ray's searcher checkpoint only (the search logs to "
            f"{tracking_uri} and keeps Ray results in {storage_path}); set study_storage: (e.g. "
            "postgresql://user@db-host/mlflow?options=-csearch_path%3Doptuna) in the space to watch it with "
            "scoretune dashboard")


def open_storage(url: str):
    """An ``optuna.storages.RDBStorage`` for ``url`` (the SQLite folder is created); one line on failure."""
    import optuna

    sqlite = url.startswith("sqlite:///")
    lock = Path(unquote(url[len("sqlite:///"):]) + ".lock") if sqlite else None
    if lock is not None:
        lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        for attempt in range(3):
            try:
                with _file_lock(lock):  # two searches sharing a storage_path start at once: one creates the tables
                    _create_schema(url)
                    return optuna.storages.RDBStorage(url, heartbeat_interval=None,
                                                      engine_kwargs={"connect_args": {"timeout": 30}} if sqlite else None)
            except Exception as e:  # another client (host) created the tables in between: they are there now
                if attempt == 2 or not any(k in f"{type(e).__name__} {e}" for k in ("IntegrityError", "already exists")):
                    raise
                time.sleep(0.5 * (attempt + 1))
    except Exception as e:  # bad URL, missing driver, unreachable server
        raise StudyStorageError(f"study_storage: cannot open {url}: {type(e).__name__}: {str(e).splitlines()[0][:200]} "
                                "(check the URL, or leave study_storage out for a SQLite file beside the MLflow store)") from None


@contextlib.contextmanager
def _file_lock(path: Path | None):
    """An exclusive ``flock`` on ``path`` (None: no lock) for the block."""
    if path is None:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _create_schema(url: str) -> None:
    """``CREATE SCHEMA IF NOT EXISTS`` for a PostgreSQL URL whose ``options`` set a ``search_path``."""
    parsed = urlparse(url)
    if not parsed.scheme.startswith("postgresql"):
        return
    opts = " ".join(parse_qs(parsed.query).get("options", []))
    schema = next((o.split("=", 1)[1] for o in opts.split() if o.startswith("-csearch_path=")), None)
    if not schema or not schema.isidentifier():
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    finally:
        engine.dispose()


def study_exists(storage, name: str) -> bool:
    return any(s.study_name == name for s in storage.get_all_studies())


def refuse_existing(storage, url: str, name: str) -> None:
    """A fresh search must not append to another search's study of the same name. A study left by a start
    that never ran a trial (only warm-start trials, or none) is deleted and started again."""
    if study_exists(storage, name):
        import optuna

        sid = storage.get_study_id_from_name(name)
        own = [t for t in storage.get_all_trials(sid, deepcopy=False) if "scoretune.warm_start_run" not in t.user_attrs]
        if not own:
            optuna.delete_study(study_name=name, storage=storage)
            return
        raise StudyStorageError(f"--name: an Optuna study '{name}' already exists in {url} (from an earlier search "
                                f"whose Ray folder is gone); pass --name {name}-2, or delete it with `optuna delete-study "
                                f"--study-name {name} --storage {url}`")
