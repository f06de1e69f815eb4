"""``scoretune search``: adversarial-training hyperparameter search (Ray Tune + Optuna + MLflow).

    from scoretune.search import load_space, run_search
    summary = run_search(load_space("search_spaces/quickstart.yaml"))

Modules, each with one job (imports point down this list or to lower layers only):

* :mod:`.space`     -- the search-space schema, ``load_space`` / ``build_space``;
* :mod:`.validate`  -- the space's rules across the base experiment (what pydantic cannot check);
* :mod:`.ranking`   -- better / best-epoch values, Pareto dominance and front, how a trial ended;
* :mod:`.summary`   -- ``TrialSummary`` / ``SearchSummary``, ranking, the results table and report;
* :mod:`.mlflow_io` -- the parent run, the experiment id, batched metric logging;
* :mod:`.searcher`  -- the Optuna searcher, the sampler, ASHA, the floor and plateau stoppers;
* :mod:`.floor`     -- the floor (C^l1)^2/2 of the floor stopper;
* :mod:`.trials`    -- trial names, the trials' constant settings, the trainable with its resources;
* :mod:`.callback`  -- the MLflow and progress Tune callbacks;
* :mod:`.plots`, :mod:`.finalize` -- after the search: plots, models, AutoAttack, the parent's summary;
* :mod:`.state`, :mod:`.resume` -- the search's state file; ending the runs a resume does not continue;
* :mod:`.study_storage` -- where the Optuna study lives (RDB: SQLite beside the MLflow store by default);
* :mod:`.warm_start` -- an earlier search's finished trials as the new study's first trials;
* :mod:`.feasibility`, :mod:`.importance` -- constraints after the search; PED-ANOVA importance;
* :mod:`.dashboard` -- optuna-dashboard on the study (``scoretune dashboard``);
* :mod:`.driver`    -- ``run_search``: checks, Ray, the ``Tuner``, resume.

The names below are re-exported lazily (on first use), so ``import scoretune.search.space`` (or
``from scoretune.search import build_space``) stays free of Ray and MLflow, as the space module is.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "space": ("ObjectiveSpec", "ParamSpec", "SearchSpace", "build_space", "load_space"),
    "validate": ("validate_space",),
    "ranking": ("best_values", "better", "classify_trial", "dominates", "pareto_front"),
    "summary": ("SearchSummary", "TrialSummary", "format_report", "format_table", "point_label"),
    "finalize": ("finalize_search",),
    "driver": ("build_tuner", "check_dataset", "experiment_path", "run_search"),
    "study_storage": ("study_storage_url",),
    "warm_start": ("WarmStart", "warm_start_trials"),
    "importance": ("param_importances", "format_importance"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
