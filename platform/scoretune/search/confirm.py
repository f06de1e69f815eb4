"""The confirmation stage of a search (``confirm:`` in the space, :class:`~.space.ConfirmSpec`).

    confirm: {top_k: 3, seeds: 5, split: test, attack: aa-standard, n_ex: 1000}

A search picks its best trial on one seed's validation PGD; the paper's differences (0.2-1.2
AutoAttack points) are within one seed's spread, so that pick is partly luck (the winner's curse).
After the search is finalized, :func:`run_confirmation` trains each of the ``top_k`` best
configurations again with new seeds as one more Tune experiment (``<search folder>/confirm``) under
the same MLflow parent run: FIFO (no ASHA: every run gets its full epoch budget), SCORE's floor and
the plateau stopper as configured, checkpoints selected on validation as in the search. Each run is
tagged ``scoretune.stage=confirm`` and ``scoretune.config_id``; its best model is logged and
AutoAttacked on ``confirm.split``. The parent run gets ``confirmed_*`` metrics of the configuration with
the best mean AutoAttack accuracy, the tag ``scoretune.confirmed_config`` and ``confirmed.md`` (every
confirmed configuration, mean +- std (n)). ``--resume`` of a search killed here restores that experiment:
seeds that finished are not trained again.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ray.tune.search import ConcurrencyLimiter, Searcher

from ..tracking import client, tags
from ..tracking.buffer import journal_path, open_writer, settle
from ..tracking.runs import CONFIRM_STAGE, search_trials
from .callback import MlflowSearchCallback, ProgressCallback, experiment_id_for, log_metrics
from .finalize import log_and_attack, settle_trials
from .report import SEED, ConfigRow, SearchSummary, config_id, format_groups, group_by_config
from .resume import SnapshotKeeper, end_superseded, repair_snapshot, restore_pruned_checkpoints, saved_trials
from .space import SearchSpace
from .tuner import build_stoppers, combined_stopper, interrupted, quiet_tune, trainable_for, trial_name, trial_settings

CONFIRM_DIR = "confirm"  # the confirmation's Tune experiment, inside the search's folder


@dataclass
class Confirmation:
    """The confirmed configurations (best mean AutoAttack accuracy first) and the seeds they ran with."""

    rows: list[ConfigRow]
    seeds: list[int]
    by: list[str]

    @property
    def winner(self) -> ConfigRow | None:
        return self.rows[0] if self.rows and self.rows[0].stats.get("AutoAttack") else None


class FixedPoints(Searcher):
    """A Tune searcher that hands out ``points`` in order, each once, then says it is finished (the
    confirmation's configurations x seeds). Pickled with the experiment, so a restored Tune knows which
    points it already gave."""

    def __init__(self, points: Sequence[dict[str, Any]], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.points = [dict(p) for p in points]
        self.given: dict[str, int] = {}  # Tune trial id -> index of its point

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self.given:
            if len(self.given) >= len(self.points):
                return Searcher.FINISHED
            self.given[trial_id] = len(self.given)
        return dict(self.points[self.given[trial_id]])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def confirm_path(ray_path: str) -> str:
    return f"{ray_path.rstrip('/')}/{CONFIRM_DIR}"


def confirm_space(space: SearchSpace, seeds: list[int], runs: int) -> SearchSpace:
    """The space the ``runs`` confirmation runs train under: ``seed`` a param over the confirmation's
    seeds, no ASHA, AutoAttack as ``confirm`` says; everything else (base, resources, stoppers,
    objective) as the search."""
    assert space.confirm is not None
    raw = space.model_dump(by_alias=True, exclude_none=True)
    raw["params"] = {**raw["params"], SEED: {"choice": list(seeds)}}
    raw["scheduler"] = {"type": "none"}
    raw["autoattack"] = space.confirm.autoattack().model_dump()
    raw["points_to_evaluate"] = []
    raw["num_samples"] = max(runs, 1)
    for key in ("confirm", "warm_start"):
        raw.pop(key, None)
    return SearchSpace.model_validate(raw)


def top_configs(summary: SearchSummary, space: SearchSpace, k: int) -> list[dict[str, Any]]:
    """The ``k`` best configurations of the search (their params but ``seed``), best first: trials that
    differ only in ``seed`` are one configuration, ranked by the mean of their best primary objective;
    diverged and infeasible trials are not candidates."""
    p = space.primary
    values: dict[str, list[float]] = {}
    points: dict[str, dict[str, Any]] = {}
    for t in summary.trials:
        v = t.value(p.metric)
        if v is None or t.status == "diverged" or t.feasible is False:
            continue
        cid = config_id(t.point)
        values.setdefault(cid, []).append(v)
        points.setdefault(cid, {k: x for k, x in t.point.items() if k != SEED})
    sign = -1.0 if p.mode == "max" else 1.0
    order = sorted(values, key=lambda c: sign * sum(values[c]) / len(values[c]))  # stable: ties keep the search's order
    return [points[c] for c in order[:k]]


def run_confirmation(space: SearchSpace, summary: SearchSummary, *, name: str, uri: str, parent_run_id: str,
                     ray_path: str, floor: float | None, superseded_by: str,
                     out: Callable[[str], None] = print) -> Confirmation | None:
    """Run (or continue) the confirmation stage of the finished search ``summary`` (see the module
    docstring); None when it was interrupted (the parent run is then marked KILLED by the caller)."""
    from ray import tune

    conf = space.confirm
    assert conf is not None
    seeds = conf.seed_list(space.seeds_used())
    configs = top_configs(summary, space, conf.top_k)
    expected = len(configs) * len(seeds)
    cspace = confirm_space(space, seeds, expected)
    path = confirm_path(ray_path)
    cl = client(uri)
    cl.update_run(parent_run_id, status="RUNNING")
    if tune.Tuner.can_restore(path):
        repair_snapshot(path, out)
        out(f"the confirmation of search '{name}' goes on from {path} (seeds that finished are not trained again)")
        end_superseded(cl, parent_run_id, saved_trials(path), superseded_by, out, stage=CONFIRM_STAGE)
        restore_pruned_checkpoints(path, out)
        tuner = tune.Tuner.restore(path, trainable=trainable_for(cspace), resume_unfinished=True,
                                   restart_errored=True)
    else:
        if not configs:
            out("nothing to confirm: no trial of the search has a value")
            cl.set_terminated(parent_run_id, status="FINISHED")
            return Confirmation([], seeds, [])
        points = [{**c, SEED: s} for c in configs for s in seeds]
        out(f"confirmation: the top {len(configs)} configuration(s) x seeds {seeds} = {len(points)} runs at the full "
            f"epoch budget (no ASHA), then AutoAttack {conf.attack} on {conf.n_ex} {conf.split} examples each")
        tuner = build_confirm_tuner(cspace, points, name=name, ray_path=ray_path, tracking_uri=uri,
                                    parent_run_id=parent_run_id, floor=floor, out=out)
    with quiet_tune():
        results = tuner.fit()
    writer = open_writer(uri, journal_path(path, name))
    if interrupted(results, path, expected):
        writer.drain(10.0)
        if writer.close():
            out(f"MLflow did not take every write; they are kept in {writer.journal} (scoretune sync replays it)")
        return None
    settle(writer, what=f"the confirmation of search '{name}'", parent_run_id=parent_run_id)
    parent = cl.get_run(parent_run_id)
    trials, result_of = settle_trials(cl, cspace, results, parent, stage=CONFIRM_STAGE, superseded_by=superseded_by,
                                      out=out)
    log_and_attack(cl, uri, [t for t in trials if t.value(cspace.primary.metric) is not None], result_of, cspace, out)
    by = [k for k in space.params if k != SEED]
    confirmation = Confirmation(group_by_config(search_trials(cl, parent, CONFIRM_STAGE), by), seeds, by)
    log_confirmation(cl, parent_run_id, confirmation, space, name)
    cl.set_terminated(parent_run_id, status="FINISHED")
    return confirmation


def build_confirm_tuner(cspace: SearchSpace, points: list[dict[str, Any]], *, name: str, ray_path: str,
                        tracking_uri: str, parent_run_id: str, floor: float | None,
                        out: Callable[[str], None] = print):
    """The confirmation's ``Tuner``: :class:`FixedPoints` over ``points``, FIFO, the search's stoppers and
    MLflow callback (its runs tagged with the stage), at most ``max_concurrent`` at a time."""
    from ray import tune

    from trainables.tune_trainable import SETTINGS_KEY

    path = confirm_path(ray_path)
    stoppers = build_stoppers(cspace, floor)
    mlflow_cb = MlflowSearchCallback(cspace, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                                     experiment_id=experiment_id_for(tracking_uri, cspace.experiment_name),
                                     stoppers=stoppers, floor=floor, journal=str(journal_path(path, name)),
                                     stage=CONFIRM_STAGE)
    p = cspace.primary
    run_config = tune.RunConfig(
        name=CONFIRM_DIR, storage_path=ray_path, stop=combined_stopper(stoppers),
        callbacks=[mlflow_cb, ProgressCallback(cspace, stoppers, out, judge=mlflow_cb.verdict), SnapshotKeeper(path)],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=cspace.keep_checkpoints,
                                                checkpoint_score_attribute=p.metric, checkpoint_score_order=p.mode),
        failure_config=tune.FailureConfig(max_failures=0), verbose=0,
    )
    searcher = ConcurrencyLimiter(FixedPoints(points, p.metric, p.mode), max_concurrent=cspace.max_concurrent)
    tune_config = tune.TuneConfig(search_alg=searcher, num_samples=len(points), reuse_actors=True,
                                  trial_name_creator=trial_name, trial_dirname_creator=trial_name)
    settings = trial_settings(cspace, name=name, ray_path=path)
    return tune.Tuner(trainable_for(cspace), param_space={SETTINGS_KEY: settings}, tune_config=tune_config,
                      run_config=run_config)


def log_confirmation(cl: Any, parent_run_id: str, confirmation: Confirmation, space: SearchSpace, name: str) -> None:
    """On the parent run: ``confirmed_aa_acc_mean``/``_std``, ``confirmed_clean_acc_mean``/``_std`` and
    ``confirmed_n_seeds`` of the winner, the tag ``scoretune.confirmed_config`` (its config id),
    ``confirmed.md`` and a "Confirmation" section in the description."""
    text = confirmed_text(confirmation, space, name)
    cl.log_text(parent_run_id, text, "confirmed.md")
    note = cl.get_run(parent_run_id).data.tags.get(tags.NOTE, "")
    note = note.split("\n\n### Confirmation", 1)[0]
    cl.set_tag(parent_run_id, tags.NOTE, f"{note}\n\n### Confirmation\n\n{text}")
    win = confirmation.winner
    if win is None:
        return
    aa, clean = win.stats["AutoAttack"], win.stats.get("clean")
    metrics = {"confirmed_aa_acc_mean": aa.mean, "confirmed_aa_acc_std": aa.std, "confirmed_n_seeds": aa.n}
    if clean is not None:
        metrics.update(confirmed_clean_acc_mean=clean.mean, confirmed_clean_acc_std=clean.std)
    log_metrics(cl, parent_run_id, metrics, step=0)
    winner_id = next((cl.get_run(r).data.tags.get(tags.CONFIG_ID) for r in win.runs if r), None)
    cl.set_tag(parent_run_id, tags.CONFIRMED, winner_id or win.config_id)


def confirmed_text(confirmation: Confirmation, space: SearchSpace, name: str) -> str:
    """``confirmed.md``: how the confirmation ran and its table (best mean AutoAttack accuracy first)."""
    conf = space.confirm
    assert conf is not None
    head = (f"Confirmation of search `{name}`: the top {conf.top_k} configuration(s), seeds {confirmation.seeds}, "
            f"full epoch budget; AutoAttack {conf.attack} on {conf.n_ex} {conf.split} examples (subset_seed "
            f"{conf.subset_seed}); clean accuracy on the same examples. Mean ± std (n seeds), %.")
    if not confirmation.rows:
        return head + "\n\nNo configuration was confirmed (no run finished)."
    table = format_groups(confirmation.rows, confirmation.by)
    win = confirmation.winner
    tail = (f"\n\nWinner: {', '.join(f'{k}={v}' for k, v in win.config.items())} "
            f"(`scoretune promote --search {name}` registers its median seed)." if win is not None else "")
    return f"{head}\n\n{table}{tail}"
