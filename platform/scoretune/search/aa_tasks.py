"""The end-of-search AutoAttack of the top-k models as Ray tasks, all at once.

After the trials end, :func:`scoretune.search.finalize.finalize_search` logs the top-k (or Pareto)
models and hands their checkpoints here. Each model's AutoAttack is one Ray task holding the trial's
own resources (``resources.cpus`` CPUs, ``resources.gpus`` GPUs: one model per core or per GPU), so
the k evaluations run side by side instead of one after another in the driver. A task loads the
checkpoint and the held-out split itself and returns the :class:`~scoretune.robustness.EvalResult`;
the driver logs it into the trial's run (the search's MLflow store keeps one writer).

Same numbers as in the driver for a fixed seed: the task calls the same
:func:`scoretune.evaluate.benchmark` with the trial's seed, on the same split, and runs torch on as
many threads as the driver would give one trial (``resources.cpus``). Without a running Ray (a
library caller) the jobs run in this process, one after another.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..tracking import tags
from .mlflow_io import log_metrics
from .space import SearchSpace


@dataclasses.dataclass
class AutoAttackJob:
    """One model to attack: the trial's run, its best checkpoint (a ``ray.tune.Checkpoint``) and epoch."""

    trial_id: str
    run_id: str
    checkpoint: Any
    epoch: int
    model_id: str | None = None  # the trial's LoggedModel: aa_acc is attached to it too (the Models tab ranks by it)


def autoattack_net(net: Any, cfg: Any, space: SearchSpace, **log_to: Any):
    """AutoAttack (``space.autoattack``) of ``net`` (trained with ``cfg``) on its held-out split at its own
    eps and norm, through :func:`scoretune.evaluate.benchmark`; ``log_to`` is passed on to it
    (``tracking_uri=..., log_to=run_id`` logs the result). Returns the
    :class:`~scoretune.robustness.EvalResult`."""
    from ..data import load_dataset
    from ..evaluate import benchmark

    aa = space.autoattack
    ds = load_dataset(cfg.data.name, root=cfg.data.root, val_size=cfg.data.val_size, seed=cfg.seed,
                      **cfg.data.options)
    if ds.info.pixel_range is None:
        raise ValueError(f"AutoAttack needs inputs in [0, 1]; {cfg.data.name} has unbounded inputs "
                         "(set autoattack.version: none in the search space)")
    split = aa.split if aa.split == "test" or len(ds.val) else "test"
    return benchmark(net, data=ds, split=split, n_ex=aa.n_ex, attack=f"aa-{aa.version}", eps=cfg.attack.eps,
                     norm=cfg.attack.norm, batch_size=aa.batch_size, device="auto", seed=cfg.seed, **log_to)


def attack_checkpoint(checkpoint: Any, space: SearchSpace, threads: int | None = None):
    """:func:`autoattack_net` of the network in ``checkpoint`` (nothing is logged)."""
    import torch

    from trainables.ray_checkpoint import load_state

    from ..engine import model_from_checkpoint

    if threads:
        torch.set_num_threads(max(1, int(threads)))
    net, cfg = model_from_checkpoint(load_state(checkpoint))
    return autoattack_net(net, cfg, space)


def _remote_attack(checkpoint: Any, space_dump: dict[str, Any], threads: int):
    return attack_checkpoint(checkpoint, SearchSpace.model_validate(space_dump), threads)


def run_autoattack_jobs(cl: Any, tracking_uri: str, jobs: list[AutoAttackJob], space: SearchSpace,
                        out: Callable[[str], None] = print) -> dict[str, float | None]:
    """Attack every job's model (Ray tasks when Ray is running, see the module docstring), log each
    result into its trial's run as :func:`scoretune.evaluate.benchmark` would (``aa_<version>_acc``,
    ``eval.*`` and ``aa_check.*`` tags) plus ``aa_acc`` at the model's epoch; a failure becomes the run's
    ``scoretune.autoattack_error`` tag. Returns ``{trial_id: aa_acc or None}``."""
    if not jobs or space.autoattack.version == "none":
        return {}
    import ray

    threads = max(1, int(space.resources.cpus))
    outcomes: dict[str, Any] = {}
    if ray.is_initialized():
        res: dict[str, float] = {"num_cpus": float(space.resources.cpus)}
        if space.resources.gpus > 0:
            res["num_gpus"] = float(space.resources.gpus)
        task = ray.remote(max_retries=0, **res)(_remote_attack)
        dump = space.model_dump(by_alias=True, exclude_none=True)
        refs = {j.trial_id: task.remote(j.checkpoint, dump, threads) for j in jobs}
        for tid, ref in refs.items():
            try:
                outcomes[tid] = ray.get(ref)
            except Exception as e:  # a RayTaskError: keep the cause
                outcomes[tid] = getattr(e, "cause", None) or e
    else:
        for j in jobs:
            try:
                outcomes[j.trial_id] = attack_checkpoint(j.checkpoint, space, threads)
            except Exception as e:
                outcomes[j.trial_id] = e
    return {j.trial_id: _log_outcome(cl, tracking_uri, j, outcomes[j.trial_id]) for j in jobs}


def _log_outcome(cl: Any, tracking_uri: str, job: AutoAttackJob, outcome: Any) -> float | None:
    from ..evaluate import LoadedModel, log_result
    from .summary import aa_se

    if isinstance(outcome, BaseException):
        cl.set_tag(job.run_id, tags.AUTOATTACK_ERROR, f"{type(outcome).__name__}: {str(outcome)[:300]}")
        return None
    loaded = LoadedModel(net=None, ref=outcome.settings.get("model", "model"), kind="module")
    outcome.logged = log_result(outcome, loaded, outcome.settings, tracking_uri, run_id=job.run_id)
    se = aa_se(outcome.robust_acc, outcome.n)
    log_metrics(cl, job.run_id, {"aa_acc": outcome.robust_acc, "aa_acc_se": se}, step=job.epoch,
                model_id=job.model_id)
    return outcome.robust_acc
