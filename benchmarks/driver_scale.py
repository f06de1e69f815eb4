#!/usr/bin/env python
"""How much of the search driver one reported result costs, and how that grows with the trial count.

A search built exactly as ``scoretune search`` builds it (:func:`scoretune.search.driver.build_tuner`:
TPE multivariate + constant liar behind the concurrency limit, ASHA on ``epoch``, SCORE's floor
stopper, the driver-side MLflow callback, the progress callback, Tune's checkpoint bookkeeping) whose
trial is a stand-in: it reports ``--epochs`` rows of synthetic engine metrics at once (a tiny
checkpoint each epoch, as the real trial does) and trains nothing. Ray runs locally with many logical
CPUs (``--num-cpus``, default 64), so ``--concurrent`` trials really run at once; the MLflow store is a
fresh SQLite file per size (or ``--tracking-uri`` for a server).

For each size (every ``--trials`` x ``--concurrent`` pair) it prints: driver CPU per reported result
(process CPU time of the driver, all its threads, during ``Tuner.fit``), Optuna CPU per suggestion (the
searcher's ``suggest``; and per ``tell``), the MLflow writes per second and their CPU per result, and
wall time; then, over the sizes, a fitted exponent of how each total grows with the trial count
(1.0 = linear). The last line is ``driver_ms_per_result <ms>`` for the largest size run.

With ``--stock`` each size also runs the same stand-in trials through stock Ray Tune in the same process and
the same Ray: ``OptunaSearch`` (the same space and seeded multivariate TPE sampler, its study in memory, Ray's
default) behind the same concurrency limit, the same ``ASHAScheduler``, Ray's ``MLflowLoggerCallback`` to a
fresh SQLite store, Tune's default per-trial loggers on, measured the same way; the two arms alternate
(``--repeat`` rounds, medians), and per size it prints ``driver_vs_stock <ours_ms> <stock_ms> <ratio>``.

    nice -n 10 python benchmarks/driver_scale.py --trials 100,300 --concurrent 32 --json out.json
    python benchmarks/driver_scale.py --trials 300 --concurrent 32 --stock

The synthetic metrics are seeded (the searcher's points are too), but the order in which concurrent
trials report is not, so trial outcomes and counts vary a little from run to run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "platform", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

_WRITES = ("create_run", "log_batch", "log_metric", "log_param", "set_tag", "set_terminated", "update_run",
           "log_text", "log_artifact", "log_figure", "delete_run", "log_inputs")
_READS = ("get_run", "search_runs", "get_experiment_by_name", "get_metric_history")


# ----------------------------------------------------------------------------- the stand-in trial


def standin_trial(config: dict[str, Any]) -> None:
    """Report ``epochs`` rows of synthetic engine metrics at once, with a tiny checkpoint each.

    ``val_pgd_acc`` is a smooth function of the sampled point (best near beta 4, lr 0.1, loss se) plus
    seeded noise, so TPE has something to find and ASHA something to stop; ``train_r_madry`` falls
    with the epoch, faster for small beta, so the floor stopper stops some trials."""
    import random

    from ray import tune

    beta = float(config.get("beta", 4.0))
    lr = float(config.get("lr", 0.1))
    loss = str(config.get("loss", "se"))
    clip = float(config.get("clip", 0.0))
    epochs = int(config["scoretune"]["base"]["epochs"])
    rng = random.Random(hash((round(beta, 6), round(lr, 6), loss, round(clip, 6))) & 0xFFFFFFFF)
    quality = 0.7 - 0.08 * math.log(beta / 4.0) ** 2 - 0.05 * math.log(lr / 0.1) ** 2 - 0.1 * clip
    quality -= {"se": 0.0, "kl": 0.01, "l1_sq": 0.03, "js": 0.04}.get(loss, 0.05)
    with tempfile.TemporaryDirectory(prefix="driver-scale-") as tmp:
        for epoch in range(1, epochs + 1):
            frac = 1.0 - math.exp(-epoch / 3.0)
            pgd = max(0.0, quality * frac + rng.gauss(0.0, 0.01))
            row = {
                "epoch": epoch, "train_loss": 1.5 * (1 - frac) + 0.3, "train_natural": 0.8 * (1 - frac) + 0.1,
                "train_robust": 0.5 * (1 - frac) + 0.1, "train_r_madry": 0.6 * math.exp(-epoch * 2.0 / beta),
                "train_clean_acc": 0.5 + 0.4 * frac, "train_adv_acc": 0.3 + 0.4 * frac,
                "val_clean_acc": min(1.0, pgd + 0.2), "val_pgd_acc": pgd, "train_time": 0.01,
                "epoch_time": 0.01, "lr": lr,
            }
            Path(tmp, "state.pt").write_bytes(b"0" * 1024)
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(tmp))


# ----------------------------------------------------------------------------- instrumentation


class Meter:
    """Counts and thread-CPU seconds of the MLflow client calls and the searcher's suggest/tell in this
    process (the driver; Tune calls the callbacks and the searcher from its one event-loop thread)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.cpu: dict[str, float] = {}
        self.results = 0
        self.inside = False

    def add(self, name: str, cpu: float) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    def reset(self) -> None:
        self.calls.clear()
        self.cpu.clear()
        self.results = 0

    def total(self, names) -> tuple[int, float]:
        return sum(self.calls.get(n, 0) for n in names), sum(self.cpu.get(n, 0.0) for n in names)


