"""After the search: bring MLflow in line with the finished search, attack the best models, summarise it.

:func:`finalize_search` gives every trial's child run its terminal status, deals with the runs of
trials the search did not continue (see :mod:`.resume`), logs the best checkpoints of the top-k
(single objective) or Pareto-front (multi-objective) trials as MLflow PyTorch models
(:func:`log_trial_model`) and runs AutoAttack on them, all at once as Ray tasks
(:func:`run_autoattack_jobs`; :func:`autoattack_trial` is the same in-process), logs the plots
(:mod:`.plots`), and puts the counts, the best trial, the results table and a markdown description
(:func:`parent_description`) on the parent run. Models are named ``trial-<id>`` with their metrics
attached; a trial run keeps the end time its training ended at (logging its model and AutoAttack
afterwards do not reopen it), and a ``scoretune.best_checkpoint`` tag is dropped when its files are gone.
Idempotent: a rerun logs nothing twice, and writes what a run that MLflow cut short left out (a logged
model without its AutoAttack gets it); ``search --resume`` of a finished search is that rerun.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..drivers.task_progress import TaskProgress, gather
from ..tracking import client as mlflow_client
from ..tracking import tags
from ..tracking.runs import SEARCH_STAGE, child_runs
from .callback import log_metrics
from .plots import log_plots
from .report import (
    SEED,
    STATUSES,
    SearchSummary,
    TrialSummary,
    aa_n_of,
    aa_reranks,
    aa_se,
    aa_setting,
    finite,
    format_aa,
    format_groups,
    format_table,
    front_of,
    group_by_config,
    point_label,
    rank_trials,
    summary_trials,
    table_rows,
)
from .space import AutoAttackSpec, ResourcesSpec, SearchSpace
from .study import feasible_first, mark_feasibility
from .tuner import trial_id_of

MODEL_METRICS = ("val_pgd_acc", "val_clean_acc")  # a logged model's numbers besides its objectives and aa_acc


def finalize_search(space: SearchSpace, results: Any, *, name: str, tracking_uri: str, parent_run_id: str,
                    ray_path: str, superseded_by: str = "a resumed attempt",
                    out: Callable[[str], None] = print) -> SearchSummary:
    """Bring MLflow in line with the finished search (see the module docstring); returns its summary."""
    cl = mlflow_client(tracking_uri)
    parent = cl.get_run(parent_run_id)
    trials, result_of = settle_trials(cl, space, results, parent, superseded_by=superseded_by, out=out)
    mark_feasibility(cl, trials, space.constraints, out)  # constraints (a no-op without them)
    trials = feasible_first(rank_trials(trials, space.objective))
    log_ranks(cl, trials)
    pareto = front_of(trials, space.objective) if space.multi_objective else []
    summary = SearchSummary(name=name, trials=trials, pareto=pareto, parent_run_id=parent_run_id,
                            experiment_id=parent.info.experiment_id, tracking_uri=tracking_uri,
                            ray_path=ray_path, objectives=list(space.objective), space=space)
    chosen = (pareto if space.multi_objective else [t for t in trials if t.value(space.primary.metric) is not None
                                                     and t.status != "diverged"])
    log_and_attack(cl, tracking_uri, chosen[: space.top_k], result_of, space, out)
    log_plots(cl, summary, space)
    log_parent_summary(cl, summary, space)
    return summary


def settle_trials(cl: Any, space: SearchSpace, results: Any, parent: Any, *, stage: str = SEARCH_STAGE,
                  superseded_by: str = "a resumed attempt",
                  out: Callable[[str], None] = print) -> tuple[list[TrialSummary], dict[str, Any]]:
    """The trials of one Tune experiment of the search (``stage``: the search, or its confirmation) as
    :class:`TrialSummary` rows, their MLflow runs brought in line with Tune's results, and each trial's
    Tune ``Result`` by trial id.

    Child runs of trials Tune does not know (a killed driver started them, the resumed search re-ran
    their slot) are tagged ``scoretune.superseded`` and deleted; failed runs of trials that ``--resume``
    restarted under a new id are kept, tagged ``scoretune.superseded`` = ``superseded_by``."""
    from trainables.tune_trainable import sampled_point

    by_trial = {r.data.tags.get(tags.TRIAL): r for r in child_runs(cl, parent, stage)}
    result_of = {}
    for res in results:
        tid = trial_id_of(res)
        if tid:
            result_of[tid] = res
    for tid, run in list(by_trial.items()):
        if tid in result_of:
            continue
        by_trial.pop(tid)
        if tags.SUPERSEDED not in run.data.tags:
            cl.set_tag(run.info.run_id, tags.SUPERSEDED, superseded_by)
        if run.data.tags.get(tags.STATUS) == "failed":  # an errored trial that --resume restarted under a new id
            continue
        if run.info.status in ("RUNNING", "SCHEDULED"):
            cl.set_terminated(run.info.run_id, status="KILLED")
        cl.delete_run(run.info.run_id)
        out(f"deleted orphan MLflow run {run.info.run_id} (trial {tid} was lost when the driver stopped; "
            "the search re-ran its slot)")
    trials: list[TrialSummary] = []
    for tid, res in result_of.items():
        run = by_trial.get(tid)
        run_tags = run.data.tags if run else {}
        status = run_tags.get(tags.STATUS, "failed" if res.error else "completed")
        if run is not None and status == "running":  # ended without a callback (e.g. restored as finished)
            status = "failed" if res.error else "completed"
            cl.set_tag(run.info.run_id, tags.STATUS, status)
            if res.error:
                cl.set_tag(run.info.run_id, tags.ERROR, f"{type(res.error).__name__}: {str(res.error)[:300]}")
            cl.set_terminated(run.info.run_id, status="FAILED" if res.error else "FINISHED")
        metrics = dict(run.data.metrics) if run else {}
        if run is not None and f"best_{space.primary.metric}" not in metrics:  # ended without the callback's summary
            extra = summary_from_history(cl, run.info.run_id, space)
            if extra:
                log_metrics(cl, run.info.run_id, extra, step=int(extra.get("epochs_run", 0)))
                metrics.update(extra)
        trials.append(TrialSummary(
            trial_id=tid, run_id=run.info.run_id if run else None, status=status,
            point=sampled_point(res.config or {}), epochs=int(metrics.get("epoch", 0)),
            best={k: v for k, v in metrics.items() if k.startswith("best_")},
            reason=run_tags.get(tags.ERROR) or run_tags.get(tags.REASON, ""), model_uri=run_tags.get(tags.MODEL_URI),
            aa_acc=metrics.get("aa_acc"), aa_se=metrics.get("aa_acc_se"), aa_n=aa_n_of(run_tags),
            rank=int(metrics["rank"]) if finite(metrics.get("rank")) else None,
        ))
        if run is not None:
            drop_missing_checkpoint_tag(cl, run)
    return trials, result_of


def log_ranks(cl: Any, trials: list[TrialSummary]) -> None:
    """Each trial's place in the search's ranking as the metric ``rank`` (1 = best) on its run: the runs
    table ``scoretune ui`` saves sorts by it, so the UI, the summary, the plots and ``promote`` agree on
    ties. A rank already logged is not logged again."""
    for i, t in enumerate(trials, start=1):
        if t.run_id is not None and t.rank != i:
            log_metrics(cl, t.run_id, {"rank": float(i)}, step=0)
            t.rank = i


def log_and_attack(cl: Any, tracking_uri: str, chosen: list[TrialSummary], result_of: Mapping[str, Any],
                   space: SearchSpace, out: Callable[[str], None] = print) -> None:
    """Log the best checkpoint of each ``chosen`` trial (best first) as an MLflow model
    (:func:`log_trial_model`), the best one last so that it is the newest, and AutoAttack them
    (``space.autoattack``) side by side as Ray tasks; a model logged by an earlier run of this that MLflow
    cut short gets only the AutoAttack it still owes. Sets ``model_uri``, ``aa_acc`` and ``aa_se`` on the rows."""
    aa_jobs: list[AutoAttackJob] = []
    for t in reversed(chosen):  # the best model last: MLflow's logged-models page lists the newest first
        if t.run_id is None:
            continue
        if t.model_uri:  # logged by an earlier finalize; one that MLflow cut short may still owe its AutoAttack
            if t.aa_acc is None and space.autoattack.version != "none":
                try:
                    aa_jobs.append(owed_autoattack(cl, t, result_of[t.trial_id], space))
                except Exception as e:
                    out(f"could not AutoAttack the model of trial {t.trial_id}: {type(e).__name__}: {e}")
            continue
        try:
            t.model_uri = log_trial_model(cl, tracking_uri, t, result_of[t.trial_id], space, aa_jobs=aa_jobs)
            out(f"logged model of trial {t.trial_id} as trial-{t.trial_id}: {t.model_uri}")
        except Exception as e:  # a missing checkpoint must not lose the rest of the summary
            out(f"could not log the model of trial {t.trial_id}: {type(e).__name__}: {e}")
    aa_jobs.reverse()  # attacked and reported best first
    if not aa_jobs:
        return
    ends = {j.run_id: _keep_end(cl, j.run_id) for j in aa_jobs}
    by_id = {t.trial_id: t for t in chosen}
    start = time.time()
    aa = space.autoattack
    out(f"[{time.strftime('%H:%M:%S')}] AutoAttack ({aa.version}, {aa.split} split, n_ex={aa.n_ex}) of "
        f"{len(aa_jobs)} models in parallel: " + ", ".join(f"trial {j.trial_id} (epoch {j.epoch})" for j in aa_jobs))
    for tid, acc in run_autoattack_jobs(cl, tracking_uri, aa_jobs, aa, space.resources, out).items():
        t = by_id.get(tid)
        if acc is not None and t is not None:  # its standard error from the points attacked (the split may be smaller)
            run = cl.get_run(t.run_id)
            t.aa_acc, t.aa_se, t.aa_n = acc, run.data.metrics.get("aa_acc_se", aa_se(acc, aa.n_ex)), aa_n_of(run.data.tags)
        out(f"[{time.strftime('%H:%M:%S')}]   trial {tid}: " + (f"aa_acc={format_aa(t)}" if acc is not None and t
                                                               else "failed (see the run's scoretune.autoattack_error tag)")
            + f"  ({time.time() - start:.0f} s)")
    for restore in ends.values():
        restore()


def summary_from_history(cl: Any, run_id: str, space: SearchSpace) -> dict[str, float]:
    """A trial's summary metrics rebuilt from its per-epoch history (for a run whose end the callback
    did not see, e.g. a driver killed as the trial finished)."""
    from .report import trial_summary_metrics

    by_step: dict[int, dict[str, float]] = {}
    for metric in {o.metric for o in space.objective} | {"epoch"}:
        for m in cl.get_metric_history(run_id, metric):
            by_step.setdefault(int(m.step), {"epoch": float(m.step)})[metric] = float(m.value)
    if not by_step:
        return {}
    return trial_summary_metrics([by_step[k] for k in sorted(by_step)], space.objective)


def drop_missing_checkpoint_tag(cl: Any, run: Any) -> None:
    """Delete a run's ``scoretune.best_checkpoint`` tag when the local folder it names is gone."""
    path = run.data.tags.get(tags.BEST_CKPT)
    if path and "://" not in path and not Path(path).exists():
        cl.delete_tag(run.info.run_id, tags.BEST_CKPT)


