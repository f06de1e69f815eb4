"""Tracking that survives the tracking server: an ``MlflowClient`` stand-in whose writes are journaled on
local disk, sent in order, retried with backoff while the server is away, and replayable later.

    w = open_writer(uri, journal="runs/search/tracking-journal.jsonl", experiments={exp_id: "searches"})
    run = w.create_run(exp_id, run_name="trial 1", tags={...})       # a real id, or a provisional one
    w.log_batch(run.info.run_id, metrics=[Metric("val_pgd_acc", 0.4, ts, 3)])
    w.set_terminated(run.info.run_id, "FINISHED")
    w.drain(timeout=120); w.close()       # the journal stays on disk when something was not delivered

The write methods have ``MlflowClient``'s names and arguments (``create_run``, ``log_batch``, ``log_metric``,
``log_param``, ``set_tag``, ``set_terminated``, ``update_run``, ``log_text``); everything else (the reads:
``get_run``, ``search_runs``...) goes straight to the client.

How it behaves:

* **Ordered.** Every write is appended to the journal (JSON lines, one op each) and to an in-memory queue,
  then the queue is sent front first; a write is never sent before an earlier one that failed.
* **Degraded, not dead.** A transient failure (connection refused or reset, timeout, HTTP 5xx/429, 401/403
  while credentials are rotated) stops the flush; the search goes on, one line says ``tracking degraded``,
  and the next flush is tried after 1, 2, 4 ... 30 s (a TCP probe first, so a down server costs
  milliseconds, not MLflow's own retries). When the server is back, the queue is sent and one line says
  ``tracking recovered``. A write MLflow refuses for good (HTTP 4xx, e.g. a changed param, or one its
  client refuses, e.g. an artifact path with ``..``) is a *write error*, not an outage: reported (which
  write, why), counted and skipped; the journal keeps it (``scoretune sync`` then keeps the file).
* **Bounded.** At most ``max_pending`` unsent writes (``SCORETUNE_TRACKING_BUFFER_MAX``, default 100,000);
  past that new writes are dropped, counted and reported once.
* **Idempotent.** Metrics carry the timestamp taken when they were logged, and each (run, key, step) is
  written once by this writer, so a resend (a response lost when the server died mid-request) or a
  replay adds no second row (the SQL store drops exact duplicates). Parameters, tags, statuses and text
  artifacts are idempotent by nature.
* **Runs created while the server is down.** MLflow assigns run ids server-side, so ``create_run`` returns
  a provisional id (``pending-<key>``) when it cannot be sent; the queued creation carries the key as tag
  ``scoretune.write_key`` and, when it is delivered, every later op naming the provisional id (tag
  values such as ``mlflow.parentRunId`` too) is sent with the real one. A creation that is resent after
  an unclear failure first looks the run up by that tag, so it is never created twice.
* **Replay.** The journal holds every write of the writer's life (plus ``adopt_run`` for a run created
  before it, e.g. a search's parent run), so :func:`replay_journal` (``scoretune sync FILE``) rebuilds
  it on the same server (ids kept, nothing doubled) or on a fresh one (experiments and runs created anew,
  ids mapped). The journal is deleted by :meth:`BufferedWriter.close` when everything was delivered.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from ..errors import UserError
from . import masked, mlflow_error, resolve_tracking_uri, store_lock, tags
from .runs import search_by_tags

JOURNAL_FORMAT = "scoretune-tracking-journal"
JOURNAL_VERSION = 1
PENDING = "pending-"
DEFAULT_MAX_PENDING = 100_000
MAX_TEXT = 1 << 20  # a text artifact larger than this is not journaled
WRITE_OPS = ("create_run", "log_batch", "set_tag", "set_terminated", "update_run", "log_text", "delete_tag")
_OPEN: dict[str, "BufferedWriter"] = {}  # journal path -> the writer of this process (Tune pickles callbacks)
_LOCK = threading.Lock()


class TrackingBuffered(UserError):
    """The work finished but some writes did not reach MLflow: they are in a journal to replay."""


class JournalError(UserError):
    """A journal file that cannot be replayed (not one, corrupt, or from a newer scoretune)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def is_transient(e: BaseException) -> bool:
    """Whether a failed write may succeed later: the server is unreachable, overloaded, restarting or
    refusing credentials (rotated); a request the server understood and refused (4xx) is not, and neither
    is a write MLflow's client refuses itself (an artifact path with ``..``: an ``MlflowException`` whose
    code is MLflow's default INTERNAL_ERROR, 500, though no request failed)."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(e, MlflowException):
        code = e.get_http_status_code()
        if code in (401, 403, 408, 429):
            return True
        if code < 500:
            return False
        if isinstance(e, RestException):  # the server answered 5xx: overloaded, restarting, its store away
            return True
        # raised in this process with a 5xx code: a failed request (connection refused, timeout, retries
        # exhausted: "API request ... failed ..."), a store the OS failed (a locked or vanished SQLite
        # file), else a refusal that carries MLflow's default code
        return str(e.message).startswith("API request") or _os_failure(e)
    return isinstance(e, (OSError, TimeoutError, ConnectionError)) or type(e).__module__.startswith(
        ("requests", "urllib3"))


def _os_failure(e: BaseException) -> bool:
    """Whether ``e`` comes of an OS or database-connection failure (its cause chain, or its message)."""
    seen = 0
    cause: BaseException | None = e
    while cause is not None and seen < 10:
        if isinstance(cause, (OSError, TimeoutError)) or type(cause).__name__ in ("OperationalError", "TimeoutError"):
            return True
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    text = str(getattr(e, "message", e)).lower()
    return any(s in text for s in ("database is locked", "unable to open database", "disk i/o error",
                                   "connection refused", "timed out"))


@dataclass
class _RunInfo:
    run_id: str


@dataclass
class RunRef:
    """What ``create_run`` returns: ``.info.run_id`` as on an MLflow ``Run`` (possibly provisional)."""

    info: _RunInfo


def _metric(m: Any) -> dict[str, Any]:
    if isinstance(m, Mapping):
        return {"key": str(m["key"]), "value": float(m["value"]), "timestamp": int(m["timestamp"]),
                "step": int(m.get("step") or 0)}
    return {"key": m.key, "value": float(m.value), "timestamp": int(m.timestamp), "step": int(m.step or 0)}


def _kv(p: Any) -> dict[str, str]:
    if isinstance(p, Mapping):
        return {"key": str(p["key"]), "value": str(p["value"])}
    return {"key": p.key, "value": str(p.value)}


class BufferedWriter:
    """See the module docstring. ``experiments`` maps experiment ids to names (a replay into a fresh
    server creates them by name); ``out`` gets the degraded / recovered / error lines."""

    def __init__(self, tracking_uri: str | None, journal: str | os.PathLike | None, *,
                 experiments: Mapping[str, str] | None = None, max_pending: int | None = None,
                 out: Callable[[str], None] | None = None, backoff: tuple[float, float] = (1.0, 30.0),
                 replay: bool = False):
        self.uri = resolve_tracking_uri(tracking_uri)
        self.journal = Path(journal).absolute() if journal is not None else None
        self.experiments = dict(experiments or {})
        self.max_pending = int(max_pending or os.environ.get("SCORETUNE_TRACKING_BUFFER_MAX") or DEFAULT_MAX_PENDING)
        self.out = out or (lambda s: print(s, flush=True))
        self.backoff = backoff
        self.replay = replay
        self.pending: collections.deque[dict[str, Any]] = collections.deque()
        self.ids: dict[str, str] = {}          # provisional (or a replayed journal's) run id -> real id
        self.created: dict[str, str] = {}      # write key -> real run id
        self.old_ids: dict[str, str] = {}      # write key -> the run id a replayed journal knew it by
        self.errors: list[str] = []
        self.dropped = 0
        self.delivered = 0
        self.failed_sends = 0                  # sends that failed transiently (probes of a down server are not sends)
        self._logged: set[tuple[str, str, int]] = set()
        self._seq = 0
        self._client = None
        self._lock = threading.RLock()
        self._degraded_since: float | None = None
        self._delay = backoff[0]
        self._next_try = 0.0
        self._said_full = False
        self._file = None
        self._held = 0  # > 0: writes wait in the queue until release() (see hold())
        self.closed = False
        if self.journal is not None:
            self._open_journal()

    # ------------------------------------------------------------------ plumbing
    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            with store_lock(self.uri):
                self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def degraded(self) -> bool:
        return self._degraded_since is not None

    def _open_journal(self) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        if self.journal.exists() and self.journal.stat().st_size:
            n = 1
            while self.journal.with_name(f"{self.journal.name}.{n}").exists():
                n += 1
            kept = self.journal.with_name(f"{self.journal.name}.{n}")
            self.journal.rename(kept)
            self.out(f"tracking: an earlier journal with writes MLflow may not have is kept at {kept}; "
                     f"replay it with `scoretune sync {kept}`")
        fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", buffering=1)
        self._write_line({"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "tracking_uri": masked(self.uri),
                          "created": now_ms(), "experiments": self.experiments})

    def _write_line(self, obj: Mapping[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def _enqueue(self, op: str, run: str | None, args: dict[str, Any], *, key: str | None = None,
                 journal: bool = True) -> dict[str, Any] | None:
        with self._lock:
            if len(self.pending) >= self.max_pending:
                self.dropped += 1
                if not self._said_full:
                    self._said_full = True
                    self.out(f"tracking buffer full ({self.max_pending} unsent writes): dropping new writes "
                             "until MLflow is back (raise SCORETUNE_TRACKING_BUFFER_MAX)")
                return None
            self._seq += 1
            entry = {"seq": self._seq, "op": op, "run": run, "args": args}
            if key:
                entry["key"] = key
            if journal:
                self._write_line(entry)
            last = self.pending[-1] if self.pending else None
            if self._held and op == "log_batch" and last is not None and last["op"] == "log_batch" \
                    and last["run"] == run and not last.get("retry"):
                for part in ("metrics", "params", "tags"):  # one call (MLflow's client splits big batches)
                    last["args"][part] = last["args"][part] + args[part]
                return last
            self.pending.append(entry)
            return entry

    def hold(self) -> None:
        """Keep writes in the queue until the matching :meth:`release`: consecutive ``log_batch`` writes to
        one run are sent as one call (the search's Tune callback holds the writer for each Tune step)."""
        with self._lock:
            self._held += 1

    def release(self) -> None:
        """End one :meth:`hold`; the last one sends the queue."""
        with self._lock:
            self._held = max(0, self._held - 1)
        self._send()

    def _send(self) -> None:
        """Send the queue now, unless a :meth:`hold` keeps it."""
        if not self._held:
            self.flush()

    def _resolve(self, run_id: str | None) -> str | None:
        return self.ids.get(run_id, run_id) if run_id else run_id

    def _resolve_value(self, v: str) -> str:
        return self.ids.get(v, v) if isinstance(v, str) else v

    # ------------------------------------------------------------------ writes (MlflowClient names)
    def create_run(self, experiment_id: str, start_time: int | None = None, tags: Mapping[str, Any] | None = None,
                   run_name: str | None = None) -> RunRef:
        key = uuid.uuid4().hex
        provisional = PENDING + key
        all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        all_tags[_WRITE_KEY] = key
        args = {"experiment_id": str(experiment_id), "experiment": self.experiments.get(str(experiment_id)),
                "run_name": run_name, "tags": all_tags, "start_time": int(start_time or now_ms())}
        self._enqueue("create_run", provisional, args, key=key)
        self.flush()
        return RunRef(_RunInfo(self.ids.get(provisional, provisional)))

    def log_batch(self, run_id: str, metrics: Iterable[Any] = (), params: Iterable[Any] = (),
                  tags: Iterable[Any] = (), synchronous: bool | None = None) -> None:
        ms = []
        for m in metrics:
            d = _metric(m)
            k = (run_id, d["key"], d["step"])
            if k in self._logged:  # once per (run, key, step)
                continue
            self._logged.add(k)
            ms.append(d)
        ps, ts = [_kv(p) for p in params], [_kv(t) for t in tags]
        if ms or ps or ts:
            self._enqueue("log_batch", run_id, {"metrics": ms, "params": ps, "tags": ts})
            self._send()

    def log_metric(self, run_id: str, key: str, value: float, timestamp: int | None = None,
                   step: int | None = None, **_: Any) -> None:
        self.log_batch(run_id, metrics=[{"key": key, "value": value, "timestamp": timestamp or now_ms(),
                                         "step": step or 0}])

    def log_param(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> None:
        self.log_batch(run_id, params=[{"key": key, "value": value}])

    def set_tag(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> None:
        self._enqueue("set_tag", run_id, {"key": str(key), "value": str(value)})
        self._send()

    def delete_tag(self, run_id: str, key: str) -> None:
        self._enqueue("delete_tag", run_id, {"key": str(key)})
        self._send()

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        self._enqueue("set_terminated", run_id, {"status": status or "FINISHED", "end_time": int(end_time or now_ms())})
        self._send()

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        self._enqueue("update_run", run_id, {"status": status, "name": name})
        self._send()

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        if len(text) > MAX_TEXT:  # too big to journal: straight to the server (raises when it is down)
            self.flush(force=True)
            self.client.log_text(self._resolve(run_id), text, artifact_file)
            return
        self._enqueue("log_text", run_id, {"text": text, "artifact_file": artifact_file})
        self._send()

    def adopt_run(self, run_id: str) -> None:
        """Journal a run that was created without this writer (read from the server now), as delivered:
        a replay into a fresh server creates it again, with its name, tags and params."""
        run = self.client.get_run(run_id)
        exp = self.client.get_experiment(run.info.experiment_id)
        self.experiments[exp.experiment_id] = exp.name
        key = uuid.uuid4().hex
        with self._lock:
            self._seq += 1
            self._write_line({"seq": self._seq, "op": "create_run", "run": PENDING + key, "key": key,
                              "args": {"experiment_id": exp.experiment_id, "experiment": exp.name,
                                       "run_name": run.info.run_name,
                                       "tags": {k: v for k, v in run.data.tags.items()
                                                if not k.startswith("mlflow.") or k == tags.PARENT},
                                       "start_time": run.info.start_time}})
            self._write_line({"created": key, "run_id": run_id})
            self._seq += 1
            self._write_line({"seq": self._seq, "op": "log_batch", "run": run_id,
                              "args": {"metrics": [], "tags": [],
                                       "params": [{"key": k, "value": v} for k, v in run.data.params.items()]}})

    # ------------------------------------------------------------------ reads: straight to the client
    def get_run(self, run_id: str):
        return self.client.get_run(self._resolve(run_id))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.client, name)

    # ------------------------------------------------------------------ sending
    def _probe(self) -> bool:
        """For a server: does ``/health`` answer 200 within 2 s? (A restarting server accepts connections
        before its workers serve them; a write sent then would wait out MLflow's 30 s timeout.)"""
        import urllib.request

        if urlsplit(self.uri).scheme not in ("http", "https"):
            return True
        base = self.uri.rstrip("/")
        parts = urlsplit(base)
        if parts.username or parts.password:  # no credentials in the probe: /health needs none
            base = f"{parts.scheme}://{parts.hostname}:{parts.port}" if parts.port else f"{parts.scheme}://{parts.hostname}"
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"{base}/health", timeout=2.0) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False

    def flush(self, force: bool = False) -> bool:
        """Send the queue, front first; True when it is empty. While degraded, sends only when the
        backoff delay has passed (or ``force``)."""
        with self._lock:
            if not self.pending:
                return True
            if self.degraded and not force and time.monotonic() < self._next_try:
                return False
            if self.degraded and not self._probe():
                self._backoff(None)
                return False
            while self.pending:
                op = self.pending[0]
                try:
                    self._apply(op)
                except Exception as e:  # noqa: BLE001 - classified below
                    if is_transient(e):
                        self.failed_sends += 1
                        op["retry"] = True
                        self._backoff(e)
                        return False
                    self._error(op, e)
                else:
                    self.delivered += 1
                self.pending.popleft()
            if self.degraded:
                self.out(f"tracking recovered: MLflow at {masked(self.uri)} is back; buffered writes delivered "
                         f"after {time.monotonic() - self._degraded_since:.0f} s")
                self._degraded_since = None
                self._delay = self.backoff[0]
            return True

    def _backoff(self, e: BaseException | None) -> None:
        if not self.degraded:
            self._degraded_since = time.monotonic()
            self._delay = self.backoff[0]
            reason = mlflow_error(e) if e is not None else "connection refused"
            where = f"buffered in {self.journal}" if self.journal else "buffered in memory"
            self.out(f"tracking degraded: MLflow at {masked(self.uri)} is not answering ({reason}); the work goes "
                     f"on, writes are {where} and retried with backoff")
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
        else:
            self._delay = min(self._delay * 2, self.backoff[1])
        self._next_try = time.monotonic() + self._delay

    def _error(self, op: Mapping[str, Any], e: BaseException) -> None:
        msg = f"{describe_write(op, self._resolve(op.get('run')))}: {mlflow_error(e)}"
        self.errors.append(msg)
        if len(self.errors) <= 5:
            kept = f" (the journal {self.journal} keeps it)" if self.journal is not None else ""
            self.out(f"tracking: MLflow refused a write, not an outage: {msg}; it is skipped{kept}")

    def drain(self, timeout: float) -> bool:
        """Flush until the queue is empty or ``timeout`` seconds have passed (backing off in between)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.flush(force=True):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(max(0.05, min(self._next_try, deadline) - time.monotonic()))

    def close(self) -> int:
        """Close the journal; delete it when every write was delivered. Returns the unsent count."""
        with self._lock:
            unsent = len(self.pending)
            if self.closed:
                return unsent
            self.closed = True
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None
                if unsent == 0 and not self.dropped and self.journal is not None:
                    self.journal.unlink(missing_ok=True)
            if self.errors and not self.replay:  # a replay's caller reports them (scoretune sync)
                self.out(f"tracking: {len(self.errors)} write(s) refused by MLflow (first: {self.errors[0]})")
            if self.journal is not None:
                with _LOCK:
                    if _OPEN.get(str(self.journal)) is self:
                        del _OPEN[str(self.journal)]
            return unsent

    # ------------------------------------------------------------------ one op
    def _experiment_id(self, args: Mapping[str, Any]) -> str:
        from . import get_or_create_experiment

        name = args.get("experiment")
        if not self.replay or not name:
            return str(args["experiment_id"])
        return get_or_create_experiment(self.client, name)

    def _find_created(self, key: str, args: Mapping[str, Any]) -> str | None:
        """The run created earlier with write key ``key`` (its journal id when it exists on this server,
        else by tag ``scoretune.write_key``), or None."""
        from mlflow.exceptions import MlflowException

        old = self.old_ids.get(key)
        if old:
            try:
                run = self.client.get_run(old)
                if run.info.lifecycle_stage == "active":
                    return old
            except MlflowException as e:  # 404 (a fresh server) or 403: not there for us
                if e.get_http_status_code() >= 500:
                    raise
        exp = self._experiment_id(args)
        found = search_by_tags(self.client, [exp], {_WRITE_KEY: key}, max_results=2)
        return found[0].info.run_id if found else None

    def _apply(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind, run, a = op["op"], self._resolve(op.get("run")), op["args"]
        cl = self.client
        if kind == "create_run":
            key = op["key"]
            real = self.created.get(key)
            if real is None and (op.get("retry") or self.replay):
                real = self._find_created(key, a)
            if real is None:
                run_tags = {k: self._resolve_value(v) for k, v in a["tags"].items()}
                if self.replay:
                    run_tags.setdefault(_WRITE_KEY, key)
                real = cl.create_run(self._experiment_id(a), start_time=a.get("start_time"), tags=run_tags,
                                     run_name=a.get("run_name")).info.run_id
            self.created[key] = real
            self.ids[op["run"]] = real
            if key in self.old_ids:
                self.ids[self.old_ids[key]] = real
            if not self.replay:
                self._write_line({"created": key, "run_id": real})
        elif kind == "log_batch":
            cl.log_batch(run, metrics=[Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in a["metrics"]],
                         params=[Param(p["key"], p["value"]) for p in a["params"]],
                         tags=[RunTag(t["key"], self._resolve_value(t["value"])) for t in a["tags"]])
        elif kind == "set_tag":
            cl.set_tag(run, a["key"], self._resolve_value(a["value"]))
        elif kind == "delete_tag":
            try:
                cl.delete_tag(run, a["key"])
            except Exception as e:  # already gone (a replay): fine
                if is_transient(e):
                    raise
        elif kind == "set_terminated":
            cl.set_terminated(run, status=a["status"], end_time=a["end_time"])
        elif kind == "update_run":
            cl.update_run(run, status=a.get("status"), name=a.get("name"))
        elif kind == "log_text":
            cl.log_text(run, a["text"], a["artifact_file"])
        else:  # pragma: no cover - the journal reader only admits WRITE_OPS
            raise ValueError(f"unknown op {kind}")


_WRITE_KEY = tags.WRITE_KEY


def describe_write(op: Mapping[str, Any], run: str | None = None) -> str:
    """Which write ``op`` is, in a few words: ``write 7 (log_text of '../x.txt' to run abc)``."""
    a = op.get("args") or {}
    run = run or op.get("run") or ""
    what = {"log_text": lambda: f"log_text of {a.get('artifact_file')!r}",
            "set_tag": lambda: f"set_tag {a.get('key')!r}",
            "delete_tag": lambda: f"delete_tag {a.get('key')!r}",
            "set_terminated": lambda: f"set_terminated {a.get('status')}",
            "create_run": lambda: (f"create_run {a.get('run_name')!r} in experiment "
                                   f"{a.get('experiment') or a.get('experiment_id')!r}"),
            "log_batch": lambda: "log_batch of " + ", ".join(
                f"{len(a.get(k) or [])} {k}" for k in ("metrics", "params", "tags") if a.get(k))}.get(
        str(op.get("op")), lambda: str(op.get("op")))()
    where = f" to run {run}" if run and op.get("op") != "create_run" else ""
    return f"write {op.get('seq', '?')} ({what}{where})"


def open_writer(tracking_uri: str | None, journal: str | os.PathLike, **kw: Any) -> BufferedWriter:
    """The process's writer for ``journal`` (made on first use): a Tune callback (pickled, so it cannot
    hold one) and the search driver that built it share the same writer, queue and journal."""
    path = str(Path(journal).absolute())
    with _LOCK:
        w = _OPEN.get(path)
        if w is None or w.closed:
            w = _OPEN[path] = BufferedWriter(tracking_uri, path, **kw)
        else:
            w.experiments.update(kw.get("experiments") or {})
        return w


# ---------------------------------------------------------------------- replay (scoretune sync)
@dataclass
class ReplayReport:
    runs: int
    writes: int
    errors: list[str]
    unsent: int
    skipped_tail: bool


def read_journal(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]:
    """``(header, ops, created)`` of a journal: the header, the write ops in order, and write key -> the
    run id the journal's server gave that run. A torn last line (the writer was killed mid-line) is
    ignored; anything else malformed is a :class:`JournalError` naming the line."""
    p = Path(path)
    if not p.is_file():
        raise JournalError(f"{path}: no such file (scoretune search prints the journal's path when MLflow "
                           "stayed unreachable)")
    try:
        lines = p.read_text(encoding="utf-8", errors="strict").splitlines()
    except UnicodeDecodeError as e:
        raise JournalError(f"{path} is not a scoretune tracking journal (not UTF-8 text: byte {e.object[e.start]:#04x} "
                           f"at offset {e.start}); pass the tracking-journal.jsonl file a search named") from None
    except OSError as e:
        raise JournalError(f"{path} cannot be read ({e.strerror or type(e).__name__})") from None
    if not lines:
        raise JournalError(f"{path} is empty: not a scoretune tracking journal")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != JOURNAL_FORMAT:
        raise JournalError(f"{path} is not a scoretune tracking journal (its first line has no "
                           f"\"format\": \"{JOURNAL_FORMAT}\")")
    version = header.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise JournalError(f"{path}: the journal version {version!r} on its first line is not a version scoretune "
                           f"writes (1 to {JOURNAL_VERSION}); the file is corrupt or was edited")
    if version > JOURNAL_VERSION:
        raise JournalError(f"{path} was written by a newer scoretune (journal version {header['version']}); "
                           "upgrade scoretune to replay it")
    ops: list[dict[str, Any]] = []
    created: dict[str, str] = {}
    for n, line in enumerate(lines[1:], start=2):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break  # torn last line
            raise JournalError(f"{path}: line {n} is not JSON; the journal is corrupt") from None
        if not isinstance(obj, dict):
            raise JournalError(f"{path}: line {n} is not a journal entry")
        if "created" in obj:
            created[str(obj["created"])] = str(obj["run_id"])
            continue
        if obj.get("op") not in WRITE_OPS or not isinstance(obj.get("args"), dict):
            raise JournalError(f"{path}: line {n} has an unknown op {obj.get('op')!r}; only {', '.join(WRITE_OPS)} "
                               "are replayed")
        if obj["op"] == "create_run" and not isinstance(obj.get("key"), str):
            raise JournalError(f"{path}: line {n}: a create_run without its write key")
        ops.append(obj)
    return header, ops, created


def replay_journal(path: str | os.PathLike, tracking_uri: str | None, *,
                   out: Callable[[str], None] | None = None, timeout: float = 60.0) -> ReplayReport:
    """Send every write of journal ``path`` to ``tracking_uri`` in order (see the module docstring:
    runs found again or created, ids mapped, nothing doubled)."""
    header, ops, created = read_journal(path)
    w = BufferedWriter(tracking_uri, None, experiments=header.get("experiments") or {}, out=out, replay=True,
                       max_pending=len(ops) + 1)
    w.old_ids = dict(created)
    by_old = {old: PENDING + key for key, old in created.items()}
    for op in ops:
        run = op.get("run")
        run = by_old.get(run, run)
        args = dict(op["args"])
        w._enqueue(op["op"], run, args, key=op.get("key"), journal=False)
    ok = w.drain(timeout)
    w.close()
    return ReplayReport(runs=len(w.created), writes=w.delivered, errors=list(w.errors),
                        unsent=0 if ok else len(w.pending), skipped_tail=False)


# ---------------------------------------------------------------------- where journals live, and the end
DRAIN_ENV = "SCORETUNE_TRACKING_DRAIN_S"
DEFAULT_DRAIN_S = 120.0


def journal_dir() -> Path:
    """``$SCORETUNE_TRACKING_JOURNAL_DIR``, else ``~/.cache/scoretune/tracking`` (local disk of the driver)."""
    return Path(os.environ.get("SCORETUNE_TRACKING_JOURNAL_DIR") or Path.home() / ".cache" / "scoretune" / "tracking")


def journal_path(ray_path: str, name: str) -> Path:
    """A search's journal: ``<ray_path>/tracking-journal.jsonl`` when its Ray folder is local, else a file
    named after the search in :func:`journal_dir` (the same path on every call for the same search)."""
    if "://" not in ray_path:
        return Path(ray_path) / "tracking-journal.jsonl"
    import hashlib

    return journal_dir() / f"{name}-{hashlib.sha1(ray_path.encode()).hexdigest()[:10]}.jsonl"


def default_journal(run_id: str) -> Path:
    return journal_dir() / f"{run_id}.jsonl"


def settle(writer: BufferedWriter, *, what: str, parent_run_id: str | None = None,
           timeout: float | None = None) -> None:
    """The end of a piece of work: wait up to ``timeout`` s (``$SCORETUNE_TRACKING_DRAIN_S``, default 120)
    for MLflow to take every buffered write, then close the journal. When it does not come back, the
    parent run's end (FINISHED) is journaled too and :class:`TrackingBuffered` says where the journal is
    and how to replay it."""
    timeout = float(os.environ.get(DRAIN_ENV, DEFAULT_DRAIN_S)) if timeout is None else timeout
    if writer.drain(timeout):
        writer.close()
        return
    if parent_run_id:
        writer.set_terminated(parent_run_id, status="FINISHED")
    unsent = writer.close()
    raise TrackingBuffered(
        f"{what} finished, but MLflow at {masked(writer.uri)} did not come back within {timeout:.0f} s: "
        f"{unsent} writes are kept in {writer.journal}; replay them with `scoretune sync {writer.journal}` "
        "once the server is up (add --tracking-uri for another server)")


def replay_leftover(journal: str | os.PathLike, tracking_uri: str, out: Callable[[str], None] = print) -> None:
    """Before a resumed search goes on: replay the journal an earlier attempt left (its driver was killed,
    or MLflow was away when it ended) into ``tracking_uri`` -- delivered writes are no-ops, the others land
    -- and delete it; when MLflow refuses some, it is kept for ``scoretune sync``."""
    path = Path(journal)
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        report = replay_journal(path, tracking_uri, out=out, timeout=30.0)
    except JournalError as e:
        out(f"tracking: the earlier journal {path} cannot be replayed ({e}); it is left as it is")
        return
    if report.unsent or report.errors:
        refused = f" and {len(report.errors)} were refused (first: {report.errors[0]})" if report.errors else ""
        out(f"tracking: {report.unsent} write(s) of the earlier attempt did not reach MLflow{refused}; they stay in "
            f"the journal, replay it later with `scoretune sync FILE` (it is moved aside next)")
        return
    path.unlink()
    out(f"tracking: replayed the earlier attempt's journal ({report.writes} writes, nothing doubled)")
