"""Promotion: put a search's best model into the MLflow Model Registry under an alias.

    result = promote("quickstart")            # best child run by val_pgd_acc (max)
    result.uri                                # "models:/scoretune-quickstart@champion"

The search's parent run is found by its ``scoretune.search_name`` tag (the newest one when a name was
reused). When the search ran a confirmation stage (runs tagged ``scoretune.stage=confirm``) and no
``metric`` is given, the confirmed ranking decides (:func:`pick_confirmed`): the configuration with the
best mean AutoAttack accuracy over its seeds wins, and the model registered is that of its median seed.
Otherwise, among the search's child runs that have a logged model (tag ``scoretune.model_uri``), the
best by ``metric`` (default ``val_pgd_acc``) wins. A child's value is its best-epoch value ``best_<metric>`` when the search optimised
that metric in that mode, else the best value in the metric's history (so ``--metric aa_acc`` works
once the evaluation logs it).

The registered model gets a description (which search, ranked how) and the new version one that says
why it was promoted: the metric and its value, the trial, its best epoch, and the AutoAttack setting
(version, split, n_ex) its ``aa_acc`` was measured with.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from . import client, resolve_tracking_uri, tags
from .runs import CONFIRM_STAGE, SEARCH_STAGE, all_parent_runs, child_runs, find_parent_runs, rank_key


@dataclass(frozen=True)
class Promotion:
    model_name: str
    version: str
    alias: str
    run_id: str
    trial_id: str
    metric: str
    value: float
    source_uri: str

    @property
    def uri(self) -> str:
        return f"models:/{self.model_name}@{self.alias}"


def child_value(cl: Any, run: Any, metric: str, mode: str, optimised: set[str]) -> float | None:
    """The value a child run is ranked by (see the module docstring), or None when it has none."""
    import math

    if f"{metric}:{mode}" in optimised and f"best_{metric}" in run.data.metrics:
        return float(run.data.metrics[f"best_{metric}"])
    hist = [m.value for m in cl.get_metric_history(run.info.run_id, metric) if math.isfinite(m.value)]
    if not hist:
        return None
    return float(max(hist) if mode == "max" else min(hist))


def pick_best(cl: Any, parent: Any, metric: str, mode: str, allow_infeasible: bool = False) -> tuple[Any, float]:
    """The best child run of ``parent`` that has a logged model, and its value; trials tagged infeasible
    (``scoretune.feasible`` = false..., the search's constraints) only with ``allow_infeasible``."""
    optimised = {s.strip() for s in parent.data.params.get("search.objective", "").split(",") if s.strip()}
    children = child_runs(cl, parent, SEARCH_STAGE)
    with_model = [r for r in children if r.data.tags.get(tags.MODEL_URI)]
    name = parent.data.tags.get(tags.SEARCH, parent.info.run_name)
    if not with_model:
        raise UserError(f"no trial of search '{name}' has a logged model (the search logs top_k models when it "
                        "finishes; resume it with `scoretune search SPACE --resume` if it was interrupted)")
    infeasible = [r for r in with_model if r.data.tags.get(tags.FEASIBLE, "true").startswith("false")]
    if infeasible and not allow_infeasible:
        with_model = [r for r in with_model if r not in infeasible]
        if not with_model:
            why = infeasible[0].data.tags[tags.FEASIBLE][len("false: "):]
            raise UserError(f"every trial of search '{name}' with a model is infeasible (e.g. trial "
                            f"{infeasible[0].data.tags.get(tags.TRIAL, '?')}: {why}); pass --allow-infeasible to "
                            "promote the best of them anyway")
    scored = [(r, child_value(cl, r, metric, mode, optimised)) for r in with_model]
    scored = [(r, v) for r, v in scored if v is not None]
    if not scored:
        known = sorted({k for r in with_model for k in r.data.metrics})
        raise UserError(f"no trial with a model has metric '{metric}'; available: {', '.join(known)}")
    return min(scored, key=lambda rv: rank_key(rv[1], mode, rv[0].data.metrics.get("best_epoch"),
                                               rv[0].data.tags.get(tags.TRIAL, "")))


@dataclass(frozen=True)
class ConfirmedPick:
    """The confirmation's winner: its configuration id, mean +- std of AutoAttack accuracy over its n
    seeds, and the run of its median seed (the model promoted)."""

    config_id: str
    mean: float
    std: float
    n: int
    run: Any


def pick_confirmed(cl: Any, parent: Any) -> ConfirmedPick | None:
    """The configuration that won the confirmation (the parent's ``scoretune.confirmed_config``, as the
    confirmation ranked it; when that tag is missing, the best mean AutoAttack accuracy ``aa_acc``, ties:
    more seeds, then the id) among those with confirmation runs that have a logged model, and the run of its
    median seed (the lower middle one for an even count); None when the search has no confirmation runs
    with AutoAttack."""
    import statistics

    groups: dict[str, list[Any]] = {}
    for r in child_runs(cl, parent, CONFIRM_STAGE):
        if tags.SUPERSEDED in r.data.tags or not r.data.tags.get(tags.MODEL_URI) or "aa_acc" not in r.data.metrics:
            continue
        groups.setdefault(r.data.tags.get(tags.CONFIG_ID, ""), []).append(r)
    if not groups:
        return None
    mean = {c: statistics.fmean(r.data.metrics["aa_acc"] for r in runs) for c, runs in groups.items()}
    win = parent.data.tags.get(tags.CONFIRMED)
    if win not in groups:  # no recorded winner (a confirmation cut short before it logged one)
        win = max(groups, key=lambda c: (mean[c], len(groups[c]), c))
    runs = sorted(groups[win], key=lambda r: (r.data.metrics["aa_acc"], r.info.run_id))
    std = statistics.stdev(r.data.metrics["aa_acc"] for r in runs) if len(runs) > 1 else 0.0
    return ConfirmedPick(win, mean[win], std, len(runs), runs[(len(runs) - 1) // 2])


def confirmed_description(parent: Any, pick: ConfirmedPick, alias: str) -> str:
    """Why this version was promoted (markdown), for a confirmed pick."""
    t = pick.run.data.tags
    search = parent.data.tags.get(tags.SEARCH, parent.info.run_name)
    seed = pick.run.data.params.get("seed", "?")
    return "\n".join([
        f"Promoted as `{alias}`: the configuration of search '{search}' that won its confirmation stage, "
        f"AutoAttack accuracy **{pick.mean:.4f} ± {pick.std:.4f}** (mean ± std over {pick.n} seeds).",
        f"- this model: the median seed ({seed}), aa_acc = {pick.run.data.metrics['aa_acc']:.4f}; trial "
        f"{t.get(tags.TRIAL, '?')}, run `{pick.run.info.run_id}`, model from epoch {t.get(tags.MODEL_EPOCH, '?')}",
        f"- configuration `{pick.config_id}`: " + ", ".join(
            f"{k}={v}" for k, v in pick.run.data.params.items() if k in _searched(parent) and k != "seed"),
        "- the table of every confirmed configuration: the search's parent run, `confirmed.md`",
    ])


def _searched(parent: Any) -> set[str]:
    return {k[len("space."):] for k in parent.data.params if k.startswith("space.")}


def version_description(parent: Any, best: Any, *, metric: str, mode: str, value: float, alias: str) -> str:
    """Why this version was promoted (markdown): metric, value, trial, epoch, AutoAttack setting."""
    t = best.data.tags
    search = parent.data.tags.get(tags.SEARCH, parent.info.run_name)
    lines = [f"Promoted as `{alias}`: the best trial of search '{search}' by **{metric}** ({mode}) = {value:.4f} "
             f"among the trials with a logged model.",
             f"- trial {t.get(tags.TRIAL, '?')}, run `{best.info.run_id}`, model from epoch {t.get(tags.MODEL_EPOCH, '?')}"
             f" (best epoch {int(best.data.metrics['best_epoch']) if 'best_epoch' in best.data.metrics else '?'})",
             "- searched values: " + ", ".join(f"{k}={v}" for k, v in best.data.params.items()
                                               if k not in ("method", "model", "data", "eps", "norm", "epochs",
                                                            "workers", "floor") and "." not in k)]
    if "aa_acc" in best.data.metrics:
        aa = best.data.metrics["aa_acc"]
        se = best.data.metrics.get("aa_acc_se")
        prefix = next((k.rsplit(".", 1)[0] for k in t if k.startswith("eval.aa_") and k.endswith(".n_ex")), None)
        how = ""
        if prefix is not None:
            version = prefix[len("eval.aa_"):].rsplit("_acc", 1)[0]
            how = (f" {version} (split {t.get(prefix + '.split', '?')}, n_ex {t.get(prefix + '.n_ex', '?')}, "
                   f"eps {t.get(prefix + '.eps', '?')} {t.get(prefix + '.norm', '')})")
        lines.append(f"- AutoAttack{how}: aa_acc = {aa:.4f}" + (f" +- {se:.4f}" if se is not None else ""))
    return "\n".join(lines)


@contextlib.contextmanager
def registry_at(uri: str):
    """MLflow's fluent API (``mlflow.register_model``) pointed at ``uri`` for the block, tracking and registry;
    afterwards the registry URI is unset again and both environment variables MLflow exports are put back,
    so a later ``MlflowClient(other_uri)`` in this process uses its own store's registry, not this one."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_registry_uri(None)
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def promote(search: str, *, metric: str | None = None, mode: str = "max", alias: str = "champion",
            model_name: str | None = None, tracking_uri: str | None = None, allow_infeasible: bool = False) -> Promotion:
    """Register the best model of search ``search`` and point ``alias`` at the new version: the confirmed
    winner's median seed when the search has a confirmation and ``metric`` is None, else the best trial by
    ``metric`` (default ``val_pgd_acc``)."""
    import mlflow

    if mode not in ("max", "min"):
        raise UserError(f"--mode must be max or min, got {mode!r}")
    if any(c in search for c in "'\"`\\"):
        raise UserError(f"--search: a search name has no quotes or backslashes (got {search!r})")
    uri = resolve_tracking_uri(tracking_uri)
    cl = client(uri, registry_uri=uri)  # the registry lives in the same store
    parents = find_parent_runs(cl, search)
    if not parents:
        names = sorted({r.data.tags.get(tags.SEARCH, "") for r in all_parent_runs(cl)} - {""})
        hint = f"; searches in this store: {', '.join(names)}" if names else "; this store has no searches"
        raise UserError(f"no search named '{search}' in {uri}{hint} (check --tracking-uri)")
    parent = parents[0]
    confirmed = pick_confirmed(cl, parent) if metric is None else None
    if confirmed is not None:
        best, value, metric = confirmed.run, confirmed.mean, "confirmed_aa_acc_mean"
    else:
        metric = metric or "val_pgd_acc"
        best, value = pick_best(cl, parent, metric, mode, allow_infeasible)
    name = model_name or f"scoretune-{search}"
    source = best.data.tags[tags.MODEL_URI]
    with registry_at(uri):
        version = mlflow.register_model(source, name, tags={tags.SEARCH: search,
                                                            tags.TRIAL: best.data.tags.get(tags.TRIAL, ""),
                                                            tags.METRIC: f"{metric}={value:.6g}"})
    cl.set_registered_model_alias(name, alias, version.version)
    cl.update_model_version(name, version.version, description=confirmed_description(parent, confirmed, alias)
                            if confirmed is not None else version_description(
                                parent, best, metric=metric, mode=mode, value=value, alias=alias))
    if not (cl.get_registered_model(name).description or "").strip():
        cl.update_registered_model(name, description=(
            f"Adversarially trained models of the scoretune search '{search}' "
            f"(`scoretune promote --search {search}`); alias `{alias}` is the current pick."))
    return Promotion(model_name=name, version=str(version.version), alias=alias, run_id=best.info.run_id,
                     trial_id=best.data.tags.get(tags.TRIAL, ""), metric=metric, value=value,
                     source_uri=source)