METER = Meter()


def _timed(name: str, fn):
    def wrapper(*a, **k):
        if METER.inside:  # a client method calling another (log_text -> log_artifact) counts once
            return fn(*a, **k)
        METER.inside = True
        t = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            METER.inside = False
            METER.add(name, time.thread_time() - t)

    wrapper.__wrapped__ = fn
    return wrapper


def instrument_mlflow() -> None:
    """Wrap the ``MlflowClient`` methods the driver uses (class-level, so every client counts)."""
    from mlflow.tracking import MlflowClient

    for n in _WRITES + _READS:
        fn = getattr(MlflowClient, n, None)
        if fn is not None and not hasattr(fn, "__wrapped__"):
            setattr(MlflowClient, n, _timed(f"mlflow.{n}", fn))


def _thread_timed(name: str, fn):
    def wrapper(self, *a, **k):
        t = time.thread_time()
        try:
            return fn(self, *a, **k)
        finally:
            METER.add(name, time.thread_time() - t)

    return wrapper


def timed_subclass(cls: type, part: str, methods: tuple[str, ...], extra: dict | None = None) -> type:
    """A subclass of ``cls`` whose ``methods`` add their thread CPU to ``part`` (swapped in with
    ``__class__`` on the object ``build_tuner`` made, so nothing else about it changes)."""
    body = {m: _thread_timed(part, getattr(cls, m)) for m in methods if hasattr(cls, m)}
    body.update(extra or {})
    return type(f"Timed{cls.__name__}", (cls,), body)


def timed_searcher_class():
    """The search's Optuna searcher with suggest (``optuna.suggest``), the per-result report to the study
    (``optuna.report``) and tell (``optuna.tell``) timed, and results counted."""
    from scoretune.search.tuner import StudySearcher

    class TimedOptunaSearch(StudySearcher):
        def suggest(self, trial_id):
            t = time.thread_time()
            try:
                return super().suggest(trial_id)
            finally:
                METER.add("optuna.suggest", time.thread_time() - t)

        def on_trial_result(self, trial_id, result):
            METER.results += 1
            t = time.thread_time()
            try:
                super().on_trial_result(trial_id, result)
            finally:
                METER.add("optuna.report", time.thread_time() - t)

        def on_trial_complete(self, trial_id, result=None, error=False):
            t = time.thread_time()
            try:
                super().on_trial_complete(trial_id, result, error)
            finally:
                METER.add("optuna.tell", time.thread_time() - t)

    return TimedOptunaSearch


_HOOKS = ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error", "on_step_end",
          "on_checkpoint", "on_experiment_end")


