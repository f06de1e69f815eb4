"""``scoretune search``: adversarial-training hyperparameter search (Ray Tune + Optuna + MLflow).

    from scoretune.search import load_space, run_search
    summary = run_search(load_space("search_spaces/quickstart.yaml"))

Modules by concept (imports point down this list or to lower layers only):

* :mod:`.space`    -- the search-space schema and its validation against the base experiment;
* :mod:`.report`   -- ranking, best-epoch values, Pareto front, how a trial ended, the summary tables;
* :mod:`.study`    -- the Optuna study: sampler, storage, warm start, constraints, importance;
* :mod:`.tuner`    -- the Tune wiring: searcher, scheduler, stoppers, the trainable and its settings;
* :mod:`.callback` -- the MLflow and progress Tune callbacks, the parent run;
* :mod:`.resume`   -- all of resuming: the state file, superseded runs, checkpoints pruned under Tune;
* :mod:`.plots`    -- the search's figures;
* :mod:`.finalize` -- after the search: models, AutoAttack, the parent's summary;
* :mod:`.driver`   -- ``run_search``: checks, the floor, Ray, the ``Tuner``.

The names below are re-exported lazily (on first use), so ``import scoretune.search.space`` (or
``from scoretune.search import build_space``) stays free of Ray and MLflow, as the space module is.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "space": ("ObjectiveSpec", "ParamSpec", "SearchSpace", "build_space", "load_space", "validate_space"),
    "report": ("best_values", "better", "classify_trial", "dominates", "pareto_front",
               "SearchSummary", "TrialSummary", "format_report", "format_table", "point_label"),
    "finalize": ("finalize_search",),
    "driver": ("build_tuner", "check_dataset", "experiment_path", "run_search"),
    "study": ("study_storage_url", "WarmStart", "warm_start_trials", "param_importances", "format_importance"),
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
