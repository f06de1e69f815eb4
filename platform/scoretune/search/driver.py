"""Running a search: a Ray Tune ``Tuner`` with Optuna behind a concurrency limit, ASHA on ``epoch``,
SCORE's floor stopper, driver-side MLflow logging and live progress lines.

    space = load_space("search_spaces/quickstart.yaml")
    summary = run_search(space)                      # or run_search(space, resume=True)

Before Ray starts, the driver checks the name (one rule, see :mod:`scoretune.names`; the experiment
folder must stay inside ``storage_path``), loads the base experiment's dataset once (a missing or
corrupt dataset is one error line, not one failed trial each) and resolves the floor (:func:`resolve_floor_estimate`). Ray is started
or joined through :func:`scoretune.drivers.ray_session.ray_session`.

* Trials: :func:`trainables.tune_trainable.scoretune_trial` (see :mod:`.tuner`). A failing trial (NaN
  loss, OOM, a bad value) is marked failed with its error and the search goes on.
* Resume: ``Tuner.restore(path, resume_unfinished=True, restart_errored=True)`` with the space saved in
  the state file (:mod:`.resume`); the MLflow parent run and the child runs are found again by their
  tags, so nothing is logged twice; the runs Tune will not continue are ended and checkpoints its snapshot
  names but pruning deleted are put back (:mod:`.resume`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from ..config import ExperimentConfig, pin_data_paths
from ..drivers.ray_session import ray_session
from ..errors import UserError
from ..floor_estimate import FloorEstimate, clip_for_floor, estimate_floor
from ..names import inside, validate_name
from ..tracking import (
    TrackingUnreachable,
    check_artifacts_writable,
    client,
    masked,
    mlflow_error,
    resolve_tracking_uri,
    tags,
)
from ..tracking.buffer import is_transient, journal_path, open_writer, replay_leftover, settle
from .callback import MlflowSearchCallback, ProgressCallback, experiment_id_for, log_metrics, start_parent_run
from .confirm import run_confirmation
from .finalize import finalize_search
from .report import SearchSummary
from .resume import (SnapshotKeeper, attempt_label, end_superseded, read_state, repair_snapshot,
                     restore_pruned_checkpoints, saved_trials, write_state)
from .space import SearchSpace
from .study import (
    abandon_running,
    importance_figure,
    importance_metrics,
    n_startup_trials,
    no_storage_note,
    open_storage,
    param_importances,
    refuse_existing,
    study_storage_url,
    warm_start_trials,
)
from .tuner import (
    build_searcher,
    build_stoppers,
    build_trial_scheduler,
    combined_stopper,
    interrupted,
    quiet_tune,
    trainable_for,
    trial_name,
    trial_settings,
)


def experiment_path(storage_path: str, name: str) -> tuple[str, str]:
    """``(storage, ray_path)``: the Ray storage root (absolute when local) and the search's experiment
    folder in it; a local folder that would leave the root is refused."""
    if "://" in storage_path:
        return storage_path, f"{storage_path.rstrip('/')}/{name}"
    storage = str(Path(storage_path).expanduser().absolute())
    inside(storage, name)
    return storage, f"{storage}/{name}"


def check_dataset(base: dict[str, Any]) -> None:
    """Load the dataset of ``base`` (the base experiment with its data paths pinned, as the trials get
    it) once; a missing or corrupt dataset raises a one-line UserError before any trial starts."""
    cfg = ExperimentConfig.model_validate(base)
    d = cfg.data
    if "://" in str(d.root):
        return  # remote data: only the trials can read it
    from ..data import load_dataset

    try:
        load_dataset(d.name, root=d.root, val_size=d.val_size, seed=cfg.seed, ddpm_path=d.ddpm_path, **d.options)
    except (UserError, ValueError, OSError) as e:
        text = " ".join(str(e).split()).replace("--set data.", "--set base.data.")
        raise UserError(f"base.data: {text} (no trial was started)") from None


def check_trusted_storage(ray_path: str) -> None:
    """``Tuner.restore`` unpickles the experiment state, searcher and callbacks it finds in ``ray_path``:
    whoever can write there can run code in this process. Remote storage (s3://, gs://) must be trusted
    (say so in its access policy); a local folder that another user can write, or that is not ours, is
    refused."""
    import stat

    if "://" in ray_path:
        return
    for d in (Path(ray_path), Path(ray_path).parent):  # the experiment folder and its storage root
        st = d.stat()
        open_to_others = st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX
        if open_to_others or st.st_uid not in (0, os.getuid()):
            raise UserError(f"refusing to resume from {ray_path}: {d} can be written by another user (mode "
                            f"{stat.filemode(st.st_mode)}, owner uid {st.st_uid}), and resuming unpickles what "
                            "is there; keep the search in a folder only you can write (chmod o-w)")


def run_search(space: SearchSpace, *, name: str | None = None, resume: bool = False, tracking_uri: str | None = None,
               address: str | None = None, space_text: str | None = None,
               out: Callable[[str], None] = print) -> SearchSummary | None:
    """Run (or with ``resume`` continue) the search; returns its summary (None when interrupted).

    The Ray experiment lives at ``space.storage_path/NAME``; a fresh search refuses to overwrite an
    existing one (resume it, or pick another ``name``).
    """
    from ray import tune

    name = space.name if name is None else validate_name(name, "search name", "--name")
    storage, ray_path = experiment_path(space.storage_path, name)
    if resume:
        if not tune.Tuner.can_restore(ray_path):
            raise UserError(f"nothing to resume: no search '{name}' in {storage} (run it without --resume first)")
        check_trusted_storage(ray_path)
        repair_snapshot(ray_path, out)
        state = read_state(ray_path)
        space = SearchSpace.model_validate(state["space"])
        uri = state["tracking_uri"]
        if tracking_uri and resolve_tracking_uri(tracking_uri) != uri:
            raise UserError(f"search '{name}' logs to {uri}; resume it there (drop --tracking-uri or pass that URI)")
        check_dataset(state.get("trial_base") or pin_data_paths(space.base))  # as pinned when it started
        parent_run_id = state["parent_run_id"]
        attempt = int(state.get("attempt", 1)) + 1
        label = attempt_label(name, attempt)
        with ray_session(address, out=out):
            out(f"resuming search '{name}' from {ray_path} (its saved space is used; attempt {attempt})")
            if state.get("study_storage"):
                out(f"the Optuna study '{name}' in {state['study_storage']} goes on")
            write_state(ray_path, {**state, "attempt": attempt})
            cl = client(uri)
            replay_leftover(journal_path(ray_path, name), uri, out)  # what a killed attempt may not have sent
            open_writer(uri, journal_path(ray_path, name)).adopt_run(parent_run_id)
            cl.update_run(parent_run_id, status="RUNNING")
            end_superseded(cl, parent_run_id, saved_trials(ray_path), label, out)
            restore_pruned_checkpoints(ray_path, out)
            tuner = tune.Tuner.restore(ray_path, trainable=trainable_for(space), resume_unfinished=True,
                                       restart_errored=True)
            return _fit(tuner, space, name=name, uri=uri, parent_run_id=parent_run_id, ray_path=ray_path,
                        superseded_by=label, out=out, study_url=state.get("study_storage"), floor=state.get("floor"))
    if tune.Tuner.can_restore(ray_path):
        raise UserError(f"search '{name}' already exists in {ray_path}: add --resume to continue it, pass "
                        f"--name {name}-2 to start another, or delete that folder")
    uri = resolve_tracking_uri(tracking_uri or space.tracking_uri)
    check_dataset(pin_data_paths(space.base))
    estimate = resolve_floor_estimate(space, out)  # the floor (auto: exact toy posterior or a cached proxy)
    floor = estimate.floor if estimate is not None and space.stoppers.floor is not None else None
    space = apply_floor(space, estimate)  # base objective.clip: auto -> the floor's clip
    trial_base = pin_data_paths(space.base)
    study_url = study_storage_url(uri, space.storage_path, space.study_storage)
    study_storage = open_storage(study_url) if study_url else None
    if study_storage is not None:
        refuse_existing(study_storage, study_url, name)
    else:
        out(no_storage_note(uri, space.storage_path))
    warm = warm_start_trials(client(uri), space, out)  # before anything is written
    check_artifacts_writable(client(uri), experiment_id_for(uri, space.experiment_name))  # before Ray starts
    with ray_session(address, out=out):
        parent = start_parent_run(space, name=name, ray_path=ray_path, tracking_uri=uri, space_text=space_text)
        parent_run_id = parent.run_id
        try:
            log_floor(parent, estimate)
            open_writer(uri, journal_path(ray_path, name)).adopt_run(parent_run_id)  # a replay can recreate it
            tag_study(client(uri), parent_run_id, study_url, name, warm)
            write_state(ray_path, {"space": space.model_dump(by_alias=True, exclude_none=True), "tracking_uri": uri,
                                   "parent_run_id": parent_run_id, "floor": floor, "name": name, "attempt": 1,
                                   "trial_base": trial_base, "study_storage": study_url})
            tuner = build_tuner(space, name=name, storage=storage, ray_path=ray_path, tracking_uri=uri,
                                parent_run_id=parent_run_id, floor=floor, out=out, study_storage=study_storage,
                                warm_trials=warm.trials if warm else ())
        except BaseException as e:  # nothing ran: the parent run ends, not left RUNNING
            client(uri).set_terminated(parent_run_id, status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        if study_url:
            out(f"Optuna study '{name}' in {study_url} (watch it: scoretune dashboard --search {name})")
        if warm and warm.trials and space.sampler.type == "tpe":
            n = n_startup_trials(space)
            out(f"TPE starts at once: {len(warm.trials)} warm-start trial(s) >= its {n} start-up trial(s)"
                if len(warm.trials) >= n else
                f"TPE starts after {n - len(warm.trials)} random trial(s) ({len(warm.trials)} of its {n} start-up "
                "trials come from the warm start)")
        return _fit(tuner, space, name=name, uri=uri, parent_run_id=parent_run_id, ray_path=ray_path,
                    superseded_by=attempt_label(name, 1), out=out, study_url=study_url, floor=floor)


def _fit(tuner: Any, space: SearchSpace, *, name: str, uri: str, parent_run_id: str, ray_path: str,
         superseded_by: str, out: Callable[[str], None], study_url: str | None = None,
         floor: float | None = None) -> SearchSummary | None:
    """Run the tuner; finalize the search and run its confirmation stage (:mod:`.confirm`), or
    (interrupted) mark the parent run KILLED."""
    out(f"MLflow: {uri}  experiment '{space.experiment_name}'  parent run {parent_run_id}")
    out(f"Ray results: {ray_path}")
    with quiet_tune():
        results = tuner.fit()
    writer = open_writer(uri, journal_path(ray_path, name))  # the MLflow callback's buffered writer
    if interrupted(results, ray_path, space.total_samples):
        writer.set_terminated(parent_run_id, status="KILLED")
        writer.drain(10.0)
        if writer.close():
            out(f"MLflow did not take every write; they are kept in {writer.journal} (scoretune sync replays it)")
        out(f"search '{name}' interrupted; continue it with --resume")
        return None
    settle(writer, what=f"search '{name}'", parent_run_id=parent_run_id)
    try:
        summary = finalize_search(space, results, name=name, tracking_uri=uri, parent_run_id=parent_run_id,
                                  ray_path=ray_path, superseded_by=superseded_by, out=out)
    except Exception as e:
        raise summary_unfinished(e, name, uri) from None
    if study_url:
        try:  # bookkeeping of the study only: the finished search is already recorded
            stuck = abandon_running(open_storage(study_url), name)
        except Exception as e:
            out(f"note: could not check the Optuna study for trials left RUNNING: {type(e).__name__}: {e}")
            stuck = 0
        if stuck:
            out(f"{stuck} Optuna trial(s) a killed attempt had asked for were never run: marked FAIL in the study")
        summary.importance = study_importance(study_url, name, space, uri, parent_run_id, out)
    else:
        out("parameter importance not computed: the study has no storage (set study_storage: in the space)")
    if space.confirm is not None:
        summary.confirmed = run_confirmation(space, summary, name=name, uri=uri, parent_run_id=parent_run_id,
                                             ray_path=ray_path, floor=floor, superseded_by=superseded_by, out=out)
        if summary.confirmed is None:
            client(uri).set_terminated(parent_run_id, status="KILLED")
            out(f"search '{name}' interrupted in its confirmation stage; continue it with --resume (seeds that "
                "finished are not trained again)")
            return None
    return summary


class SummaryUnfinished(UserError):
    """Every trial ended and is in MLflow, but MLflow went away while the search's summary was written."""


def summary_unfinished(e: Exception, name: str, uri: str) -> Exception:
    """What to raise when finalizing search ``name`` failed with ``e``: a server that went away (a
    transient error) is one :class:`SummaryUnfinished` line that says how to finish the summary (finalizing
    is idempotent, so ``--resume`` of the finished search only writes what is missing); anything else is
    ``e`` itself."""
    if not (is_transient(e) or isinstance(e, TrackingUnreachable)):
        return e
    return SummaryUnfinished(
        f"search '{name}' finished and its trials are in MLflow, but MLflow at {masked(uri)} went away while "
        f"the summary (models, AutoAttack, plots, parent run) was written ({type(e).__name__}: "
        f"{mlflow_error(e)}); once it is up, rerun the same command with --resume to finish it (no trial is "
        "trained again)")


def study_importance(study_url: str, name: str, space: SearchSpace, uri: str, parent_run_id: str,
                     out: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Parameter importance per objective from the search's Optuna study, logged on the parent run
    (metrics + ``importance.png``); {} (and one line) when it cannot be computed."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=open_storage(study_url))
        imp = param_importances(study, space.objective)
        log_importance(client(uri), parent_run_id, imp)
    except Exception as e:  # importance is a report: never lose the finished search over it
        out(f"parameter importance not computed: {type(e).__name__}: {e}")
        return {}
    if not imp:
        out("parameter importance not computed: fewer than 3 finished trials")
    return imp


def tag_study(cl: Any, parent_run_id: str, study_url: str | None, name: str, warm: Any) -> None:
    """The parent run's tags: where its Optuna study is and what it warm-started from."""
    if study_url:
        cl.set_tag(parent_run_id, tags.OPTUNA_STORAGE, study_url)
        cl.set_tag(parent_run_id, tags.OPTUNA_STUDY, name)
    if warm is not None:
        cl.set_tag(parent_run_id, tags.WARM_START_FROM, warm.source)
        cl.set_tag(parent_run_id, tags.WARM_START_TRIALS, str(len(warm.trials)))
        cl.set_tag(parent_run_id, tags.WARM_START_RUNS, ",".join(warm.parent_run_ids))


def build_tuner(space: SearchSpace, *, name: str, storage: str, ray_path: str, tracking_uri: str,
                parent_run_id: str, floor: float | None, out: Callable[[str], None] = print,
                study_storage: Any = None, warm_trials: Any = ()):
    """The ``Tuner`` of a fresh search (searcher, scheduler, stoppers, MLflow + progress callbacks); the
    Optuna study ``name`` in ``study_storage`` (None: in memory), started from ``warm_trials``."""
    from ray import tune

    from trainables.tune_trainable import SETTINGS_KEY

    stoppers = build_stoppers(space, floor)
    mlflow_cb = MlflowSearchCallback(space, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                                     experiment_id=experiment_id_for(tracking_uri, space.experiment_name),
                                     stoppers=stoppers, floor=floor, journal=str(journal_path(ray_path, name)))
    p = space.primary
    run_config = tune.RunConfig(
        name=name, storage_path=storage, stop=combined_stopper(stoppers),
        callbacks=[mlflow_cb, ProgressCallback(space, stoppers, out, judge=mlflow_cb.verdict), SnapshotKeeper(ray_path)],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=space.keep_checkpoints, checkpoint_score_attribute=p.metric,
                                                checkpoint_score_order=p.mode),
        failure_config=tune.FailureConfig(max_failures=0), verbose=0,
    )
    tune_config = tune.TuneConfig(
        search_alg=build_searcher(space, storage=study_storage, study_name=name, warm_trials=warm_trials),
        scheduler=build_trial_scheduler(space), num_samples=space.total_samples,
        reuse_actors=True, trial_name_creator=trial_name, trial_dirname_creator=trial_name,
    )
    settings = trial_settings(space, name=name, ray_path=ray_path)
    return tune.Tuner(trainable_for(space), param_space={SETTINGS_KEY: settings},
                      tune_config=tune_config, run_config=run_config)


# ----------------------------------------------------------------------------- the floor (C^l1)^2/2 of the floor stopper (Corollary 1)
def floor_cache_dir(space: SearchSpace) -> Path | None:
    """Where the proxies of ``estimate: auto`` are cached: ``storage_path/floor_cache`` (local storage
    only; None for remote storage, where each search trains its own)."""
    if "://" in space.storage_path:
        return None
    return Path(space.storage_path).expanduser().absolute() / "floor_cache"


def _base_clip_auto(space: SearchSpace) -> bool:
    return (space.base.get("objective") or {}).get("clip") == "auto"


def resolve_floor_estimate(space: SearchSpace, out: Callable[[str], None] = print) -> FloorEstimate | None:
    """The floor estimate of the search (None without a floor stopper or ``clip: auto``)."""
    f = space.stoppers.floor
    if f is None and not _base_clip_auto(space):
        return None
    if f is not None and f.value is not None:
        return FloorEstimate(float(f.value), float("nan"), float("nan"), 0, "given", "stoppers.floor.value")
    base = space.base_config()
    key = "stoppers.floor.estimate" if f is not None else "base.objective.clip"
    if f is not None and f.proxy_checkpoint is not None:
        est = _from_checkpoint(space, f)
    else:
        est = estimate_floor(base, cache_dir=floor_cache_dir(space), samples=f.samples if f else 512,
                             proxy_epochs=f.proxy_epochs if f else None, proxy_beta=f.proxy_beta if f else None,
                             floor_key=key, out=out)
    out(est.line())
    return est


def resolve_floor(space: SearchSpace, out: Callable[[str], None] = print) -> float | None:
    """The floor of the floor stopper (None without one)."""
    if space.stoppers.floor is None:
        return None
    est = resolve_floor_estimate(space, out)
    return None if est is None else est.floor


def apply_floor(space: SearchSpace, est: FloorEstimate | None) -> SearchSpace:
    """``space`` with ``base.objective.clip: auto`` replaced by :func:`clip_for_floor` of the floor
    (and clip_mode 'smoothing'); unchanged otherwise."""
    if est is None or not _base_clip_auto(space):
        return space
    base = dict(space.base)
    base["objective"] = {**base["objective"], "clip": clip_for_floor(est.floor), "clip_mode": "smoothing"}
    return SearchSpace.model_validate({**space.model_dump(by_alias=True, exclude_none=True), "base": base})


def log_floor(logger: Any, est: FloorEstimate | None) -> None:
    """The floor on the search's parent run: params and metrics ``floor``, ``floor_c_l1``,
    ``floor_c_l1_se``, ``floor_n``; tags ``scoretune.floor.source`` / ``.detail`` / ``.cache``."""
    if est is None:
        return
    values = {"floor": est.floor, "floor_c_l1": est.c_l1, "floor_c_l1_se": est.c_l1_se, "floor_n": est.n}
    logger.log_params({k: v for k, v in values.items()})
    logger.log_metrics({k: float(v) for k, v in values.items() if v == v}, step=0)
    logger.set_tags({tags.FLOOR_SOURCE: est.source, tags.FLOOR_DETAIL: est.detail[:5000],
                     tags.FLOOR_CACHE: est.cache_path or ""})


def _from_checkpoint(space: SearchSpace, f: Any) -> FloorEstimate:
    import time

    import torch

    from ..bounds import c_l1_pgd, estimate_C, madry_floor
    from ..data import eval_subset, load_dataset, to_float
    from ..engine import model_from_checkpoint

    t0 = time.perf_counter()
    base = space.base_config()
    net, _ = model_from_checkpoint(f.proxy_checkpoint)
    ds = load_dataset(base.data.name, root=base.data.root, val_size=base.data.val_size, seed=base.seed,
                      **base.data.options)
    split = ds.val if len(ds.val) else ds.train
    if len(split) == 0:
        raise UserError("stoppers.floor.proxy_checkpoint: the dataset has no samples to measure C^l1 on")
    xs = to_float(eval_subset(split, f.samples).x)
    gen = torch.Generator().manual_seed(space.seed)
    inner = c_l1_pgd(base.attack.eps, base.attack.norm, ds.info.pixel_range, gen)
    c = estimate_C(net, xs, inner, "l1", logits=True, keep_values=False)
    floor = madry_floor(c.mean)
    return FloorEstimate(floor, c.mean, c.stderr, c.n, "proxy", f"proxy checkpoint {f.proxy_checkpoint}",
                         seconds=time.perf_counter() - t0)

def log_importance(cl: Any, parent_run_id: str, imp: Mapping[str, Mapping[str, float]]) -> None:
    """Metrics ``importance.<metric>.<param>`` and the artifact ``importance.png`` on the parent run."""
    if not imp:
        return

    log_metrics(cl, parent_run_id, importance_metrics(imp), step=0)
    cl.log_figure(parent_run_id, importance_figure(imp), "importance.png")