def instrument_tuner(tuner) -> None:
    """Time each part of the driver the search is made of: searcher (above), the MLflow callback, the
    progress callback, the scheduler (ASHA) and the stoppers; the rest of the driver is Tune and Ray."""
    local = tuner._local_tuner
    limiter = local._tune_config.search_alg
    limiter.searcher.__class__ = timed_searcher_class()
    sched = local._tune_config.scheduler
    sched.__class__ = timed_subclass(type(sched), "asha", ("on_trial_result", "on_trial_add", "on_trial_complete",
                                                           "choose_trial_to_run"))
    for cb in local._run_config.callbacks or ():
        part = "callback.mlflow" if "Mlflow" in type(cb).__name__ else "callback.progress"
        cb.__class__ = timed_subclass(type(cb), part, _HOOKS)
    stop = local._run_config.stop
    if stop is not None:
        stop.__class__ = timed_subclass(type(stop), "stoppers", ("__call__", "stop_all"))


# ----------------------------------------------------------------------------- one size


def space_for(trials: int, concurrent: int, epochs: int, storage: str, tracking_uri: str):
    from scoretune.search.space import SearchSpace

    return SearchSpace.model_validate({
        "name": f"scale-{trials}x{concurrent}",
        "base": {"data": {"name": "digits", "val_size": 0.1}, "model": {"name": "small_cnn"},
                 "objective": {"method": "trades", "loss": "se", "beta": 6.0}, "epochs": epochs,
                 "device": "cpu", "seed": 0},
        "params": {"beta": {"loguniform": [1.0, 10.0]}, "lr": {"loguniform": [0.05, 0.5]},
                   "loss": {"choice": ["se", "kl", "l1_sq", "js"]}, "clip": {"uniform": [0.0, 0.3]}},
        "objective": {"metric": "val_pgd_acc", "mode": "max"},
        "num_samples": trials, "max_concurrent": concurrent,
        "resources": {"workers": 1, "cpus": 1, "gpus": 0},
        "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
        "stoppers": {"floor": {"value": 0.05, "patience": 2}},
        "storage_path": storage, "tracking_uri": tracking_uri, "top_k": 0,
        "autoattack": {"version": "none"}, "seed": 0,
    })


def _silent(text: str) -> None:
    """The progress callback's sink (module-level, so Tune can pickle the callback)."""


PARTS = (("Optuna suggest", "optuna.suggest"), ("Optuna report", "optuna.report"), ("Optuna tell", "optuna.tell"),
         ("MLflow callback", "callback.mlflow"), ("progress callback", "callback.progress"), ("ASHA", "asha"),
         ("stoppers", "stoppers"))


