"""The training engine: one epoch of adversarial training, evaluation, optimisers,
schedules, EMA, seeding and checkpoints. Framework-free (plain torch); Ray Train and the
CLI drive it.

Multi-worker use: pass ``rank``/``world_size`` and a DDP-wrapped ``model``; attacks and
evaluation use the unwrapped network, metric sums are all-reduced when
``torch.distributed`` is initialised, so every rank reports the global mean.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .attacks import AttackConfig, eval_mode, pgd_ce, training_attack
from .config import ConfigError, ExperimentConfig, OptimConfig, batch_split_problem, device_problem
from .data import BatchLoader, Dataset, Split, eval_subset, load_dataset, to_float
from .errors import UserError
from .losses import Objective, madry_kl
from .models import build_model
from .thread_governor import INERT, ThreadGovernor


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read (missing, truncated, not a scoretune checkpoint)."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a NaN/inf loss."""


# ----------------------------------------------------------------------------- devices, seeds


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; a name that is no device is a one-line
    :class:`~scoretune.config.ConfigError` (:func:`~scoretune.config.device_problem`)."""
    problem = device_problem(name)
    if problem:
        raise ConfigError(f"--device: {problem}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP / compiled wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast on CUDA when ``amp`` is 'auto' or 'on'; fp32 elsewhere."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int, steps_per_epoch: int) -> float:
    """LR multiplier at optimiser step ``step``: linear warm-up, then cosine / piecewise / constant."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(total_steps - warm, 1)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "piecewise":
        return cfg.gamma ** sum(progress >= m for m in cfg.milestones)
    return 1.0