def _keep_end(cl: Any, run_id: str) -> Callable[[], None]:
    """A function that puts back the run's status and end time as they are now (logging a model or an
    evaluation into an ended run reopens it; the run's duration should stay its training's)."""
    info = cl.get_run(run_id).info

    def restore() -> None:
        if info.end_time:
            cl.set_terminated(run_id, status=info.status if info.status != "RUNNING" else "FINISHED",
                              end_time=info.end_time)
    return restore


def _checkpoint_for(run_tags: Mapping[str, str], result: Any, metric: str, mode: str,
                    best_epoch: int | None = None) -> tuple[Any, int | None]:
    """The trial's best checkpoint (``ray.tune.Checkpoint``) and its epoch: the tagged best one when it
    is still on storage, else the one Tune kept at ``best_epoch``, else the best one Tune kept (the
    earliest on a tie, as ``best_epoch`` is)."""
    from ray.tune import Checkpoint

    path = run_tags.get(tags.BEST_CKPT)
    if path and (("://" in path) or Path(path).exists()):
        return Checkpoint(path), None
    kept = [(c, m) for c, m in (getattr(result, "best_checkpoints", None) or []) if finite(m.get(metric))]
    at_best = [(c, m) for c, m in kept if best_epoch is not None and int(m.get("epoch", -1)) == best_epoch]
    if at_best:
        return at_best[0][0], best_epoch
    if kept:
        c, m = max(kept, key=lambda cm: (cm[1][metric] if mode == "max" else -cm[1][metric], -cm[1].get("epoch", 0)))
        return c, int(m.get("epoch", 0)) or None
    if getattr(result, "checkpoint", None) is not None:
        return result.checkpoint, None
    raise FileNotFoundError("no checkpoint of this trial is left on storage")