def run_size(trials: int, concurrent: int, epochs: int, work: Path, tracking_uri: str | None,
             study_url: str | None, server: Any = None, round_no: int = 0) -> dict[str, Any]:
    import scoretune.search.driver as driver
    from ray import tune
    from scoretune.search.callback import start_parent_run
    from scoretune.search.driver import resolve_floor
    from scoretune.search.study import open_storage, study_storage_url
    from scoretune.tracking.buffer import journal_path, settle

    d = work / f"{trials}x{concurrent}-{round_no}"
    d.mkdir(parents=True)
    uri = tracking_uri or f"sqlite:///{d / 'mlflow.db'}"
    space = space_for(trials, concurrent, epochs, str(d / "ray"), uri)
    name = space.name
    storage, ray_path = driver.experiment_path(space.storage_path, name)
    # the study where `scoretune search` keeps it (optuna.db beside a SQLite store; a schema of the server's
    # PostgreSQL when --server); "memory": in memory, as before the study had a storage
    url = None if study_url == "memory" else (study_url or study_storage_url(uri, space.storage_path))
    study_storage = open_storage(url) if url else None
    floor = resolve_floor(space, _silent)
    parent = start_parent_run(space, name=name, ray_path=ray_path, tracking_uri=uri)
    original = driver.trainable_for
    driver.trainable_for = lambda _space: tune.with_resources(standin_trial, {"cpu": 1})
    try:
        tuner = driver.build_tuner(space, name=name, storage=storage, ray_path=ray_path, tracking_uri=uri,
                                   parent_run_id=parent.run_id, floor=floor, out=_silent,
                                   study_storage=study_storage)
    finally:
        driver.trainable_for = original
    instrument_tuner(tuner)
    METER.reset()
    server_cpu0 = server_cpu(server)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with driver.quiet_tune():
        results = tuner.fit()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    srv_cpu = server_cpu(server) - server_cpu0 if server is not None else None
    n_results = METER.results
    writes, mlflow_write_cpu = METER.total([f"mlflow.{n}" for n in _WRITES])
    reads, mlflow_read_cpu = METER.total([f"mlflow.{n}" for n in _READS])
    n_suggest, suggest_cpu = METER.total(["optuna.suggest"])
    n_tell, tell_cpu = METER.total(["optuna.tell"])
    parts = {key: METER.cpu.get(key, 0.0) for _, key in PARTS}
    parts["rest (Tune, Ray)"] = cpu - sum(parts.values())
    settle(driver.open_writer(uri, journal_path(ray_path, name)), what=name, timeout=60)
    errors = sum(1 for r in results if r.error)
    return {
        "trials": trials, "concurrent": concurrent, "epochs": epochs, "results": n_results, "errors": errors,
        "tracking_uri": uri.split("@")[-1], "study_storage": (url or "memory").split("@")[-1],
        "wall_s": wall, "driver_cpu_s": cpu, "driver_ms_per_result": 1000 * cpu / max(1, n_results),
        "optuna_suggest_ms": 1000 * suggest_cpu / max(1, n_suggest), "optuna_suggest_cpu_s": suggest_cpu,
        "optuna_tell_ms": 1000 * tell_cpu / max(1, n_tell), "optuna_tell_cpu_s": tell_cpu,
        "optuna_report_cpu_s": parts["optuna.report"],
        "mlflow_writes": writes, "mlflow_writes_per_s": writes / wall, "mlflow_reads": reads,
        "mlflow_cpu_s": mlflow_write_cpu + mlflow_read_cpu,
        "mlflow_ms_per_result": 1000 * (mlflow_write_cpu + mlflow_read_cpu) / max(1, n_results),
        "mlflow_callback_cpu_s": parts["callback.mlflow"], "tune_rest_cpu_s": parts["rest (Tune, Ray)"],
        "server_cpu_s": srv_cpu,
        "part_ms_per_result": {k: round(1000 * v / max(1, n_results), 3) for k, v in parts.items()},
        "calls": dict(sorted(METER.calls.items())),
        "call_cpu_s": {k: round(v, 4) for k, v in sorted(METER.cpu.items())},
    }


# ----------------------------------------------------------------------------- the same size through stock Ray Tune


def timed_stock_searcher_class():
    """Ray's ``OptunaSearch`` with suggest, the per-result report and tell timed and results counted, under
    the same names as our searcher's (so both arms are read the same way)."""
    from ray.tune.search.optuna import OptunaSearch

    return timed_subclass(OptunaSearch, "optuna.suggest", ("suggest",), {
        "on_trial_result": _counted_result(OptunaSearch.on_trial_result),
        "on_trial_complete": _thread_timed("optuna.tell", OptunaSearch.on_trial_complete),
    })


def _counted_result(fn):
    """``fn`` (a searcher's ``on_trial_result``) counting each result and timing it as ``optuna.report``."""
    timed = _thread_timed("optuna.report", fn)

    def on_trial_result(self, trial_id, result):
        METER.results += 1
        return timed(self, trial_id, result)

    return on_trial_result


