"""The automatic floor of SCORE's early-stopping rule: C^l1 estimated with no checkpoint from the user.

Corollary 1 of Pang et al. (ICML 2022) gives R_Madry^KL >= (C^l1)^2 / 2 for a self-consistent model,
with C^l1 = E_x max_{x' in B(x)} ||p_d(.|x) - p_d(.|x')||_1 a property of the data alone. p_d is
known exactly only for the toy. Elsewhere (:func:`estimate_floor`):

1. **The proxy.** A short TRADES-KL training (``beta``, ``epochs`` ``proxy_epochs``) of the run's
   own model on the run's own training split, at the run's eps and norm. Its cross-entropy term is
   minimised by the posterior itself; its KL term asks the posterior to be consistent within the
   ball. On images (:func:`default_proxy_beta`: ``beta = 1``, the two weighed equally) the KL term
   is needed: a naturally trained network puts a cliff inside almost every ball that p_d does not
   have (a digit's label does not change within eps), so C^l1 comes out about 2 and the floor
   about 2 (measured on digits at eps 0.2: C^l1 = 1.93, every trial would stop at once), while a
   large beta flattens p_theta and drives the floor to 0 (beta 0.3 / 1: floor 0.63 / 0.39). On
   low-dimensional inputs (the toy) the network class is smooth and natural training (``beta = 0``)
   estimates p_d directly: there the KL term only biases C^l1 down (toy, eps 1: the proxy with
   beta 0 lands at 1.00x the exact floor, beta 1 at 0.43x).
2. **C^l1 on held-out data.** The proxy's constant on up to ``samples`` points of the validation
   split (the training split when there is none): the per-sample l1 change of the proxy's posterior
   over B(x), maximised by PGD (20 steps, 2 antithetic restarts + a fine run each:
   :func:`scoretune.bounds.estimate_C`), mean +- standard error. Held-out points, because the
   proxy's posterior is least overfitted there.
3. **The cache.** The proxy checkpoint and its C^l1 live under ``cache_dir`` keyed by what they
   depend on: (data name, options, root, val_size, the split seed, eps, norm, model, proxy recipe,
   samples). The record also holds a SHA-256 of the split's bytes: a cache entry whose key or
   data fingerprint no longer match (the data files changed, another eps) is retrained, never
   silently reused; a corrupt entry is retrained too.

``clip: auto`` (:func:`clip_for_floor`) turns the floor into a label-smoothing clip c with
-log(1 - c) = floor: the per-sample training loss stops pushing a sample once its prediction is as
confident as a model sitting exactly on the floor (the per-sample bound equals the floor).

Engine layer: imports the engine and the math, never Ray, MLflow or Optuna.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError

__all__ = [
    "PROXY_BETA",
    "default_proxy_beta",
    "FloorEstimate",
    "FloorEstimateError",
    "estimate_floor",
    "clip_for_floor",
    "resolve_auto",
    "needs_floor",
]

PROXY_BETA = 1.0  # the proxy's TRADES beta on images; 0 on other inputs (default_proxy_beta)
_RECORD_FORMAT = "scoretune-floor-proxy-v1"
_TOY_GRID = 401


class FloorEstimateError(UserError, ValueError):
    """The automatic floor cannot be estimated (or came out NaN/negative): one line naming the key."""


@dataclass(frozen=True)
class FloorEstimate:
    """The floor (C^l1)^2/2 and where it came from. ``c_l1`` +- ``c_l1_se`` over ``n`` points."""

    floor: float
    c_l1: float
    c_l1_se: float
    n: int
    source: str                      # 'exact' (toy posterior) or 'proxy'
    detail: str                      # one line: how it was measured
    cache_path: str | None = None
    reused: bool = False
    seconds: float = 0.0
    key: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        how = "reused from cache" if self.reused else f"{self.seconds:.0f} s"
        return (f"floor (C^l1)^2/2 = {self.floor:.4g}  (C^l1 = {self.c_l1:.4g} ± {self.c_l1_se:.2g}, n={self.n}; "
                f"{self.detail}; {how})")


def clip_for_floor(floor: float) -> float:
    """The label-smoothing clip c whose cross-entropy bound -log(1 - c) equals ``floor``: c = 1 - e^-floor."""
    f = float(floor)
    if not math.isfinite(f) or f < 0:
        raise FloorEstimateError(f"objective.clip: 'auto' needs a finite floor >= 0, got {f}")
    return 1.0 - math.exp(-f)


def needs_floor(cfg: Any) -> bool:
    """True when ``cfg`` has ``early_stop.floor: auto`` or ``objective.clip: auto``."""
    return cfg.early_stop.floor == "auto" or cfg.objective.clip == "auto"


# ----------------------------------------------------------------------------- the estimate



def default_proxy_beta(input_shape: tuple[int, ...]) -> float:
    """The proxy's TRADES beta when none is given: :data:`PROXY_BETA` for images (C, H, W), 0 otherwise."""
    return PROXY_BETA if len(tuple(input_shape)) == 3 else 0.0