def model_id_of(uri: str) -> str | None:
    """The LoggedModel id of a ``models:/<model_id>`` URI (None for a registry URI)."""
    rest = uri[len("models:/"):] if uri.startswith("models:/") else ""
    return rest if rest and "/" not in rest and "@" not in rest else None


def log_trial_model(cl: Any, tracking_uri: str, t: TrialSummary, result: Any, space: SearchSpace,
                    aa_jobs: list[AutoAttackJob] | None = None) -> str:
    """Load the trial's best checkpoint (state.pt), log its network as an MLflow PyTorch model into the
    trial's child run as ``trial-<id>``, tag the run with the model URI/epoch and log the checkpoint
    epoch's :func:`model_metrics`, attached to the logged model too (the Models tab ranks them).
    The run keeps its status and end time. AutoAttack (unless ``version: none``): appended to ``aa_jobs`` when given (for
    :func:`run_autoattack_jobs`), else run here."""
    from trainables.ray_checkpoint import load_state

    from ..drivers.training_run import example_input
    from ..engine import model_from_checkpoint
    from ..tracking import log_torch_model

    restore = _keep_end(cl, t.run_id)
    run = cl.get_run(t.run_id)
    ckpt, _ = _checkpoint_for(run.data.tags, result, space.primary.metric, space.primary.mode, t.best_epoch)
    state = load_state(ckpt)
    net, _cfg = model_from_checkpoint(state)
    spec = json.loads(state["model_spec"])
    uri = log_torch_model(tracking_uri, t.run_id, net, example_input(spec, 2), name=f"trial-{t.trial_id}")
    epoch = int(state.get("epoch", 0))
    row = next((r for r in state.get("history", []) if int(r.get("epoch", 0)) == epoch), {})
    cl.set_tag(t.run_id, tags.MODEL_URI, uri)
    cl.set_tag(t.run_id, tags.MODEL_EPOCH, str(epoch))
    log_metrics(cl, t.run_id, model_metrics(row, space.objective), step=epoch, model_id=model_id_of(uri))
    if space.autoattack.version != "none" and aa_jobs is not None:
        aa_jobs.append(AutoAttackJob(trial_id=t.trial_id, run_id=t.run_id, checkpoint=ckpt, epoch=epoch,
                                     model_id=model_id_of(uri)))
    elif space.autoattack.version != "none":
        try:
            autoattack_trial(cl, tracking_uri, t.run_id, net, _cfg, space.autoattack, epoch)
        except Exception as e:  # an evaluation problem must not cost the logged model
            cl.set_tag(t.run_id, tags.AUTOATTACK_ERROR, f"{type(e).__name__}: {str(e)[:300]}")
    restore()
    return uri