def eps_ramp_factor(epoch: int, warmup_epochs: float) -> float:
    """The share of eps the training attack uses in epoch ``epoch`` (0-based): ``(epoch + 1) /
    warmup_epochs`` up to 1 (1 when ``warmup_epochs`` is 0). The linear eps ramp of the literature
    (e.g. Gowal et al. 2018; Wong et al. 2020 on MNIST at eps 0.3): a from-scratch model facing the
    full eps at once can stay at chance, the ramp lets it learn the clean task first."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / warmup_epochs)


def ramped_attack(attack: AttackConfig, factor: float) -> AttackConfig:
    """``attack`` at ``factor`` times its eps (an explicit step size scales with it; the default
    2.5 eps / steps follows eps by itself)."""
    if factor >= 1.0:
        return attack
    step = attack.step_size * factor if attack.step_size is not None else None
    return dataclasses.replace(attack, eps=attack.eps * factor, step_size=step)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg, total, steps_per_epoch)
    )


class ModelEMA:
    """Exponential moving average of a model's weights (and copied buffers), as in Rebuffi et al. 2021."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = unwrap(model).state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(self.decay).add_(src[k].detach(), alpha=1.0 - self.decay)
            else:
                v.copy_(src[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


# ----------------------------------------------------------------------------- metrics

ENGINE_METRICS: tuple[str, ...] = (
    "train_loss", "train_natural", "train_robust", "train_attack_ce", "train_clean_acc", "train_adv_acc",
    "train_r_madry", "val_r_madry", "test_r_madry",
    "val_clean_acc", "val_pgd_acc", "test_clean_acc", "test_pgd_acc", "train_time", "probe_time", "epoch_time", "lr",
)
"""Per-epoch metrics a trial reports (the engine's row), usable as objectives and stopper metrics.

The robust cross-entropies, two different things:

* ``{train,val,test}_r_madry`` -- R_Madry as the theorem defines it (Pang et al. 2022, Corollary 1,
  with one-hot p_d): the mean cross-entropy at the cross-entropy maximiser, found by the evaluation
  attack (CE-PGD-``eval.pgd_steps``, eval mode). ``train_r_madry`` is measured at the end of each
  epoch on a fixed, seeded subsample of the training split (``early_stop.probe_fraction``, default
  10%; :func:`r_madry_probe`); ``val_`` / ``test_`` reuse the PGD pass of :func:`evaluate_loader` (no
  extra cost). The floor rule watches ``train_r_madry``.
* ``train_attack_ce`` -- the cross-entropy at the *training* attack's point, averaged over the
  epoch's batches. Under PGD-AT with a CE/KL loss this is R_Madry of the batch; under TRADES (the
  attack maximises KL(p(x) || p(x')), not CE) or an SE/l1 loss it understates R_Madry.
"""

_PROBE_SEED_STREAM = 7919  # the probe subsample's seed: (cfg.seed, this), fixed for the whole run


def selection_metric(row: dict[str, Any]) -> float:
    """Checkpoint selection on the held-out validation split: PGD accuracy, else clean accuracy
    (-inf when the row has neither). The one rule every driver and the Ray Train loop use."""
    for key in ("val_pgd_acc", "val_clean_acc"):
        if key in row:
            return float(row[key])
    return float("-inf")


class MetricSums:
    """Sums and counts accumulated on the device, all-reduced once per epoch."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, total: torch.Tensor, count: int) -> None:
        t = self.sums.get(name)
        if t is None:
            t = self.sums[name] = torch.zeros(2, dtype=torch.float64, device=self.device)
        t[0] += total.detach().to(torch.float64)
        t[1] += count

    def means(self) -> dict[str, float]:
        if not self.sums:
            return {}
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n] for n in names])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stacked)
        stacked = stacked.cpu()
        return {n: float(s[0] / s[1]) if s[1] > 0 else float("nan") for n, s in zip(names, stacked)}


# ----------------------------------------------------------------------------- one epoch


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    attack: AttackConfig,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | None = None,
    amp: str = "auto",
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """One optimiser step of adversarial training on the batch ``(x, y)``.

    The inner maximisation (:func:`~scoretune.attacks.training_attack` on the unwrapped
    network; BatchNorm as ``attack.bn`` says: by default, as the official SCORE code, batch
    statistics with running-statistics updates for PGD-AT and eval mode for TRADES), then in
    train mode the clean (TRADES only) and adversarial forwards,
    the objective's batch mean, backward and ``optimizer.step()``.  Clean and adversarial
    halves share one forward only when no BatchNorm couples the samples (exact).

    Returns ``(terms, logits_nat, logits_adv)``: the per-sample loss terms of
    :meth:`Objective.per_sample` and the float32 logits (``logits_nat`` is None for PGD-AT),
    all detached.  Raises :class:`NonFiniteLossError` on a NaN/inf loss (before the update).
    """
    device = device if device is not None else x.device
    net = unwrap(model)
    model.train()
    with autocast_context(device, amp):
        x_adv = training_attack(net, x, y, objective, attack, generator=generator)
    with autocast_context(device, amp):
        if objective.method == "trades":
            logits = model(torch.cat([x, x_adv])) if _no_batchnorm(net) else None
            if logits is not None:
                logits_nat, logits_adv = logits.float().chunk(2)
            else:
                logits_nat = model(x).float()
                logits_adv = model(x_adv).float()
        else:
            logits_nat = None
            logits_adv = model(x_adv).float()
        terms = objective.per_sample(logits_adv, y, logits_nat)
        loss = terms["loss"].mean()
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"non-finite training loss ({loss.item()}) : lower optim.lr, or check the data for NaN/inf"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    terms = {k: v.detach() for k, v in terms.items()}
    return terms, (logits_nat.detach() if logits_nat is not None else None), logits_adv.detach()


def train_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    objective: Objective,
    attack: AttackConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    device: torch.device,
    amp: str = "auto",
    ema: ModelEMA | None = None,
    generator: torch.Generator | None = None,
    governor: ThreadGovernor = INERT,
) -> dict[str, float]:
    """One epoch of adversarial training (TRADES or PGD-AT under ``objective``): :func:`train_step`
    on every batch, then the scheduler and EMA updates; ``governor`` sizes torch's threads meanwhile.

    Returns global means of: ``train_loss`` (the objective), ``train_natural`` and
    ``train_robust`` (its terms), ``train_attack_ce`` (per-sample CE at the training attack's
    point: R_Madry's summand only under PGD-AT-CE, see :data:`ENGINE_METRICS`), ``train_clean_acc``
    and ``train_adv_acc``.  Raises :class:`NonFiniteLossError` on a NaN/inf loss.
    """
    model.train()
    sums = MetricSums(device)
    with governor:
        for x, y in loader:
            governor.tick()
            terms, logits_nat, logits_adv = train_step(
                model, x, y, objective, attack, optimizer, device=device, amp=amp, generator=generator,
            )
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update(model)
            n = y.shape[0]
            with torch.no_grad():
                sums.add("train_loss", terms["loss"].sum(), n)
                sums.add("train_natural", terms["natural"].sum(), n)
                sums.add("train_robust", terms["robust"].sum(), n)
                sums.add("train_attack_ce", madry_kl(logits_adv, y).sum(), n)
                sums.add("train_adv_acc", (logits_adv.argmax(-1) == y).sum(), n)
                if logits_nat is not None:
                    sums.add("train_clean_acc", (logits_nat.argmax(-1) == y).sum(), n)
    return sums.means()


def _no_batchnorm(net: nn.Module) -> bool:
    """True when clean and adversarial halves can share one forward pass without changing the
    result: no batch-statistics layer couples the samples of a batch."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


@torch.no_grad()
def _correct(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (net(x).argmax(-1) == y).sum()


def evaluate_loader(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    attack: AttackConfig | None,
    *,
    device: torch.device,
    restarts: int = 1,
    prefix: str = "val",
    max_samples: int | None = None,
    generator: torch.Generator | None = None,
    governor: ThreadGovernor = INERT,
) -> dict[str, float]:
    """Clean accuracy and PGD-k (cross-entropy) robust accuracy, in eval mode (``governor``: as in
    :func:`train_epoch`).

    Returns ``{prefix}_clean_acc`` and (when ``attack`` is given) ``{prefix}_pgd_acc``,
    global over ranks when ``torch.distributed`` is initialised.
    """
    net = unwrap(model)
    sums = MetricSums(device)
    seen = 0
    with eval_mode(net), governor:
        for x, y in loader:
            governor.tick()
            if max_samples is not None and seen >= max_samples:
                break
            if max_samples is not None and seen + y.shape[0] > max_samples:
                x, y = x[: max_samples - seen], y[: max_samples - seen]
            seen += y.shape[0]
            n = y.shape[0]
            sums.add(f"{prefix}_clean_acc", _correct(net, x, y), n)
            if attack is not None:
                x_adv = pgd_ce(net, x, y, attack, restarts=restarts, generator=generator)
                with torch.no_grad():
                    logits = net(x_adv).float()
                sums.add(f"{prefix}_pgd_acc", (logits.argmax(-1) == y).sum(), n)
                sums.add(f"{prefix}_r_madry", madry_kl(logits, y).sum(), n)
    return sums.means()


def robust_ce(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    *,
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample cross-entropy at the cross-entropy maximiser in B(x): the summand of R_Madry
    (Pang et al. 2022, one-hot p_d), max_{x' in B(x)} CE(p_theta(.|x'), y), found by CE-PGD
    (:func:`~scoretune.attacks.pgd_ce`: of ``restarts`` restarts it keeps the first that fools the model;
    a lower bound of the true maximum). Eval mode."""
    with eval_mode(net):
        x_adv = pgd_ce(net, x, y, attack, restarts=restarts, generator=generator)
        with torch.no_grad():
            return madry_kl(net(x_adv).float(), y)


def probe_indices(n: int, fraction: float, seed: int, *, min_samples: int = 64) -> torch.Tensor:
    """The fixed, seeded subsample of a training split of ``n`` samples that :func:`r_madry_probe`
    attacks every epoch: ``max(min_samples, round(fraction * n))`` indices (at most n), sorted."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"probe fraction must be in [0, 1], got {fraction}")
    if fraction == 0.0 or n == 0:
        return torch.zeros(0, dtype=torch.int64)
    k = min(n, max(int(min_samples), int(round(fraction * n))))
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:k].sort().values


def r_madry_probe(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    attack: AttackConfig,
    *,
    device: torch.device,
    restarts: int = 1,
    prefix: str = "train",
    generator: torch.Generator | None = None,
    governor: ThreadGovernor = INERT,
) -> dict[str, float]:
    """``{prefix}_r_madry``: the mean of :func:`robust_ce` over ``loader`` (the probe subsample of
    the training split), global over ranks (``governor``: as in :func:`train_epoch`)."""
    net = unwrap(model)
    sums = MetricSums(device)
    with governor:
        for x, y in loader:
            governor.tick()
            sums.add(f"{prefix}_r_madry",
                     robust_ce(net, x, y, attack, restarts=restarts, generator=generator).sum(), y.shape[0])
    return sums.means()


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temp file + rename): a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, random bytes ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first[:200]} (file corrupt or not a scoretune checkpoint; "
            "delete it to restart from the previous one)"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a scoretune checkpoint (no 'model' entry)")
    return state


def memory_format_for(setting: str, net: nn.Module, input_shape: tuple[int, ...]) -> torch.memory_format:
    """The memory layout of the model and its batches: for image inputs (C, H, W),
    ``torch.channels_last`` (NHWC) when ``setting`` is 'on', or 'auto' and the model has a 2-D
    convolution; ``torch.contiguous_format`` otherwise (and always for other inputs).

    NHWC saves oneDNN/cuDNN the layout conversions around every convolution (measured on CPU,
    1 thread: 1.2x per TRADES-SE step of the small CNN, 1.03x for PreActResNet-18; see
    ``benchmarks/step_throughput.py``). It changes only the order of floating-point sums, but the
    attack's ``sign()`` can turn such rounding into a different adversarial point: a run in
    another layout is not bit-identical (``channels_last: off`` reproduces the contiguous run).
    """
    if setting == "off" or len(input_shape) != 3:
        return torch.contiguous_format
    if setting == "on" or any(isinstance(m, nn.Conv2d) for m in net.modules()):
        return torch.channels_last
    return torch.contiguous_format


# ----------------------------------------------------------------------------- the trainer


@dataclass
class Trainer:
    """Owns everything one training run needs; the CLI and the Ray Train loop drive it.

    ``epoch`` counts finished epochs; ``history`` holds one metrics dict per finished epoch.
    ``governor`` sizes torch's threads in its loops, up to the count set when it was built
    (:mod:`scoretune.thread_governor`).
    """

    cfg: ExperimentConfig
    dataset: Dataset | None = None
    device: torch.device | None = None
    rank: int = 0
    world_size: int = 1
    wrap_model: Callable[[nn.Module], nn.Module] | None = None
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.device = self.device or resolve_device(cfg.device)
        seed_everything(cfg.seed)
        if self.dataset is None:
            self.dataset = load_dataset(
                cfg.data.name, root=cfg.data.root, val_size=cfg.data.val_size, seed=cfg.seed,
                ddpm_path=cfg.data.ddpm_path, **cfg.data.options,
            )
        info = self.dataset.info
        self.model_spec = model_spec(cfg, info)
        self.net = build_model_from_spec(self.model_spec).to(self.device)
        self.memory_format = memory_format_for(cfg.channels_last, self.net, info.input_shape)
        self.net = self.net.to(memory_format=self.memory_format)
        self.model = self.wrap_model(self.net) if self.wrap_model else self.net
        self.objective = cfg.objective.build()
        input_dims = math.prod(info.input_shape)
        self.train_attack = cfg.attack.build(info.pixel_range, input_dims)
        self.eval_attack = cfg.eval_attack(info.pixel_range, input_dims)
        problem = batch_split_problem(cfg.batch_size, self.world_size)  # the running world, not the config's
        if problem:
            raise ConfigError(problem)
        per_rank = cfg.batch_size // self.world_size
        ds = self.dataset
        self.train_loader = BatchLoader(
            ds.train, per_rank, shuffle=True, device=self.device, augment=info.augment, seed=cfg.seed,
            drop_last=True if len(ds.train) >= cfg.batch_size else False,
            extra=ds.extra, extra_fraction=cfg.data.ddpm_fraction if ds.extra is not None else 0.0,
            rank=self.rank, world_size=self.world_size, pixel_range=info.pixel_range or (0.0, 1.0),
            memory_format=self.memory_format,
        )
        eval_bs = max(per_rank, 256)
        # eval.max_samples: a fixed class-stratified sample of each split (eval_subset), not its first
        # examples (mnist5k's val and test splits are stored in class order)
        self.val_loader = BatchLoader(eval_subset(ds.val, cfg.eval.max_samples), eval_bs, shuffle=False,
                                      device=self.device, rank=self.rank, world_size=self.world_size,
                                      memory_format=self.memory_format) if len(ds.val) else None
        self.test_loader = BatchLoader(eval_subset(ds.test, cfg.eval.max_samples), eval_bs, shuffle=False,
                                       device=self.device, rank=self.rank, world_size=self.world_size,
                                       memory_format=self.memory_format)
        probe = probe_indices(len(ds.train), cfg.early_stop.probe_fraction, _derive_probe_seed(cfg.seed))
        self.probe_loader = BatchLoader(
            Split(ds.train.x.index_select(0, probe), ds.train.y.index_select(0, probe)), eval_bs, shuffle=False,
            device=self.device, rank=self.rank, world_size=self.world_size, memory_format=self.memory_format,
        ) if probe.numel() and self.eval_attack is not None else None
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim, cfg.epochs, max(len(self.train_loader), 1))
        self.ema = ModelEMA(self.net, cfg.ema_decay) if cfg.ema_decay else None
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed * 1000 + self.rank)
        self.governor = ThreadGovernor(torch.get_num_threads(), self.device)

    # -- the model that is evaluated and exported (EMA weights when enabled)
    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.net

    def train_one_epoch(self) -> dict[str, float]:
        """Train one epoch, evaluate on val (and test), append to ``history``; returns the row."""
        cfg = self.cfg
        self.train_loader.set_epoch(self.epoch)
        t0 = time.perf_counter()
        row: dict[str, float] = {"epoch": float(self.epoch + 1), "lr": self.optimizer.param_groups[0]["lr"]}
        factor = eps_ramp_factor(self.epoch, cfg.attack.eps_warmup_epochs)
        row.update(train_epoch(
            self.model, self.train_loader, self.objective, ramped_attack(self.train_attack, factor), self.optimizer,
            self.scheduler,
            device=self.device, amp=cfg.amp, ema=self.ema, generator=self.generator, governor=self.governor,
        ))
        row["train_time"] = time.perf_counter() - t0
        if self.probe_loader is not None:
            t1 = time.perf_counter()
            row.update(r_madry_probe(self.eval_model, self.probe_loader, self.eval_attack, device=self.device,
                                     restarts=cfg.eval.restarts, generator=self.generator, governor=self.governor))
            row["probe_time"] = time.perf_counter() - t1
        row.update(self.evaluate_splits())
        if cfg.early_stop.refine:
            row.update(self.c_l1_at_best(row))
        row["epoch_time"] = time.perf_counter() - t0
        self.epoch += 1
        self.history.append(row)
        return row

    def c_l1_at_best(self, row: dict[str, float]) -> dict[str, float]:
        """``val_c_l1`` +- ``val_c_l1_se``: C^l1 of the model on ``early_stop.refine_samples``
        validation points (a fixed class-stratified sample, :func:`~scoretune.data.eval_subset`) with
        the inner max the automatic floor's proxy is measured with (:func:`scoretune.bounds.c_l1_pgd`,
        a seeded generator of its own: every rank gets the same value), when ``row`` improves on the best
        ``val_pgd_acc`` of the history; {} otherwise. The floor rule's refiner reads it."""
        acc = row.get("val_pgd_acc")
        if acc is None or not len(self.dataset.val) or any(
                r.get("val_pgd_acc", -1.0) >= acc for r in self.history):
            return {}
        from .bounds import c_l1_pgd, estimate_C

        t0 = time.perf_counter()
        info = self.dataset.info
        xs = to_float(eval_subset(self.dataset.val, self.cfg.early_stop.refine_samples).x).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(int(self.cfg.seed) * 1000 + 31 + self.epoch)
        inner = c_l1_pgd(self.cfg.attack.eps, self.cfg.attack.norm, info.pixel_range, gen)
        with eval_mode(self.eval_model):
            c = estimate_C(self.eval_model, xs, inner, "l1", logits=True, keep_values=False)
        return {"val_c_l1": c.mean, "val_c_l1_se": c.stderr, "c_l1_time": time.perf_counter() - t0}

    def evaluate_splits(self) -> dict[str, float]:
        cfg = self.cfg
        out: dict[str, float] = {}
        loaders = [("val", self.val_loader)]
        if cfg.eval.test:
            loaders.append(("test", self.test_loader))
        for prefix, loader in loaders:
            if loader is None:
                continue
            out.update(evaluate_loader(
                self.eval_model, loader, self.eval_attack, device=self.device, restarts=cfg.eval.restarts,
                prefix=prefix, max_samples=_per_rank(cfg.eval.max_samples, self.world_size),
                generator=self.generator, governor=self.governor,
            ))
        return out

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "scoretune-checkpoint-v1",
            "model": unwrap(self.net).state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "history": [dict(r) for r in self.history],
            "rng_torch": torch.get_rng_state(),
            "rng_attack": self.generator.get_state(),
            "config": self.cfg.to_json(),
            "model_spec": json.dumps(self.model_spec),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule is a function of this config (a resumed run may have a larger epoch
        # budget): recompute the current LR from it instead of trusting the saved value.
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * fn(self.scheduler.last_epoch)
        self.epoch = int(state["epoch"])
        self.history = [dict(r) for r in state.get("history", [])]
        if "rng_torch" in state:
            torch.set_rng_state(state["rng_torch"])
        if "rng_attack" in state:
            self.generator.set_state(state["rng_attack"])

    def save(self, path: str | os.PathLike) -> Path:
        return save_checkpoint(path, self.state_dict())

    def resume(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_checkpoint(path, map_location=self.device))


def _derive_probe_seed(seed: int) -> int:
    return int(seed) * 1_000_003 + _PROBE_SEED_STREAM


def _per_rank(n: int | None, world_size: int) -> int | None:
    return None if n is None else max(1, math.ceil(n / world_size))


def model_from_checkpoint(
    state_or_path: dict[str, Any] | str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    use_ema: bool = True,
) -> tuple[nn.Module, ExperimentConfig]:
    """Rebuild the network of a checkpoint (EMA weights when present) in eval mode."""
    state = state_or_path if isinstance(state_or_path, dict) else load_checkpoint(state_or_path)
    cfg = checkpoint_config(state, "" if isinstance(state_or_path, dict) else str(state_or_path))
    net = build_model_from_spec(json.loads(state["model_spec"]))
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    net.load_state_dict(weights)
    return net.to(device).eval(), cfg


def checkpoint_config(state: dict[str, Any], where: str = "") -> ExperimentConfig:
    """The validated experiment config a checkpoint stores; a stored config that does not validate (edited, or
    from another scoretune) is a one-line :class:`CheckpointError` naming the field."""
    from pydantic import ValidationError

    from .config import format_validation_error

    name = where or "the checkpoint"
    try:
        raw = json.loads(state["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{name} has no readable stored config ({type(e).__name__}: {e}); "
                              "it is not a scoretune checkpoint, or it is corrupt") from None
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise CheckpointError(f"{name}: its stored config is invalid: {format_validation_error(e)} (edited, or "
                              "written by another scoretune; retrain, or fix the field in the checkpoint)") from None


def model_spec(cfg: ExperimentConfig, info: Any) -> dict[str, Any]:
    """Everything needed to rebuild the network without the dataset (stored in checkpoints)."""
    kwargs: dict[str, Any] = dict(cfg.model.options)
    if cfg.model.activation:
        kwargs["activation"] = cfg.model.activation
    return {
        "name": cfg.model.name, "input_shape": list(info.input_shape), "num_classes": info.num_classes,
        "mean": list(info.mean), "std": list(info.std), "options": kwargs,
        "pixel_range": list(info.pixel_range) if info.pixel_range else None, "dataset": info.name,
    }


def build_model_from_spec(spec: dict[str, Any]) -> nn.Module:
    return build_model(
        spec["name"], input_shape=tuple(spec["input_shape"]), num_classes=spec["num_classes"],
        mean=tuple(spec["mean"]), std=tuple(spec["std"]), **spec["options"],
    )