def build_stock_tuner(space, *, storage: str, tracking_uri: str):
    """The stand-in trials through stock Ray Tune: ``OptunaSearch`` over our space's distributions with our
    sampler (seeded multivariate TPE, constant liar) and Ray's default in-memory study, behind the same
    ``ConcurrencyLimiter``; the same ``ASHAScheduler``; ``MLflowLoggerCallback`` to ``tracking_uri``; the same
    checkpoint settings. No stoppers, no progress callback: those are ours."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch
    from scoretune.search.study import build_sampler, optuna_space
    from scoretune.search.tuner import build_trial_scheduler

    from trainables.tune_trainable import SETTINGS_KEY

    p = space.primary
    searcher = OptunaSearch(space=optuna_space(space), metric=p.metric, mode=p.mode, sampler=build_sampler(space))
    run_config = tune.RunConfig(
        name=space.name, storage_path=storage,
        callbacks=[MLflowLoggerCallback(tracking_uri=tracking_uri, experiment_name=space.name)],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=space.keep_checkpoints, checkpoint_score_attribute=p.metric,
                                                checkpoint_score_order=p.mode),
        failure_config=tune.FailureConfig(max_failures=0), verbose=0,
    )
    tune_config = tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent),
                                  scheduler=build_trial_scheduler(space), num_samples=space.total_samples,
                                  reuse_actors=True)
    return tune.Tuner(tune.with_resources(standin_trial, {"cpu": 1}),
                      param_space={SETTINGS_KEY: {"base": {"epochs": space.base["epochs"]}}},
                      tune_config=tune_config, run_config=run_config)


def instrument_stock_tuner(tuner) -> None:
    """Time the stock arm's searcher, ASHA and MLflow callback under the names :func:`instrument_tuner` uses."""
    local = tuner._local_tuner
    local._tune_config.search_alg.searcher.__class__ = timed_stock_searcher_class()
    sched = local._tune_config.scheduler
    sched.__class__ = timed_subclass(type(sched), "asha", ("on_trial_result", "on_trial_add", "on_trial_complete",
                                                           "choose_trial_to_run"))
    for cb in local._run_config.callbacks or ():
        cb.__class__ = timed_subclass(type(cb), "callback.mlflow", _HOOKS)


@contextlib.contextmanager
def env_set(name: str, value: str):
    """``os.environ[name] = value`` inside the block, the previous value (or none) after it: scoretune's
    driver turns Tune's per-trial file loggers off process-wide, stock Tune has them on."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def run_stock(trials: int, concurrent: int, epochs: int, work: Path, round_no: int = 0) -> dict[str, Any]:
    """One size through stock Ray Tune (:func:`build_stock_tuner`), a fresh SQLite MLflow store; the same
    measures as :func:`run_size` (driver process CPU during ``Tuner.fit`` per result, suggest and tell CPU)."""
    import logging

    d = work / f"stock-{trials}x{concurrent}-{round_no}"
    d.mkdir(parents=True)
    uri = f"sqlite:///{d / 'mlflow.db'}"
    space = space_for(trials, concurrent, epochs, str(d / "ray"), uri)
    tuner = build_stock_tuner(space, storage=str(d / "ray"), tracking_uri=uri)
    instrument_stock_tuner(tuner)
    METER.reset()
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    with env_set("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0"):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        results = tuner.fit()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return summarize("stock", trials, concurrent, epochs, cpu, wall, sum(1 for r in results if r.error))


def summarize(arm: str, trials: int, concurrent: int, epochs: int, cpu: float, wall: float,
              errors: int) -> dict[str, Any]:
    """The stock arm's row from the meter: driver CPU per result, suggest/tell CPU, MLflow calls, parts."""
    n = METER.results
    n_suggest, suggest_cpu = METER.total(["optuna.suggest"])
    n_tell, tell_cpu = METER.total(["optuna.tell"])
    writes, write_cpu = METER.total([f"mlflow.{k}" for k in _WRITES])
    reads, read_cpu = METER.total([f"mlflow.{k}" for k in _READS])
    parts = {key: METER.cpu.get(key, 0.0) for _, key in PARTS}
    parts["rest (Tune, Ray)"] = cpu - sum(parts.values())
    return {
        "arm": arm, "trials": trials, "concurrent": concurrent, "epochs": epochs, "results": n, "errors": errors,
        "wall_s": wall, "driver_cpu_s": cpu, "driver_ms_per_result": 1000 * cpu / max(1, n),
        "optuna_suggest_ms": 1000 * suggest_cpu / max(1, n_suggest), "optuna_tell_ms": 1000 * tell_cpu / max(1, n_tell),
        "mlflow_writes": writes, "mlflow_calls_per_result": (writes + reads) / max(1, n),
        "mlflow_ms_per_result": 1000 * (write_cpu + read_cpu) / max(1, n),
        "part_ms_per_result": {k: round(1000 * v / max(1, n), 3) for k, v in parts.items()},
        "calls": dict(sorted(METER.calls.items())),
    }