def model_metrics(row: Mapping[str, Any], objectives: Sequence[Any]) -> dict[str, float]:
    """The checkpoint epoch's numbers that its logged model carries, as ``model_<metric>``: the objectives
    first, then the validation accuracies (the logged-models table's columns, after ``rank``, which MLflow
    links to a model from the run's step-0 metrics). Each is a run metric too, so the rest of the row
    stays on the run's per-epoch curves only."""
    keys = dict.fromkeys([o.metric for o in objectives] + list(MODEL_METRICS))
    return {f"model_{k}": float(row[k]) for k in keys if k in row}


def owed_autoattack(cl: Any, t: TrialSummary, result: Any, space: SearchSpace) -> AutoAttackJob:
    """The AutoAttack job of a trial whose model an earlier finalize logged but did not get to attack
    (MLflow went away): the checkpoint :func:`log_trial_model` picked, at the model's epoch."""
    run = cl.get_run(t.run_id)
    ckpt, _ = _checkpoint_for(run.data.tags, result, space.primary.metric, space.primary.mode, t.best_epoch)
    return AutoAttackJob(trial_id=t.trial_id, run_id=t.run_id, checkpoint=ckpt,
                         epoch=int(run.data.tags.get(tags.MODEL_EPOCH, 0)), model_id=model_id_of(t.model_uri or ""))