def _check(floor_key: str, c_mean: float, c_se: float) -> None:
    if not math.isfinite(c_mean) or c_mean < 0:
        raise FloorEstimateError(f"{floor_key}: the estimated C^l1 came out {c_mean} (NaN or negative): the proxy "
                                 "diverged; lower optim.lr or give the floor as a number")


def _proxy_config(cfg: Any, epochs: int, beta: float) -> Any:
    from .config import ExperimentConfig

    data = cfg.model_dump()
    data["objective"] = {"method": "trades", "loss": "kl", "beta": float(beta), "clip_mode": "none", "clip": 0.0}
    data["early_stop"] = {"rule": "none", "probe_fraction": 0.0}
    data["eval"] = {**data["eval"], "pgd_steps": 0, "test": False}
    data["epochs"] = int(epochs)
    data["name"] = "floor-proxy"
    data["scaling"] = {**data["scaling"], "workers": 1}
    return ExperimentConfig.model_validate(data)


def _cache_key(cfg: Any, epochs: int, beta: float, samples: int, split_size: int) -> dict[str, Any]:
    """What a cached proxy floor depends on. ``samples`` below ``split_size`` measure C^l1 on a
    stratified sample (:func:`scoretune.data.eval_subset`; records from before it took the first
    ``samples`` points, and so do not match); otherwise on the whole split."""
    d = cfg.data
    root = None
    if d.name not in ("toy", "digits", "mnist5k"):
        root = str(Path(d.root or os.environ.get("SCORETUNE_DATA") or "./data").expanduser().absolute())
    return {
        "data": d.name, "options": d.options, "root": root, "val_size": d.val_size, "split_seed": cfg.seed,
        "ddpm_path": d.ddpm_path, "eps": float(cfg.attack.eps), "norm": cfg.attack.norm,
        "model": {"name": cfg.model.name, "options": cfg.model.options, "activation": cfg.model.activation},
        "proxy": {"method": "trades", "loss": "kl", "beta": float(beta), "epochs": int(epochs),
                  "optim": cfg.optim.model_dump(), "batch_size": cfg.batch_size, "steps": cfg.attack.steps},
        "samples": int(samples), **({"sample": "stratified"} if int(samples) < split_size else {}),
    }


def _key_name(key: dict[str, Any]) -> str:
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return f"{key['data']}-{hashlib.sha256(blob).hexdigest()[:16]}"


def data_fingerprint(ds: Any) -> str:
    """SHA-256 of the train and validation splits' bytes (inputs and labels)."""
    h = hashlib.sha256()
    for split in (ds.train, ds.val):
        for t in (split.x, split.y):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == _RECORD_FORMAT else None


