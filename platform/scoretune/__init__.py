"""scoretune: adversarial-training hyperparameter search implementing SCORE.

Pang et al., "Robustness and Accuracy Could Be Reconcilable by (Proper) Definition",
ICML 2022 (arXiv 2202.10103).

    import scoretune
    cfg = scoretune.load_config("configs/digits_trades_se.yaml")
    summary = scoretune.train(cfg)                                   # one training, logged to MLflow
    result = scoretune.run_search(scoretune.load_space("search_spaces/quickstart.yaml"))
    aa = scoretune.benchmark("models:/scoretune-quickstart@champion", attack="aa-standard")

Layers, imports pointing down only: the math (``losses``, ``attacks``, ``bounds``, ``models``, ``data``,
``config``, ``stopping``, ``robustness``) -> ``engine`` -> ``tracking`` (MLflow) -> ``trainables`` (what a
Ray worker or trial runs) -> drivers (``drivers``, ``search``, ``evaluate``, ``launch``) -> ``commands``
and ``cli``. The names below are the public API; they are imported on first use, so ``import scoretune``
(and ``scoretune --help``) loads neither torch, Ray nor MLflow.

Importing the package applies the thread policy (:mod:`scoretune.threads`: threads sized to the CPUs, and in
the engine's loops to the CPUs other processes leave free), before anything here can load torch.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from . import threads as _threads

_threads.apply()

__version__ = "0.1.0"

NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
"""Usage telemetry off (MLflow's, Ray's usage stats): set here, before MLflow or Ray is imported, in every
scoretune process and so in every process it starts (Ray's workers included). A variable the user set
already is kept: ``MLFLOW_DISABLE_TELEMETRY=false`` or ``RAY_USAGE_STATS_ENABLED=1`` opts in."""
for _key, _value in NO_TELEMETRY.items():
    os.environ.setdefault(_key, _value)
del _key, _value

_EXPORTS: dict[str, tuple[str, ...]] = {
    "scoretune.errors": ("UserError",),
    "scoretune.config": ("ExperimentConfig", "ConfigError", "load_config", "build_config"),
    "scoretune.losses": ("Objective", "divergence", "LOSS_NAMES", "METHODS"),
    "scoretune.attacks": ("AttackConfig", "pgd"),
    "scoretune.bounds": ("InnerMax", "estimate_C", "madry_risk", "score_risk", "standard_risk", "madry_floor",
                         "theorem1_check", "corollary1_check"),
    "scoretune.data": ("load_dataset", "available_datasets", "DatasetError"),
    "scoretune.models": ("build_model", "available_models"),
    "scoretune.stopping": ("FloorRule", "FloorRefiner", "PlateauRule"),
    "scoretune.engine": ("Trainer", "selection_metric", "model_from_checkpoint", "CheckpointError",
                         "NonFiniteLossError", "robust_ce"),
    "scoretune.floor_estimate": ("estimate_floor", "FloorEstimate", "FloorEstimateError", "clip_for_floor",
                                 "resolve_auto"),
    "scoretune.robustness": ("EvalResult", "clean_accuracy", "pgd_accuracy", "autoattack_accuracy"),
    "scoretune.tracking.model_refs": ("load_model", "LoadedModel"),
    "scoretune.tracking.promote": ("promote", "Promotion"),
    "scoretune.tracking.buffer": ("BufferedWriter", "replay_journal"),
    "scoretune.drivers.train": ("train",),
    "scoretune.search": ("SearchSpace", "SearchSummary", "load_space", "build_space", "run_search"),
    "scoretune.evaluate": ("benchmark",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", *sorted(_WHERE)]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'scoretune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
