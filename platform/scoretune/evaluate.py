"""RobustBench-style benchmark: one call from a model reference to logged robust accuracy.

    result = benchmark("models:/scoretune-quickstart@champion")        # AutoAttack standard
    result = benchmark(net, data=ds, eps=8/255, norm="linf", log_to=run_id)

:func:`benchmark` resolves the reference (:mod:`scoretune.tracking.model_refs`), loads the split it
is evaluated on (defaults from the model's training config), checks eps against the data's pixel
range, runs the attack (:mod:`scoretune.robustness`) and optionally logs the metrics and tags into an
MLflow run. ``scoretune evaluate`` is a thin argument parser over it.

Tag scheme (``scoretune.tracking.tags``): the metrics of :meth:`EvalResult.metrics` (``clean_acc``,
``<attack>_acc``, ``aa_<stage>_acc``), ``eval.<metric>.<setting>`` for every setting (model, eps,
norm, dataset, split, n_ex, subset_seed, seed, batch_size, seconds; ``aa_checks`` for AutoAttack) and
``aa_check.<name>`` per AutoAttack check that fired.

``n_ex`` evaluates a fixed, seeded, class-stratified sample of the split
(:func:`scoretune.data.eval_subset` with ``subset_seed``), never its first N examples: a split stored
in class order (mnist5k's test split) would otherwise be evaluated on a few classes only. The sample
depends on the split, N and ``subset_seed`` alone (not on the attack ``seed``), so models compared with
the same N see the same examples.

The eps rule: with pixel range [lo, hi] (width w) and d input values per example, the eps-ball
already contains the whole box once eps >= w (linf) or eps >= w * sqrt(d) (l2, the box's diagonal):
every input is then reachable and the number means nothing, so a larger eps is refused (it is
almost always pixel units confused with [0, 1] units, e.g. ``--eps 8`` for 8/255).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch.nn as nn

from .errors import UserError
from .robustness import ATTACKS, EvalResult, Log, Progress, model_fingerprint
from .robustness import evaluate as evaluate_tensors
from .tracking.model_refs import REF_HELP, ExportedModel, LoadedModel, load_model

__all__ = ["ATTACKS", "REF_HELP", "EVAL_EXPERIMENT", "EvalResult", "ExportedModel", "LoadedModel", "benchmark",
           "check_eps", "load_model", "log_result"]

EVAL_EXPERIMENT = "scoretune-eval"


def benchmark(
    model_ref: str | nn.Module | LoadedModel,
    *,
    data: Any = None,
    split: str = "test",
    n_ex: int | None = None,
    subset_seed: int = 0,
    attack: str = "aa-standard",
    eps: float | None = None,
    norm: str | None = None,
    batch_size: int = 250,
    device: Any = "auto",
    seed: int = 0,
    restarts: int = 1,
    data_root: str | None = None,
    tracking_uri: str | None = None,
    log_to: str | None = None,
    state_path: str | os.PathLike | None = None,
    state_dir: str | os.PathLike | None = None,
    log: Log | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Evaluate ``model_ref`` under ``attack`` and return the :class:`EvalResult`.

    ``model_ref``: a reference (``REF_HELP``), an already loaded :class:`LoadedModel`, or an
    in-memory ``nn.Module`` (then ``data`` and ``eps`` are required; ``norm`` defaults to linf).
    ``data``: a dataset name (default: the model's training dataset, with its root, val split and
    options) or a loaded ``scoretune.data.Dataset``. ``split``: test | val; ``n_ex``: N examples of it,
    the class-stratified sample :func:`scoretune.data.eval_subset` draws with ``subset_seed`` (None: all).
    ``eps``/``norm`` default to the model's training attack. ``log_to``: None (no MLflow), a run id,
    or ``"auto"``: the model's own run when it came from MLflow, else a new run in experiment
    ``scoretune-eval``. ``state_path`` (a file) or ``state_dir`` (a file named after the evaluation
    in it): AutoAttack's resumable state.
    """
    from .engine import resolve_device

    dev = resolve_device(device) if isinstance(device, str) else device
    if isinstance(model_ref, LoadedModel):
        loaded = model_ref
    elif isinstance(model_ref, nn.Module):
        loaded = LoadedModel(net=model_ref, ref=type(model_ref).__name__, kind="module")
    else:
        loaded = load_model(model_ref, dev, tracking_uri=tracking_uri)
    x, y, info, dataset, split_size = _eval_data(loaded, data, split, n_ex, subset_seed, data_root)
    eps = eps if eps is not None else loaded.eps
    if eps is None:
        raise UserError(f"no eps is known for {loaded.ref}; pass --eps (e.g. --eps 8/255)")
    norm = norm or loaded.norm or "linf"
    check_eps(float(eps), norm, info.pixel_range, tuple(x.shape[1:]))
    settings = {"model": loaded.ref, "attack": attack, "eps": eps, "norm": norm, "dataset": dataset,
                "split": split, "n_ex": int(x.shape[0]), "subset_seed": subset_seed, "seed": seed,
                "batch_size": batch_size}
    if state_path is None and state_dir is not None and attack.startswith("aa-"):
        key = json.dumps({**settings, "weights": model_fingerprint(loaded.net)}, sort_keys=True)
        state_path = Path(state_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    result = evaluate_tensors(loaded.net, x, y, attack=attack, eps=eps, norm=norm, batch_size=batch_size,
                              device=dev, seed=seed, restarts=restarts, pixel_range=info.pixel_range,
                              state_path=state_path if attack.startswith("aa-") else None, log=log,
                              progress=progress)
    result.settings, result.source_run_id = settings, loaded.run_id
    result.split_size = split_size if split_size > x.shape[0] else None
    result.state_path = str(state_path) if state_path is not None and attack.startswith("aa-") else None
    if log_to is not None:
        result.logged = log_result(result, loaded, settings, tracking_uri,
                                   run_id=None if log_to == "auto" else log_to)
    return result


def check_eps(eps: float, norm: str, pixel_range: tuple[float, float] | None, input_shape: tuple[int, ...]) -> None:
    """Refuse an eps whose ball contains the whole pixel box (see the module docstring)."""
    if eps < 0:
        raise UserError(f"--eps must be >= 0, got {eps:g}")
    if pixel_range is None:  # unbounded inputs (toy): no box to compare with
        return
    lo, hi = pixel_range
    width = hi - lo
    bound = width if norm == "linf" else width * math.sqrt(math.prod(input_shape))
    if eps > bound:
        what = "the pixel range" if norm == "linf" else f"the diagonal of the {math.prod(input_shape)}-value box"
        raise UserError(f"--eps {eps:g} is larger than {what} [{lo:g}, {hi:g}] ({bound:.4g}) of the data, so every "
                        f"input is reachable under {norm}; give eps in the data's units, e.g. --eps 8/255")


def _eval_data(loaded: LoadedModel, data: Any, split: str, n_ex: int | None, subset_seed: int,
               data_root: str | None):
    """(x, y, dataset info, dataset name, the split's size) for the requested split: ``n_ex`` examples
    of it, the stratified sample :func:`scoretune.data.eval_subset` draws with ``subset_seed``."""
    from .data import DatasetError, available_datasets, eval_subset, load_dataset, to_float

    if split not in ("test", "val"):
        raise UserError(f"split must be test or val, got {split!r}")
    if data is not None and not isinstance(data, str):
        ds, name = data, data.info.name
    else:
        name = data or loaded.dataset
        if not name:
            raise UserError(f"cannot tell which dataset {loaded.ref} was trained on; pass --data NAME "
                            f"(one of: {', '.join(available_datasets())})")
        same = name == loaded.dataset
        try:
            ds = load_dataset(
                name, root=data_root or (loaded.data_root if same else None),
                val_size=loaded.val_size if same and loaded.val_size is not None else 0.1,
                seed=loaded.data_seed if same and loaded.data_seed is not None else 0,
                **(loaded.data_options if same else {}),
            )
        except DatasetError as e:  # data.py's hints name the train flag; evaluate's is --data-root
            raise DatasetError(str(e).replace("--set data.root=DIR", "--data-root DIR")) from None
        except (ValueError, TypeError) as e:
            raise UserError(str(e)) from None
    part = ds.test if split == "test" else ds.val
    if len(part) == 0:
        raise UserError(f"the {split} split of {name} is empty (trained with data.val_size=0?); use --split test")
    try:
        sample = eval_subset(part, n_ex, subset_seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    x, y = to_float(sample.x), sample.y
    spec_shape = tuple(loaded.spec["input_shape"]) if loaded.spec and loaded.spec.get("input_shape") else None
    if spec_shape is not None and spec_shape != tuple(x.shape[1:]):
        raise UserError(f"the model takes inputs of shape {spec_shape} but {name} has {tuple(x.shape[1:])}; "
                        "pass the --data it was trained on")
    return x, y, ds.info, name, len(part)


def log_result(result: EvalResult, loaded: LoadedModel, settings: dict[str, Any], tracking_uri: str | None,
               *, run_id: str | None = None) -> dict[str, str]:
    """Log ``result`` (metrics + ``eval.*``/``aa_check.*`` tags) into ``run_id``, else the model's run,
    else a new run in experiment ``scoretune-eval``. Returns ``{'run_id', 'tracking_uri', 'where'}``."""
    from mlflow.entities import Metric, RunTag

    from .tracking import RunLogger, client, finite_metrics, resolve_tracking_uri, tags

    metrics = finite_metrics(result.metrics())
    prefix = f"{tags.EVAL_PREFIX}{result.metric_name or 'clean'}."
    run_tags = {prefix + k: str(v) for k, v in settings.items() if k != "attack"}
    run_tags[prefix + "seconds"] = f"{result.seconds:.1f}"
    if result.attack.startswith("aa-"):
        run_tags[prefix + "aa_checks"] = ",".join(c.name for c in result.checks) or "none"
        run_tags.update(result.check_tags())
    target = run_id or loaded.run_id
    if target:
        uri = (loaded.tracking_uri if target == loaded.run_id else None) or resolve_tracking_uri(tracking_uri)
        ts = int(time.time() * 1000)
        client(uri).log_batch(target, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()],
                              tags=[RunTag(k, v[:5000]) for k, v in run_tags.items()])
        return {"run_id": target, "tracking_uri": uri, "where": "model run" if target == loaded.run_id else "run"}
    logger = RunLogger(tracking_uri, EVAL_EXPERIMENT, run_name=f"eval {Path(loaded.ref).name} {result.attack}",
                       tags={tags.KIND: "eval", tags.MODEL_REF: loaded.ref})
    logger.log_params(settings)
    logger.log_metrics(metrics)
    logger.set_tags(run_tags)
    logger.end("FINISHED")
    return {"run_id": logger.run_id, "tracking_uri": logger.uri, "where": f"new run in '{EVAL_EXPERIMENT}'"}