def median_of(rows: list[dict[str, Any]], key: str) -> float:
    """The median of ``key`` over the repeated runs of one arm and size."""
    return statistics.median(r[key] for r in rows)


def driver_vs_stock_line(ours: list[dict[str, Any]], stock: list[dict[str, Any]]) -> str:
    """``driver_vs_stock <ours_ms> <stock_ms> <ratio>``: median driver CPU ms per result of each arm and
    ours / stock (<= 1.0: scoretune's extra features cost the driver nothing per result)."""
    a, b = median_of(ours, "driver_ms_per_result"), median_of(stock, "driver_ms_per_result")
    return f"driver_vs_stock {a:.2f} {b:.2f} {a / b:.3f}"


def stock_line(r: dict[str, Any]) -> str:
    """One stock run in the shape of the per-size line of our runs, with its parts."""
    labels = {key: label for label, key in PARTS}
    parts = ", ".join(f"{labels.get(k, k)} {v:.2f}" for k, v in r["part_ms_per_result"].items() if v)
    return (f"stock  {r['trials']:5d} x concurrent {r['concurrent']:3d}: {r['results']:6d} results, "
            f"driver {r['driver_ms_per_result']:6.2f} ms CPU/result, Optuna {r['optuna_suggest_ms']:6.2f} ms/suggest "
            f"{r['optuna_tell_ms']:5.2f} ms/tell, MLflow {r['mlflow_calls_per_result']:.2f} calls/result "
            f"({r['mlflow_ms_per_result']:5.2f} ms CPU/result), wall {r['wall_s']:6.1f} s, errors {r['errors']}\n"
            f"    ms CPU per result by part: {parts}")


# ----------------------------------------------------------------------------- a PostgreSQL-backed server


class ServerStack:
    """The team stack of the tests (``tests/server_stack.py``: PostgreSQL in a temp dir on a free loopback
    port, ``mlflow server --app-name basic-auth`` on it through :mod:`scoretune.tracking.server`, what
    ``scoretune server`` runs), with one fresh database and server per size; stopped by pid."""

    def __init__(self, workers: int) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        import server_stack

        self.workers = workers
        self.stack = server_stack.start_stack()
        self.pg = self.stack.pg
        os.environ.update(self.stack.client_env)  # this process logs to the servers as the admin, and
        os.environ.update(self.pg.env())  # opens the study in their PostgreSQL with its password file
        self.server = None
        self.database = None
        self._remove = server_stack.remove

    def fresh(self, database: str):
        self.stop_server()
        self.database = database
        self.server = self.stack.launch(database, workers=self.workers)
        self.server.wait_healthy(300)
        return self.server

    def study_url(self) -> str:
        """The study in the server's PostgreSQL, its own schema (what a cluster space gives as study_storage)."""
        from scoretune.search.study import study_storage_url

        return study_storage_url(self.pg.uri(self.database), str(self.stack.root))

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def stop(self) -> None:
        self.stop_server()
        self._remove(self.stack)


def server_cpu(stack: ServerStack | None) -> float:
    """CPU seconds so far of the MLflow server's process tree and PostgreSQL's (0 without a stack)."""
    if stack is None:
        return 0.0
    import psutil

    pids = []
    if stack.server is not None and stack.server.proc is not None:
        pids.append(stack.server.proc.pid)
    pg_pid = stack.pg.pid()
    if pg_pid:
        pids.append(pg_pid)
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
    return total


