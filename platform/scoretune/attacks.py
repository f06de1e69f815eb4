"""Projected gradient attacks (Madry et al. 2018) for training and evaluation.

The training attack maximises the same divergence the objective minimises
(SCORE Sec. 5: TRADES maximises D(p(x), p(x')), PGD-AT maximises D(target, p(x'))).
The evaluation attack is PGD-k on cross-entropy with restarts.

How the training attack runs BatchNorm is a setting (:data:`BN_MODES`, ``attack.bn``):

- ``eval``: running statistics, left untouched (the official TRADES attack, ``model.eval()``,
  in the SCORE code's ``attack_trades_divergence`` and TRADES' ``trades_loss``);
- ``train``: batch statistics, and every attack forward updates the running statistics (the
  official SCORE PGD-AT attack, ``attack_pgd_divergence`` in ``without_DDPM/train_cifar.py``,
  called while the model is in train mode);
- ``train_frozen``: batch statistics, running statistics untouched (the official SCORE
  ``trades_loss_LSE``, which switches ``track_bn_stats`` off for its attack).

The start point is a setting (:data:`STARTS`, ``attack.start``): ``normal``, x + 0.001 N(0, I)
(TRADES' ``trades_loss`` and the SCORE code's ``attack_trades_divergence``), or ``uniform``, a
uniform point of B(x) (the SCORE PGD-AT attack, and ``trades_loss_LSE``, the TRADES pipeline of the
paper's Tables 3-4, which with ``bn: train_frozen`` it reproduces).

The PGD-AT attack's target is a setting too (:data:`TARGETS`, ``attack.target``): ``onehot``
(the official code: label smoothing enters the loss only) or ``smoothed`` (the label-smoothed
one-hot of the loss). ``auto`` (the default of both) is the official code's choice for the
objective (:func:`resolve_attack_mode`, :func:`resolve_start`): PGD-AT ``bn=train, target=onehot,
start=uniform``, TRADES ``bn=eval, start=normal``.
``bn=eval, target=smoothed`` is how scoretune ran PGD-AT before these settings existed.
The evaluation attack (:func:`pgd_ce`) always runs in eval mode.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import Objective, smooth_onehot

NORMS = ("linf", "l2")
BN_MODES = ("eval", "train", "train_frozen")
"""How BatchNorm runs during the training attack (module docstring); ``auto`` picks per objective."""
STARTS = ("normal", "uniform")
"""The training attack's start: x + 0.001 N(0, I), or uniform in B(x) (``auto``: per objective)."""
OFFICIAL_STARTS = {"pgdat": "uniform", "trades": "normal"}
"""The start of the official SCORE code's training attack per method (``without_DDPM/train_cifar.py``)."""
TARGETS = ("onehot", "smoothed")
"""The PGD-AT attack's target: the plain one-hot or the label-smoothed one (``auto``: per objective)."""
OFFICIAL_ATTACK_MODES = {"pgdat": ("train", "onehot"), "trades": ("eval", "onehot")}
"""``(bn, target)`` of the official SCORE code (P2333/SCORE, ``without_DDPM/train_cifar.py``) per
method. TRADES attacks toward p(x), so its target setting has no effect."""


def resolve_attack_mode(method: str, bn: str = "auto", target: str = "auto") -> tuple[str, str]:
    """The ``(bn, target)`` the training attack of ``method`` runs with: each ``auto`` replaced by
    the official SCORE code's choice (:data:`OFFICIAL_ATTACK_MODES`)."""
    official_bn, official_target = OFFICIAL_ATTACK_MODES[method]
    return (official_bn if bn == "auto" else bn), (official_target if target == "auto" else target)


def resolve_start(method: str, start: str = "auto") -> str:
    """The start point the training attack of ``method`` uses: ``auto`` replaced by the official
    SCORE code's choice (:data:`OFFICIAL_STARTS`)."""
    return OFFICIAL_STARTS[method] if start == "auto" else start


def eps_problem(eps: float, norm: str, pixel_range: tuple[float, float] | None,
                input_dims: int | None = None) -> str | None:
    """Why ``eps`` is not a usable radius of B(x) (None when it is): the one range rule for eps.

    eps is finite and >= 0; on bounded inputs (``pixel_range`` (lo, hi), e.g. [0, 1] pixels) a
    larger ball than the box is meaningless, so eps <= the box's diameter in ``norm``: hi - lo
    for linf, (hi - lo) sqrt(input_dims) for l2 (checked when ``input_dims`` is known).
    Unbounded inputs (the 1-D toy, ``pixel_range=None``) take any finite eps.
    """
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps):
        return f"must be a finite number (got {eps!r})"
    if eps < 0:
        return f"must be >= 0 (got {eps!r})"
    if pixel_range is None:
        return None
    width = float(pixel_range[1]) - float(pixel_range[0])
    if norm == "linf" and eps > width:
        return (f"{eps:g} is out of range for {norm} on [{pixel_range[0]:g},{pixel_range[1]:g}] pixel data: "
                f"use a value in [0, {width:g}] such as 8/255 = 0.0314 (eps is in pixel units, not /255)")
    if norm == "l2" and input_dims is not None and eps > width * math.sqrt(input_dims):
        return (f"{eps:g} is larger than the l2 diameter {width * math.sqrt(input_dims):.4g} of the "
                f"[{pixel_range[0]:g},{pixel_range[1]:g}]^{input_dims} input box: use a value such as 0.5")
    return None