def estimate_floor(
    cfg: Any,
    *,
    cache_dir: str | os.PathLike | None = None,
    samples: int = 512,
    proxy_epochs: int | None = None,
    proxy_beta: float | None = None,
    force_proxy: bool = False,
    floor_key: str = "floor.estimate",
    dataset: Any = None,
    out: Callable[[str], None] = print,
) -> FloorEstimate:
    """The floor (C^l1)^2/2 for the threat model and data of ``cfg`` (an ExperimentConfig).

    Toy data: the exact posterior and an exact grid inner max, unless ``force_proxy`` (the test of
    the proxy estimator against that ground truth). Other data: a proxy (see the module docstring),
    cached under ``cache_dir`` (None: no cache). ``floor_key`` names the config key in errors.
    """
    from .bounds import InnerMax, c_l1_pgd, estimate_C, madry_floor
    from .data import eval_subset, load_dataset, to_float, toy_posterior

    t0 = time.perf_counter()
    if int(samples) < 1:
        raise FloorEstimateError(f"{floor_key}: samples must be >= 1, got {samples}")
    eps, norm = float(cfg.attack.eps), cfg.attack.norm
    if eps <= 0:
        raise FloorEstimateError(f"{floor_key}: attack.eps is 0, so C^l1 = 0 and the floor can never act; "
                                 "set attack.eps > 0 or drop the floor stopper")
    ds = dataset if dataset is not None else load_dataset(
        cfg.data.name, root=cfg.data.root, val_size=cfg.data.val_size, seed=cfg.seed, **cfg.data.options)
    if cfg.data.name == "toy" and not force_proxy:
        xs = to_float(ds.train.x[: int(samples)]).double()
        c = estimate_C(toy_posterior, xs, InnerMax(eps=eps, norm=norm, grid=_TOY_GRID), "l1", keep_values=False)
        _check(floor_key, c.mean, c.stderr)
        return FloorEstimate(madry_floor(c.mean), c.mean, c.stderr, c.n, "exact",
                             f"toy: exact posterior, exact grid inner max (eps {eps:g}), {c.n} training points",
                             seconds=time.perf_counter() - t0)

    epochs = int(proxy_epochs) if proxy_epochs is not None else min(int(cfg.epochs), 10)
    if epochs < 1:
        raise FloorEstimateError(f"{floor_key}: proxy_epochs must be >= 1, got {proxy_epochs}")
    if proxy_beta is None:
        proxy_beta = default_proxy_beta(ds.info.input_shape)
    if not math.isfinite(float(proxy_beta)) or proxy_beta < 0:
        raise FloorEstimateError(f"{floor_key}: proxy_beta must be a finite number >= 0, got {proxy_beta}")
    split = ds.val if len(ds.val) else ds.train
    if len(split) == 0 or len(ds.train) == 0:
        raise FloorEstimateError(f"{floor_key}: 'auto' trains a proxy on the training split and measures it on "
                                 f"the validation split, but dataset '{cfg.data.name}' has no samples there; "
                                 "give the floor as a number")
    key = _cache_key(cfg, epochs, proxy_beta, samples, len(split))
    fingerprint = data_fingerprint(ds)
    record_path = ckpt_path = None
    if cache_dir is not None:
        base = Path(cache_dir).expanduser()
        record_path = base / f"{_key_name(key)}.json"
        ckpt_path = base / f"{_key_name(key)}.pt"
        if record_path.exists():
            record = _read_record(record_path)
            problem = ("unreadable" if record is None else
                       "trained at another eps/norm or on other data settings" if record.get("key") != json.loads(
                           json.dumps(key, default=str)) else
                       "trained on other data (the split's bytes changed)" if record.get("data_sha256") != fingerprint
                       else "")
            if not problem:
                return FloorEstimate(float(record["floor"]), float(record["c_l1"]), float(record["c_l1_se"]),
                                     int(record["n"]), "proxy", record["detail"], str(record_path), True,
                                     time.perf_counter() - t0, key)
            out(f"floor: cached proxy {record_path.name} is {problem}: retraining it")

    from .engine import Trainer

    pcfg = _proxy_config(cfg, epochs, proxy_beta)
    out(f"floor: training a proxy posterior ({cfg.model.name}, TRADES-KL beta {proxy_beta:g}, {epochs} epochs, "
        f"eps {eps:g} {norm}) on {cfg.data.name} ...")
    trainer = Trainer(pcfg, dataset=ds)
    for _ in range(epochs):
        row = trainer.train_one_epoch()
        if not math.isfinite(row.get("train_loss", float("nan"))):
            raise FloorEstimateError(f"{floor_key}: the proxy's training loss is not finite; lower optim.lr")
        out(proxy_epoch_line(row, epochs))
    net = trainer.eval_model.eval()
    xs = to_float(eval_subset(split, int(samples)).x).to(trainer.device)  # stratified: val may be class-sorted
    out(f"floor: measuring C^l1 of the proxy on {len(xs)} {'val' if split is ds.val else 'train'} points ...")
    gen = torch.Generator(device=trainer.device).manual_seed(int(cfg.seed) + 17)
    if len(ds.info.input_shape) == 1 and ds.info.input_shape[0] == 1:
        inner = InnerMax(eps=eps, norm=norm, grid=_TOY_GRID, pixel_range=ds.info.pixel_range)
    else:
        inner = c_l1_pgd(eps, norm, ds.info.pixel_range, gen)
    c = estimate_C(net, xs, inner, "l1", logits=True, keep_values=False)
    _check(floor_key, c.mean, c.stderr)
    floor = madry_floor(c.mean)
    detail = (f"proxy: {cfg.model.name} TRADES-KL beta {proxy_beta:g}, {epochs} epochs at eps {eps:g} {norm}; "
              f"C^l1 by {inner.method} on {c.n} {'val' if split is ds.val else 'train'} points")
    if record_path is not None:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save(ckpt_path)
        record = {"format": _RECORD_FORMAT, "key": key, "data_sha256": fingerprint, "floor": floor, "c_l1": c.mean,
                  "c_l1_se": c.stderr, "n": c.n, "detail": detail, "checkpoint": str(ckpt_path),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = record_path.with_name(record_path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
        os.replace(tmp, record_path)
    return FloorEstimate(floor, c.mean, c.stderr, c.n, "proxy", detail, str(record_path) if record_path else None,
                         False, time.perf_counter() - t0, key)


def proxy_epoch_line(row: dict[str, float], epochs: int) -> str:
    """The progress line of one proxy epoch: ``floor: proxy epoch 3/10  train loss 0.412  val acc 0.81  (4.2 s)``."""
    parts = [f"floor: proxy epoch {int(row.get('epoch', 0))}/{epochs}",
             f"train loss {row.get('train_loss', float('nan')):.4f}"]
    for key, label in (("val_clean_acc", "val acc"), ("train_acc", "train acc")):
        if key in row:
            parts.append(f"{label} {row[key]:.3f}")
            break
    if "epoch_time" in row:
        parts.append(f"({row['epoch_time']:.1f} s)")
    return "  ".join(parts)


def resolve_auto(cfg: Any, *, cache_dir: str | os.PathLike | None = None, samples: int = 512,
                 proxy_epochs: int | None = None, proxy_beta: float | None = None,
                 estimate: FloorEstimate | None = None, out: Callable[[str], None] = print) -> tuple[Any, FloorEstimate | None]:
    """``cfg`` with ``early_stop.floor: auto`` and ``objective.clip: auto`` replaced by numbers (the
    estimated floor; the clip :func:`clip_for_floor` with clip_mode 'smoothing'), and the estimate
    (None when nothing was 'auto'). ``estimate`` skips the estimation (a search's parent has one)."""
    from .config import ExperimentConfig

    if not needs_floor(cfg):
        return cfg, estimate
    if estimate is None:
        key = "early_stop.floor" if cfg.early_stop.floor == "auto" else "objective.clip"
        estimate = estimate_floor(cfg, cache_dir=cache_dir, samples=samples, proxy_epochs=proxy_epochs,
                                  proxy_beta=proxy_beta, floor_key=key, out=out)
        out(estimate.line())
    data = copy.deepcopy(cfg.model_dump())
    if data["early_stop"]["floor"] == "auto":
        data["early_stop"]["floor"] = estimate.floor
    if data["objective"]["clip"] == "auto":
        data["objective"]["clip"] = clip_for_floor(estimate.floor)
        data["objective"]["clip_mode"] = "smoothing"
    return ExperimentConfig.model_validate(data), estimate


def estimate_as_dict(est: FloorEstimate) -> dict[str, Any]:
    return asdict(est)