def growth_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x): y ~ x^k (None with fewer than two distinct x)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


GROWTH = (("driver CPU", "driver_cpu_s"), ("Optuna suggest CPU", "optuna_suggest_cpu_s"),
          ("Optuna report CPU", "optuna_report_cpu_s"), ("Optuna tell CPU", "optuna_tell_cpu_s"),
          ("MLflow callback CPU", "mlflow_callback_cpu_s"), ("MLflow client CPU", "mlflow_cpu_s"),
          ("MLflow writes", "mlflow_writes"), ("Tune/Ray rest CPU", "tune_rest_cpu_s"), ("results", "results"),
          ("wall", "wall_s"))


def run_ours(args: argparse.Namespace, stack: ServerStack | None, n: int, c: int, work: Path,
             round_no: int) -> dict[str, Any]:
    """One size through scoretune's driver (:func:`run_size`), its lines printed; under cProfile (the driver's
    main thread, where Tune's loop runs) with ``--profile``, whose top 15 by cumulative time it prints."""
    uri, study = args.tracking_uri, args.study_storage
    if stack is not None:
        uri = stack.fresh(f"scale_{n}x{c}").url
        study = study or stack.study_url()
    load0 = os.getloadavg()
    dump = Path(args.profile_out) / f"ours_{n}x{c}_r{round_no}.prof" if args.profile_out else None
    prof = profiled(dump=dump) if args.profile else contextlib.nullcontext()
    with prof:
        r = run_size(n, c, args.epochs, work, uri, study, stack, round_no)
    r["load"] = [load0, os.getloadavg()]
    srv = (f", server+PostgreSQL {1000 * r['server_cpu_s'] / max(1, r['results']):6.2f} ms CPU/result"
           if r["server_cpu_s"] is not None else "")
    print(f"trials {n:5d} x concurrent {c:3d}: {r['results']:6d} results, "
          f"driver {r['driver_ms_per_result']:6.2f} ms CPU/result, "
          f"Optuna {r['optuna_suggest_ms']:6.2f} ms/suggest {r['optuna_tell_ms']:5.2f} ms/tell, "
          f"MLflow {r['mlflow_writes_per_s']:6.1f} writes/s ({r['mlflow_ms_per_result']:5.2f} ms "
          f"CPU/result){srv}, wall {r['wall_s']:6.1f} s, errors {r['errors']}, "
          f"load {load0[0]:.1f}->{os.getloadavg()[0]:.1f}", flush=True)
    print("    ms CPU per result by part: " + ", ".join(
        f"{label} {r['part_ms_per_result'][key]:.2f}" for label, key in PARTS)
        + f", rest (Tune, Ray) {r['part_ms_per_result']['rest (Tune, Ray)']:.2f}", flush=True)
    return r