@dataclass(frozen=True)
class AttackConfig:
    """A PGD threat model and budget.

    ``eps`` is the radius of B(x) in ``norm``; ``step_size`` defaults to 2.5 eps / steps
    (Madry et al.); ``pixel_range`` is the valid input box (``None`` for unbounded inputs
    such as the 1-D toy). ``bn``, ``target`` and ``start`` say how the *training* attack runs
    BatchNorm, what PGD-AT attacks toward and where the attack starts (module docstring; ``auto``:
    as the official code for the objective); :func:`pgd` and the evaluation attack ignore them.
    ``random_start=False`` makes a ``uniform`` start (and :func:`pgd`'s own start) x itself.
    """

    eps: float
    norm: str = "linf"
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    pixel_range: tuple[float, float] | None = (0.0, 1.0)
    bn: str = "auto"
    target: str = "auto"
    start: str = "auto"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm '{self.norm}'; choose one of: {', '.join(NORMS)}")
        if self.bn not in ("auto",) + BN_MODES:
            raise ValueError(f"unknown attack bn mode {self.bn!r}; choose one of: auto, {', '.join(BN_MODES)}")
        if self.target not in ("auto",) + TARGETS:
            raise ValueError(f"unknown attack target {self.target!r}; choose one of: auto, {', '.join(TARGETS)}")
        if self.start not in ("auto",) + STARTS:
            raise ValueError(f"unknown attack start {self.start!r}; choose one of: auto, {', '.join(STARTS)}")
        problem = eps_problem(self.eps, self.norm, None)
        if problem:
            raise ValueError(f"eps {problem}")
        if self.steps < 0:
            raise ValueError(f"attack steps must be >= 0, got {self.steps}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size >= 0):
            raise ValueError(f"step_size must be a finite number >= 0, got {self.step_size}")

    @property
    def alpha(self) -> float:
        if self.step_size is not None:
            return self.step_size
        return 2.5 * self.eps / max(self.steps, 1)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (BN uses and keeps its running stats) and restore each module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Run ``model`` with BatchNorm as ``mode`` says (:data:`BN_MODES`) and restore every module's
    mode (and ``track_running_stats``) afterwards.

    ``eval``: :func:`eval_mode`. ``train``: every module in train mode (batch statistics; each
    forward updates the running statistics and ``num_batches_tracked``, as the official PGD-AT
    attack does). ``train_frozen``: train mode with ``track_running_stats`` off on each BatchNorm
    layer, so it normalises with batch statistics and leaves its buffers untouched.
    """
    if mode == "eval":
        with eval_mode(model):
            yield model
        return
    if mode not in BN_MODES:
        raise ValueError(f"unknown attack bn mode {mode!r}; choose one of: {', '.join(BN_MODES)}")
    modes = [(m, m.training) for m in model.modules()]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = [m.track_running_stats for m in bns]
    model.train()
    if mode == "train_frozen":
        for m in bns:
            m.track_running_stats = False
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for m, track in zip(bns, tracking):
            m.track_running_stats = track


def _loss_dtype(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least: low-precision (bf16/fp16 autocast) values go up to float32,
    float64 stays float64 (so a float64 model attacks in float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Switch ``requires_grad`` off on ``model``'s parameters for the duration (and back on after).

    An attack needs gradients with respect to the input only; with the parameters frozen,
    autograd records no weight-gradient graph for the attack's forwards and a parameter hook
    cannot fire during it. Results are bit-identical; the time saved on CPU is within noise
    (``benchmarks/step_throughput.py --ablations``: ``-frozen_params``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    """Project onto B(x) ∩ pixel box: clip (linf) or rescale (l2) the perturbation, then clamp."""
    delta = x_adv - x
    if cfg.norm == "linf":
        delta = delta.clamp(-cfg.eps, cfg.eps)
    else:
        delta = delta * torch.clamp(cfg.eps / _flat_norm(delta), max=1.0)
    out = x + delta
    if cfg.pixel_range is not None:
        out = out.clamp(*cfg.pixel_range)
    return out


def random_init(x: torch.Tensor, cfg: AttackConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform random point of B(x) (linf: uniform cube; l2: uniform direction, uniform radius)."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) if cfg.norm == "linf" else None
    if cfg.norm == "linf":
        delta = (2 * noise - 1) * cfg.eps
    else:
        d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
        delta = d / _flat_norm(d) * r * cfg.eps
    return project(x + delta, x, cfg)


def _ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    if cfg.norm == "linf":
        return x_adv + cfg.alpha * grad.sign()
    return x_adv + cfg.alpha * grad / _flat_norm(grad)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    per_sample_loss: Callable[[torch.Tensor], torch.Tensor],
    cfg: AttackConfig,
    *,
    x_init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    bn: str = "eval",
) -> torch.Tensor:
    """Maximise ``per_sample_loss(model(x'))`` over x' in B(x) by projected gradient ascent.

    ``per_sample_loss`` maps logits to a per-sample tensor; the gradient of its sum is
    followed. Returns the detached adversarial input. The model runs with BatchNorm as ``bn``
    says (:func:`bn_mode`; default eval mode, running statistics untouched), with its
    parameters' ``requires_grad`` off (:func:`frozen_parameters`).
    """
    x = x.detach()
    if x_init is not None:
        x_adv = project(x_init.detach(), x, cfg)
    elif cfg.random_start and cfg.eps > 0:
        x_adv = random_init(x, cfg, generator)
    else:
        x_adv = x.clone()
    with bn_mode(model, bn), frozen_parameters(model), torch.enable_grad():
        for _ in range(cfg.steps):
            x_adv.requires_grad_(True)
            loss = _loss_dtype(per_sample_loss(model(x_adv))).sum()
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = project(_ascent_step(x_adv.detach(), grad, cfg), x, cfg)
    return x_adv.detach()


def _normal_start(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """TRADES' start point x + 0.001 N(0, I) (Zhang et al. 2019), projected by :func:`pgd`."""
    return x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def training_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    cfg: AttackConfig,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The inner maximisation of adversarial training for ``objective``.

    BatchNorm runs as ``cfg.bn`` says, PGD-AT attacks toward ``cfg.target`` and the attack starts
    as ``cfg.start`` says (:func:`resolve_attack_mode`, :func:`resolve_start`; by default as the
    official SCORE code: TRADES at x + 0.001 N(0, I) as Zhang et al., PGD-AT uniformly in B(x)).
    TRADES maximises D(p(x), p(x')) with p(x) computed once (in the same BatchNorm mode, no
    gradient) and held fixed.  PGD-AT maximises D(target, p(x')) (cross-entropy for KL), target =
    one-hot(y) (``onehot``) or the objective's label-smoothed one-hot (``smoothed``).
    """
    div = objective.divergence
    bn, target_kind = resolve_attack_mode(objective.method, cfg.bn, cfg.target)
    start = resolve_start(objective.method, cfg.start)
    if objective.method == "trades":
        with bn_mode(model, bn), torch.no_grad():
            p_nat = F.softmax(_loss_dtype(model(x)), dim=-1)
        x_init = _normal_start(x, generator) if start == "normal" else None  # None: pgd starts uniformly

        def attack_loss(logits: torch.Tensor) -> torch.Tensor:
            logits = _loss_dtype(logits)
            if objective.loss == "kl":  # KL(p(x) || p(x')) as in TRADES
                return (p_nat * (torch.log(p_nat.clamp_min(1e-12)) - F.log_softmax(logits, dim=-1))).sum(-1)
            return div(p_nat, F.softmax(logits, dim=-1))

        return pgd(model, x, attack_loss, cfg, x_init=x_init, generator=generator, bn=bn)

    smoothing = objective.label_smoothing if target_kind == "smoothed" else 0.0

    def pgdat_loss(logits: torch.Tensor) -> torch.Tensor:
        logits = _loss_dtype(logits)
        target = smooth_onehot(y, logits.shape[-1], smoothing).to(logits.dtype)
        if objective.loss == "kl":
            return -(target * F.log_softmax(logits, dim=-1)).sum(-1)
        return div(target, F.softmax(logits, dim=-1))

    x_init = _normal_start(x, generator) if start == "normal" else None
    return pgd(model, x, pgdat_loss, cfg, x_init=x_init, generator=generator, bn=bn)


def pgd_ce(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AttackConfig,
    *,
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Evaluation PGD-k on cross-entropy with ``restarts`` random restarts, in eval mode
    (``cfg.bn``/``cfg.target`` are training-attack settings and play no part).

    Per sample it keeps the first restart that fools the model (else the last one).
    """
    x_best = x.detach().clone()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_loss_dtype(logits), y, reduction="none")

    for _ in range(max(restarts, 1)):
        x_adv = pgd(model, x, ce, cfg, generator=generator)
        with eval_mode(model), torch.no_grad():
            wrong = model(x_adv).argmax(-1) != y
        take = ~fooled
        x_best[take] = x_adv[take]
        fooled |= wrong
        if bool(fooled.all()):
            break
    return x_best
