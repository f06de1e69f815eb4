"""Every MLflow tag scoretune writes or reads, in one place (no MLflow import: plain strings).

``promote``, ``status``, the search callback and the training driver all import their tag names from
here, so a reader of the store and its writer cannot drift apart.
"""

from __future__ import annotations

KIND = "scoretune.kind"                 # train | search | eval | bound | toy
DATASET = "scoretune.dataset"
SEARCH = "scoretune.search_name"
RAY_PATH = "scoretune.ray_path"
RAY_RUN = "scoretune.ray_run"
WORKERS = "scoretune.workers"
TRIAL = "scoretune.trial_id"
STATUS = "scoretune.status"
REASON = "scoretune.stop_reason"
ERROR = "scoretune.error"
BEST_CKPT = "scoretune.best_checkpoint"
CHECKPOINTS = "scoretune.checkpoints"
RUN_DIR = "scoretune.run_dir"           # where a train run's checkpoints live: finds the run on resume
MODEL_URI = "scoretune.model_uri"
MODEL_EPOCH = "scoretune.model_epoch"
MODEL_REF = "scoretune.model_ref"
METRIC = "scoretune.metric"
BEST_TRIAL = "scoretune.best_trial_id"      # on a search's parent run
BEST_RUN = "scoretune.best_run_id"
PARETO = "scoretune.pareto_trials"
AUTOATTACK_ERROR = "scoretune.autoattack_error"
WARM_START_FROM = "scoretune.warm_start_from"      # on a search's parent run: the source of its warm start
WARM_START_TRIALS = "scoretune.warm_start_trials"  # how many finished trials it added to the study
WARM_START_RUNS = "scoretune.warm_start_parent_runs"
OPTUNA_STORAGE = "scoretune.optuna_storage"  # on a search's parent run: the Optuna study's RDB URL and name
OPTUNA_STUDY = "scoretune.optuna_study"
FEASIBLE = "scoretune.feasible"         # on a trial's run when the space has constraints: true | false
STAGE = "scoretune.stage"               # a search trial's run: search (no tag) | confirm (the confirmation stage)
CONFIG_ID = "scoretune.config_id"       # a confirmation run: the configuration (its params but the seed) it trains
CONFIRMED = "scoretune.confirmed_config"  # search parent: the config_id that won the confirmation
SUPERSEDED = "scoretune.superseded"     # a failed attempt that a resumed search restarted as a new trial
WRITE_KEY = "scoretune.write_key"      # the key of a run created through tracking.buffer (finds it again on replay)
FLOOR_SOURCE = "scoretune.floor.source"        # search parent: exact | proxy | given
FLOOR_DETAIL = "scoretune.floor.detail"        # search parent: how the floor was measured (one line)
FLOOR_CACHE = "scoretune.floor.cache"          # search parent: the cached proxy record it came from
FLOOR_STOP_EPOCH = "scoretune.floor.stop_epoch"  # a trial the floor stopped: the epoch it stopped at
FLOOR_STOP_VALUE = "scoretune.floor.stop_value"  # ... the watched metric's value at that epoch
FLOOR_VALUE = "scoretune.floor.value"          # ... the floor (C^l1)^2/2 it was compared with
FLOOR_METRIC = "scoretune.floor.metric"        # ... the metric watched (train_r_madry)
FLOOR_REFINED = "scoretune.floor.refined"      # search parent: the refined floor now and where it came from
PARENT = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"                # MLflow's own: a log_batch or set_tag of it renames the run
NOTE = "mlflow.note.content"            # a run's / experiment's markdown description in the MLflow UI
EVAL_PREFIX = "eval."                   # eval.<metric>.<setting>: how an evaluation metric was measured
AA_CHECK_PREFIX = "aa_check."           # aa_check.<name>: an AutoAttack check that fired (EvalResult.check_tags)

__all__ = [n for n in dir() if n.isupper()]