@contextlib.contextmanager
def profiled(top: int = 15, dump: Path | None = None):
    """cProfile over the block, then its ``top`` functions by cumulative time printed and, with ``dump``, the
    whole profile written there for ``pstats`` (profiling slows the driver, so a profiled run's CPU figures are
    not comparable with an unprofiled one's)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        if dump is not None:
            dump.parent.mkdir(parents=True, exist_ok=True)
            prof.dump_stats(dump)
        print(f"    cProfile of the driver's main thread, top {top} by cumtime (profiled: slower than measured):")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(top)


def print_stock_growth(sizes: list[tuple[int, int]], stock_rows: list[dict[str, Any]]) -> None:
    """The stock arm's driver CPU growth with the trial count per concurrency (total ~ trials^k)."""
    for c in sorted({c for _, c in sizes}):
        sel = [r for r in stock_rows if r["concurrent"] == c]
        k = growth_exponent([r["trials"] for r in sel], [r["driver_cpu_s"] for r in sel])
        if k is not None:
            print(f"stock growth with the trial count at concurrent {c}: driver CPU {k:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", default="100,300", help="comma-separated trial counts (default 100,300)")
    p.add_argument("--concurrent", default="32", help="comma-separated concurrency limits (default 32)")
    p.add_argument("--epochs", type=int, default=10, help="epochs each stand-in trial reports (default 10)")
    p.add_argument("--num-cpus", type=int, default=64, help="logical CPUs of the local Ray (default 64)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: a fresh SQLite store per size)")
    p.add_argument("--server", action="store_true",
                   help="log to a fresh PostgreSQL-backed MLflow server per size (basic-auth, loopback), the study "
                        "in a schema of the same PostgreSQL")
    p.add_argument("--server-workers", type=int, default=2, help="the server's uvicorn workers (default 2)")
    p.add_argument("--study-storage", default=None, metavar="URL",
                   help="the Optuna study's storage (default: where scoretune search puts it: optuna.db beside a "
                        "SQLite store, PostgreSQL with --server); 'memory' keeps it in memory")
    p.add_argument("--stock", action="store_true",
                   help="also run each size through stock Ray Tune (OptunaSearch TPE, ASHAScheduler, "
                        "MLflowLoggerCallback) in this process, alternating, and print driver_vs_stock per size")
    p.add_argument("--repeat", type=int, default=1, help="rounds per size (medians; default 1)")
    p.add_argument("--profile", action="store_true",
                   help="cProfile our driver's runs (each size's set-up included) and print the top 15 by "
                        "cumulative time")
    p.add_argument("--profile-out", default=None, metavar="DIR",
                   help="with --profile: also write each size's whole profile to DIR/ours_<n>x<c>_r<round>.prof")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write all results to OUT")
    args = p.parse_args(argv)
    sizes = [(int(n), int(c)) for c in args.concurrent.split(",") for n in args.trials.split(",")]

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    from benchmarks._common import machine_info

    info = machine_info()
    print(f"machine: {info}")
    print(f"load: {os.getloadavg()}", flush=True)
    instrument_mlflow()
    stack = ServerStack(args.server_workers) if args.server else None
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    rows, stock_rows = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="driver-scale-") as work:
            for n, c in sizes:
                ours, stock = [], []
                for k in range(args.repeat):
                    # alternate which arm goes first, so neither always gets the warmer (or quieter) machine
                    for arm in (("ours", "stock") if k % 2 == 0 else ("stock", "ours")):
                        if arm == "stock" and args.stock:
                            load0 = os.getloadavg()
                            r = run_stock(n, c, args.epochs, Path(work), k)
                            r["load"] = [load0, os.getloadavg()]
                            stock.append(r)
                            print(stock_line(r) + f", load {load0[0]:.1f}->{os.getloadavg()[0]:.1f}", flush=True)
                        elif arm == "ours":
                            ours.append(run_ours(args, stack, n, c, Path(work), k))
                rows += ours
                stock_rows += stock
                if stock:
                    print(driver_vs_stock_line(ours, stock), flush=True)
    finally:
        ray.shutdown()
        if stack is not None:
            stack.stop()
    growth: dict[str, dict[str, float | None]] = {}
    for c in sorted({c for _, c in sizes}):
        sel = [r for r in rows if r["concurrent"] == c]
        g = {key: growth_exponent([r["trials"] for r in sel], [r[key] for r in sel]) for _, key in GROWTH}
        growth[str(c)] = g
        if any(v is not None for v in g.values()):
            print(f"growth with the trial count at concurrent {c} (total ~ trials^k, linear k = 1): "
                  + ", ".join(f"{label} {g[key]:.2f}" for label, key in GROWTH if g[key] is not None))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": info, "load": os.getloadavg(), "argv": sys.argv[1:],
                                                   "sizes": rows, "stock": stock_rows,
                                                   "growth": growth}, indent=2))
    if stock_rows:
        print_stock_growth(sizes, stock_rows)
    largest = max(sizes)
    print(f"driver_ms_per_result "
          f"{median_of([r for r in rows if (r['trials'], r['concurrent']) == largest], 'driver_ms_per_result'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
