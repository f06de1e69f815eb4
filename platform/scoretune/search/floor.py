"""The floor (C^l1)^2/2 of SCORE's floor stopper (Corollary 1 of Pang et al. 2022) for a search: the
space's ``stoppers.floor.value``; ``estimate: auto`` (:mod:`scoretune.floor_estimate`: the exact toy
posterior, else a cached proxy trained at the search's eps); or a user's ``proxy_checkpoint``.
:func:`apply_floor` turns ``objective.clip: auto`` in the base into the clip of that floor, and
:func:`log_floor` puts the floor and C^l1 +- standard error on the search's parent run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..floor_estimate import FloorEstimate, clip_for_floor, estimate_floor
from ..tracking import tags
from .space import SearchSpace


def floor_cache_dir(space: SearchSpace) -> Path | None:
    """Where the proxies of ``estimate: auto`` are cached: ``storage_path/floor_cache`` (local storage
    only; None for remote storage, where each search trains its own)."""
    if "://" in space.storage_path:
        return None
    return Path(space.storage_path).expanduser().absolute() / "floor_cache"


def _base_clip_auto(space: SearchSpace) -> bool:
    return (space.base.get("objective") or {}).get("clip") == "auto"


def resolve_floor_estimate(space: SearchSpace, out: Callable[[str], None] = print) -> FloorEstimate | None:
    """The floor estimate of the search (None without a floor stopper or ``clip: auto``)."""
    f = space.stoppers.floor
    if f is None and not _base_clip_auto(space):
        return None
    if f is not None and f.value is not None:
        return FloorEstimate(float(f.value), float("nan"), float("nan"), 0, "given", "stoppers.floor.value")
    base = space.base_config()
    key = "stoppers.floor.estimate" if f is not None else "base.objective.clip"
    if f is not None and f.proxy_checkpoint is not None:
        est = _from_checkpoint(space, f)
    else:
        est = estimate_floor(base, cache_dir=floor_cache_dir(space), samples=f.samples if f else 512,
                             proxy_epochs=f.proxy_epochs if f else None, proxy_beta=f.proxy_beta if f else None,
                             floor_key=key, out=out)
    out(est.line())
    return est


def resolve_floor(space: SearchSpace, out: Callable[[str], None] = print) -> float | None:
    """The floor of the floor stopper (None without one)."""
    if space.stoppers.floor is None:
        return None
    est = resolve_floor_estimate(space, out)
    return None if est is None else est.floor


def apply_floor(space: SearchSpace, est: FloorEstimate | None) -> SearchSpace:
    """``space`` with ``base.objective.clip: auto`` replaced by :func:`clip_for_floor` of the floor
    (and clip_mode 'smoothing'); unchanged otherwise."""
    if est is None or not _base_clip_auto(space):
        return space
    base = dict(space.base)
    base["objective"] = {**base["objective"], "clip": clip_for_floor(est.floor), "clip_mode": "smoothing"}
    return SearchSpace.model_validate({**space.model_dump(by_alias=True, exclude_none=True), "base": base})


def log_floor(logger: Any, est: FloorEstimate | None) -> None:
    """The floor on the search's parent run: params and metrics ``floor``, ``floor_c_l1``,
    ``floor_c_l1_se``, ``floor_n``; tags ``scoretune.floor.source`` / ``.detail`` / ``.cache``."""
    if est is None:
        return
    values = {"floor": est.floor, "floor_c_l1": est.c_l1, "floor_c_l1_se": est.c_l1_se, "floor_n": est.n}
    logger.log_params({k: v for k, v in values.items()})
    logger.log_metrics({k: float(v) for k, v in values.items() if v == v}, step=0)
    logger.set_tags({tags.FLOOR_SOURCE: est.source, tags.FLOOR_DETAIL: est.detail[:5000],
                     tags.FLOOR_CACHE: est.cache_path or ""})


def _from_checkpoint(space: SearchSpace, f: Any) -> FloorEstimate:
    import time

    import torch

    from ..bounds import c_l1_pgd, estimate_C, madry_floor
    from ..data import load_dataset, to_float
    from ..engine import model_from_checkpoint

    t0 = time.perf_counter()
    base = space.base_config()
    net, _ = model_from_checkpoint(f.proxy_checkpoint)
    ds = load_dataset(base.data.name, root=base.data.root, val_size=base.data.val_size, seed=base.seed,
                      **base.data.options)
    split = ds.val if len(ds.val) else ds.train
    if len(split) == 0:
        raise UserError("stoppers.floor.proxy_checkpoint: the dataset has no samples to measure C^l1 on")
    xs = to_float(split.x[: f.samples])
    gen = torch.Generator().manual_seed(space.seed)
    inner = c_l1_pgd(base.attack.eps, base.attack.norm, ds.info.pixel_range, gen)
    c = estimate_C(net, xs, inner, "l1", logits=True, keep_values=False)
    floor = madry_floor(c.mean)
    return FloorEstimate(floor, c.mean, c.stderr, c.n, "proxy", f"proxy checkpoint {f.proxy_checkpoint}",
                         seconds=time.perf_counter() - t0)