def autoattack_trial(cl: Any, tracking_uri: str, run_id: str, net: Any, cfg: Any, aa: AutoAttackSpec,
                     epoch: int, model_id: str | None = None) -> dict[str, float]:
    """AutoAttack (the space's ``autoattack`` settings ``aa``) on a trial's best model, on its held-out split at its own eps and
    norm, through :func:`scoretune.evaluate.benchmark` (the call ``scoretune evaluate`` makes, with its tag
    scheme ``eval.aa_<version>_acc.*`` and ``aa_check.*``) logged into the trial's run; plus ``aa_acc`` (the
    version-independent name ``promote --metric aa_acc`` ranks by) at the model's epoch."""
    result = autoattack_net(net, cfg, aa, tracking_uri=tracking_uri, log_to=run_id)
    se = aa_se(result.robust_acc, result.n)
    metrics = {**result.metrics(), "aa_acc": result.robust_acc, "aa_acc_se": se}
    log_metrics(cl, run_id, {"aa_acc": result.robust_acc, "aa_acc_se": se}, step=epoch, model_id=model_id)
    return metrics


def log_parent_summary(cl: Any, summary: SearchSummary, space: SearchSpace) -> None:
    """The parent run's end: ``n_<status>`` counts, the best trial's values and ids, the Pareto trials,
    the results table (``trials.txt``), status FINISHED."""
    pid = summary.parent_run_id
    counts = summary.counts()
    metrics = {f"n_{s}": float(counts.get(s, 0)) for s in STATUSES}
    metrics["n_trials"] = float(len(summary.trials))
    best = summary.best
    if best is not None:
        for o in space.objective:
            v = best.value(o.metric)
            if v is not None:
                metrics[f"best_{o.metric}"] = v
        cl.set_tag(pid, tags.BEST_TRIAL, best.trial_id)
        cl.set_tag(pid, tags.BEST_RUN, best.run_id or "")
    if summary.pareto:
        cl.set_tag(pid, tags.PARETO, ",".join(t.trial_id for t in summary.pareto))
    log_metrics(cl, pid, metrics, step=0)
    cl.log_text(pid, format_table(summary, list(space.params)), "trials.txt")
    by = [k for k in space.params if k != SEED]
    cl.log_text(pid, format_groups(group_by_config(summary_trials(summary), by), by), "report.md")
    cl.set_tag(pid, tags.NOTE, parent_description(summary, space))
    cl.set_terminated(pid, status="FINISHED")


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def parent_description(summary: SearchSummary, space: SearchSpace, ui_base: str = "") -> str:
    """The parent run's markdown description: the best trial with a link to its run, the results table
    (with AutoAttack accuracy and its standard error), the stop-reason counts, and -- when AutoAttack
    ranks the top trials differently from the search's objective -- a line with the
    ``promote --metric aa_acc`` command."""
    p = space.primary
    eid = summary.experiment_id
    link = lambda t, text=None: (  # the training view: MLflow 3 opens in GenAI mode otherwise
        f"[{text or t.trial_id}]({ui_base}#/experiments/{eid}/runs/{t.run_id}?workflowType=machine_learning)"
        if t.run_id else text or t.trial_id)
    lines = [f"### Search `{summary.name}`: {len(summary.trials)} trials, ranked by {p.metric} ({p.mode}); ties "
             "(marked =) by the earlier best epoch, then the trial id", ""]
    best = summary.best
    if best is not None:
        lines.append(f"**Best: {link(best)}** {p.metric} = {best.value(p.metric):.4f} at epoch {best.best_epoch} "
                     f"({point_label(best.point)})" + (f", AutoAttack {format_aa(best)}" if best.aa_acc is not None else ""))
        lines.append("")
    top = aa_reranks(summary)
    if top is not None and best is not None:
        lines.append(f"> AutoAttack ranks the top trials differently: {link(top)} (aa_acc {format_aa(top)}) beats "
                     f"{best.trial_id} (aa_acc {format_aa(best)}). Promote by AutoAttack accuracy with "
                     f"`scoretune promote --search {summary.name} --metric aa_acc`.")
        lines.append("")
    head, rows = table_rows(summary, list(space.params))
    by_id = {t.trial_id: t for t in summary.trials}
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        t = by_id.get(r[0].rstrip("*!="))
        run = f"`{r[-1][:8]}`" if r[-1] != "-" else "-"
        cells = [link(t, r[0]) if t else r[0]] + [_md_cell(c) for c in r[1:-1]] + [run]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    counts = summary.counts()
    lines.append("Stopped: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ".")
    reasons = [f"- {t.trial_id} **{t.status}**: {_md_cell(t.reason)}" for t in summary.trials
               if t.status != "completed" and t.reason]
    lines += reasons
    if SEED in space.params:
        by = [k for k in space.params if k != SEED]
        lines += ["", f"Over seeds (mean ± std (n) of the trials that differ only in `{SEED}`; `scoretune report "
                  f"--search {summary.name}`):", "", format_groups(group_by_config(summary_trials(summary), by), by)]
    if space.autoattack.version != "none":
        aa = space.autoattack
        lines += ["", aa_setting(summary.trials, aa) + "."]
    lines += ["", f"Next: `scoretune promote --search {summary.name}" + (" --metric aa_acc" if top is not None else "")
              + "`; plots: this run's artifacts, `plots/`."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- AutoAttack of the top-k models (Ray tasks, all at once)
@dataclasses.dataclass
class AutoAttackJob:
    """One model to attack: the trial's run, its best checkpoint (a ``ray.tune.Checkpoint``) and epoch."""

    trial_id: str
    run_id: str
    checkpoint: Any
    epoch: int
    model_id: str | None = None  # the trial's LoggedModel: aa_acc is attached to it too (the Models tab ranks by it)


def autoattack_net(net: Any, cfg: Any, aa: AutoAttackSpec, **log_to: Any):
    """AutoAttack (the space's ``autoattack`` settings ``aa``) of ``net`` (trained with ``cfg``) on its held-out split at its own
    eps and norm, through :func:`scoretune.evaluate.benchmark`; ``log_to`` is passed on to it
    (``tracking_uri=..., log_to=run_id`` logs the result). Returns the
    :class:`~scoretune.robustness.EvalResult`."""
    from ..data import load_dataset
    from ..evaluate import benchmark

    ds = load_dataset(cfg.data.name, root=cfg.data.root, val_size=cfg.data.val_size, seed=cfg.seed,
                      **cfg.data.options)
    if ds.info.pixel_range is None:
        raise ValueError(f"AutoAttack needs inputs in [0, 1]; {cfg.data.name} has unbounded inputs "
                         "(set autoattack.version: none in the search space)")
    split = aa.split if aa.split == "test" or len(ds.val) else "test"
    return benchmark(net, data=ds, split=split, n_ex=aa.n_ex, subset_seed=aa.subset_seed, attack=f"aa-{aa.version}",
                     eps=cfg.attack.eps, norm=cfg.attack.norm, batch_size=aa.batch_size, device="auto", seed=cfg.seed,
                     **log_to)


def attack_checkpoint(checkpoint: Any, aa: AutoAttackSpec, threads: int | None = None):
    """:func:`autoattack_net` of the network in ``checkpoint`` (nothing is logged)."""
    from trainables.ray_checkpoint import load_state

    from ..engine import model_from_checkpoint
    from ..threads import set_torch_threads

    if threads:
        set_torch_threads(threads)
    net, cfg = model_from_checkpoint(load_state(checkpoint))
    return autoattack_net(net, cfg, aa)


def run_autoattack_jobs(cl: Any, tracking_uri: str, jobs: list[AutoAttackJob], aa: AutoAttackSpec,
                        resources: ResourcesSpec, out: Callable[[str], None] = print) -> dict[str, float | None]:
    """Attack every job's model (Ray tasks when Ray is running, see the module docstring), log each
    result into its trial's run as :func:`scoretune.evaluate.benchmark` would (``aa_<version>_acc``,
    ``eval.*`` and ``aa_check.*`` tags) plus ``aa_acc`` at the model's epoch; a failure becomes the run's
    ``scoretune.autoattack_error`` tag. Returns ``{trial_id: aa_acc or None}``."""
    if not jobs or aa.version == "none":
        return {}
    import ray

    threads = max(1, int(resources.cpus))
    outcomes: dict[str, Any] = {}
    names = {j.trial_id: f"trial {j.trial_id}" for j in jobs}
    progress = TaskProgress("AutoAttack", len(jobs), out)
    if ray.is_initialized():
        res: dict[str, float] = {"num_cpus": float(resources.cpus)}
        if resources.gpus > 0:
            res["num_gpus"] = float(resources.gpus)
        task = ray.remote(max_retries=0, **res)(attack_checkpoint)
        refs = {j.trial_id: task.remote(j.checkpoint, aa, threads) for j in jobs}
        outcomes = gather(refs, names, progress)  # a line as each model is done, and every 15 s meanwhile
    else:
        for j in jobs:
            progress.starting(names[j.trial_id])
            try:
                outcomes[j.trial_id] = attack_checkpoint(j.checkpoint, aa, threads)
            except Exception as e:
                outcomes[j.trial_id] = e
            progress.finished(names[j.trial_id], isinstance(outcomes[j.trial_id], BaseException), [])
    return {j.trial_id: _log_outcome(cl, tracking_uri, j, outcomes[j.trial_id]) for j in jobs}


def _log_outcome(cl: Any, tracking_uri: str, job: AutoAttackJob, outcome: Any) -> float | None:
    from ..evaluate import LoadedModel, log_result
    from .report import aa_se

    if isinstance(outcome, BaseException):
        cl.set_tag(job.run_id, tags.AUTOATTACK_ERROR, f"{type(outcome).__name__}: {str(outcome)[:300]}")
        return None
    loaded = LoadedModel(net=None, ref=outcome.settings.get("model", "model"), kind="module")
    outcome.logged = log_result(outcome, loaded, outcome.settings, tracking_uri, run_id=job.run_id)
    se = aa_se(outcome.robust_acc, outcome.n)
    log_metrics(cl, job.run_id, {"aa_acc": outcome.robust_acc, "aa_acc_se": se}, step=job.epoch,
                model_id=job.model_id)
    return outcome.robust_acc
