"""What one trial of a ``scoretune search`` runs (a Ray Tune function trainable).

The trial's config is ``{"scoretune": settings, **sampled}``: ``settings`` holds the base
experiment (a dict), the map from searched names to dotted experiment keys, and the per-trial
resources; the other entries are the values Optuna sampled (``{"beta": 3.2, "lr": 0.05}``).

* ``workers == 1``: the engine's :class:`~scoretune.engine.Trainer` runs inside the trial; each
  epoch is reported with ``tune.report(row, checkpoint=...)`` (a directory holding ``state.pt``,
  the engine's ``Trainer.state_dict()``), and a restarted trial resumes from ``tune.get_checkpoint()``.
* ``workers > 1``: the trial drives a Ray Train ``TorchTrainer`` (DDP on ``workers`` workers,
  :func:`trainables.train_loop.build_torch_trainer`) whose reports reach Tune through
  ``TuneReportCallback`` (each row then carries ``checkpoint_path``); a restarted trial continues
  the Train run from its latest checkpoint.

A failing epoch (e.g. :class:`~scoretune.engine.NonFiniteLossError`) raises: Tune marks the trial
failed and the search goes on. No MLflow here: the search driver logs everything.
"""

from __future__ import annotations

import tempfile
from typing import Any

SETTINGS_KEY = "scoretune"


def sampled_point(config: dict[str, Any]) -> dict[str, Any]:
    """The sampled values of a trial config (everything but the settings)."""
    return {k: v for k, v in config.items() if k != SETTINGS_KEY}


def trial_experiment(config: dict[str, Any], trial_id: str):
    """The :class:`~scoretune.config.ExperimentConfig` of one trial: base + sampled values, named
    after the search and the trial, with the per-trial resources in ``scaling``. Early stopping is the
    search's job (Tune stoppers), so the experiment's own ``early_stop`` rule is switched off."""
    from scoretune.config import ExperimentConfig, apply_params

    settings = config[SETTINGS_KEY]
    raw = apply_params(settings["base"], settings["targets"], sampled_point(config))
    raw["name"] = f"{settings['search']}-{trial_id}"
    raw.setdefault("early_stop", {})["rule"] = "none"
    scaling = raw.setdefault("scaling", {})
    scaling["workers"] = int(settings["workers"])
    scaling["cpus_per_worker"] = float(settings["cpus"])
    scaling["use_gpu"] = float(settings["gpus"]) > 0
    scaling["gpus_per_worker"] = float(settings["gpus"]) if float(settings["gpus"]) > 0 else None
    return ExperimentConfig.model_validate(raw)


def scoretune_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable of a search (see the module docstring)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id() or "local"
    cfg = trial_experiment(config, trial_id)
    settings = config[SETTINGS_KEY]
    if int(settings["workers"]) > 1:
        run_ray_train(cfg, settings, trial_id)
    else:
        run_in_process(cfg)


def run_in_process(cfg: Any) -> None:
    """The engine in this process: one ``tune.report`` (row + checkpoint) per epoch."""
    import torch
    from ray import tune
    from scoretune import threads
    from scoretune.engine import Trainer

    from .ray_checkpoint import load_state, write_checkpoint_dir

    if cfg.device == "cpu" or not torch.cuda.is_available():
        threads.set_torch_threads(cfg.scaling.cpus_per_worker)
    trainer = Trainer(cfg)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        trainer.load_state_dict(load_state(checkpoint, map_location=trainer.device))
    while trainer.epoch < cfg.epochs:
        row = trainer.train_one_epoch()
        with tempfile.TemporaryDirectory(prefix="scoretune-trial-", ignore_cleanup_errors=True) as tmp:
            write_checkpoint_dir(tmp, trainer.state_dict())
            tune.report(dict(row), checkpoint=tune.Checkpoint.from_directory(tmp))


def run_ray_train(cfg: Any, settings: dict[str, Any], trial_id: str) -> None:
    """Ray Train on ``cfg.scaling.workers`` workers; its per-epoch rows reach Tune through
    ``TuneReportCallback``. The Train run lives at ``settings['train_storage']/<search>-<trial_id>``
    and continues from its latest checkpoint when the trial is restarted."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train_loop import build_torch_trainer

    trainer = build_torch_trainer(
        cfg, name=cfg.name, storage_path=settings.get("train_storage"),
        run_config_callbacks=[TuneReportCallback()], resume=True,
    )
    trainer.fit()
