"""What the Tune trials of a search are: their names, the constant settings every trial gets, and the
trial function with its resources (:func:`trainables.tune_trainable.scoretune_trial`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import pin_data_paths
from .space import SearchSpace

PREFIX = "trial_"


def trial_name(trial: Any) -> str:
    """Trial (and trial directory) names: ``trial_<id>`` (short, and the id is what MLflow tags carry)."""
    return f"{PREFIX}{trial.trial_id}"


def trial_id_of(result: Any) -> str | None:
    """The trial id of a Tune ``Result``: its reported ``trial_id``, else read off its directory name."""
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    name = Path(str(result.path)).name
    return name[len(PREFIX):] if name.startswith(PREFIX) else None


def trial_settings(space: SearchSpace, *, name: str, ray_path: str) -> dict[str, Any]:
    """The constant part of every trial's config (see :mod:`trainables.tune_trainable`); the base's
    data paths are made absolute (the default root included), as trials run in their own directory."""
    return {
        "search": name, "base": pin_data_paths(space.base), "targets": space.targets,
        "workers": space.resources.workers, "cpus": space.resources.cpus, "gpus": space.resources.gpus,
        "train_storage": f"{ray_path}/train_runs",
    }


def trainable_for(space: SearchSpace):
    """The trial function with its resources: ``cpus``/``gpus`` for an in-process trial; for Ray Train
    trials the Train workers hold the resources and the trial itself takes a sliver of a CPU."""
    from ray import tune

    from trainables.tune_trainable import scoretune_trial

    r = space.resources
    if r.workers > 1:
        return tune.with_resources(scoretune_trial, {"cpu": 0.01})
    res = {"cpu": r.cpus}
    if r.gpus > 0:
        res["gpu"] = r.gpus
    return tune.with_resources(scoretune_trial, res)
