"""The two toy demonstrations of SCORE (Pang et al., ICML 2022) on the analytic 1-D mixture.

Data: p(y=0) = 5/6, x|y=0 ~ N(-1, 4); p(y=1) = 1/6, x|y=1 ~ N(1, 1); the exact posterior
p_d(y|x) is :func:`scoretune.data.toy_posterior`. Threat model: |x' - x| <= eps (eps = 1), found
by 10-step PGD (:func:`scoretune.attacks.pgd`). Model: the small tanh MLP ``toy_mlp``; Adam (constant
learning rate, then a linear decay to a tenth over the last 20% of the steps), full batch.

1. **Expectation form** (:func:`run_expectation_demo`): every step uses ``n_samples`` (60,000)
   points of p(x) (fresh each step, or one fixed draw) with their exact posteriors as soft targets:

   ===============  ========================================================================
   ``standard``     min E_x KL(p_d(.|x) || p_theta(.|x))                       (R_Standard^KL)
   ``pgdat_kl``     min E_x max_{x'} KL(p_d(.|x) || p_theta(.|x'))             (R_Madry^KL)
   ``pgdat_se``     min E_x max_{x'} SE(p_d(.|x), p_theta(.|x'))               (R_Madry^SE)
   ``score``        min E_x max_{x'} SE(p_d(.|x'), p_theta(.|x'))              (R_SCORE^SE)
   ``trades``       min E_x KL(p_d(.|x) || p_theta(.|x)) + beta max_{x'} KL(p_theta(.|x) || p_theta(.|x'))
   ===============  ========================================================================

   The SCORE minimiser is p_theta = p_d (R_SCORE = 0); the Madry-type objectives reward local
   invariance and converge to a flatter posterior. Every ``eval_every`` steps the risks
   R_SCORE^l1, R_Standard^l1, R_Madry^l1 and R_Madry^KL are measured on a fixed evaluation sample
   (exact inner max on a grid), with C^l1 and the floor (C^l1)^2/2 for reference (Theorem 1,
   Corollary 1; :mod:`scoretune.bounds`).

2. **Finite-sample form** (:func:`run_finite_demo`): ``n_pairs`` (6) labelled pairs (x_i, y_i).
   ``standard`` minimises the empirical cross-entropy; ``score`` maximises and minimises
   SE(p_d(.|x'), p_theta(.|x')) over the balls B(x_i) with the exact posterior (possible only on
   the toy); ``score_label`` is the empirical SCORE, whose self-consistent target on B(x_i) is the
   label y_i (the practical PGD-AT-SE form used on real data).

Closeness to p_d is measured by ``gap_grid`` = mean |p_theta(y=1|x) - p_d(y=1|x)| on a uniform
grid over [-10, 10] and ``gap_data`` = the same averaged under p(x).

Plots (matplotlib, Agg backend) are made by :func:`plot_posteriors` / :func:`plot_risks`; logging
to MLflow is the CLI's job (``scoretune toy``). This module has no Ray / MLflow imports.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import AttackConfig, eval_mode, pgd
from .bounds import (
    BoundEstimate,
    InnerMax,
    PairModule,
    as_probability_module,
    estimate_C,
    madry_floor,
    madry_risk,
    score_risk,
    standard_risk,
)
from .config import ConfigError
from .data import TOY_MEANS, TOY_PRIOR, TOY_VARIANCES, toy_posterior
from .losses import get_divergence
from .models import build_model

__all__ = [
    "ToyConfig",
    "VariantResult",
    "ToyDemo",
    "EXPECTATION_VARIANTS",
    "FINITE_VARIANTS",
    "VARIANT_LABELS",
    "sample_toy",
    "posterior_gap",
    "train_expectation_variant",
    "train_finite_variant",
    "finite_pairs",
    "toy_constants",
    "evaluate_risks",
    "run_expectation_demo",
    "run_finite_demo",
    "plot_posteriors",
    "plot_risks",
]

EXPECTATION_VARIANTS = ("standard", "pgdat_kl", "pgdat_se", "score", "trades")
FINITE_VARIANTS = ("standard", "score", "score_label")
VARIANT_LABELS = {
    "standard": "Standard",
    "pgdat_kl": "PGD-AT (KL)",
    "pgdat_se": "PGD-AT (SE)",
    "score": "SCORE (PGD-AT-consistent, SE)",
    "trades": "TRADES (KL)",
    "score_label": "SCORE, empirical (label as p_d on B(x_i), SE)",
}
GRID_RANGE = (-10.0, 10.0)


@dataclass(frozen=True)
class ToyConfig:
    """Settings of both demos (defaults: the paper's eps = 1, 10-step PGD, 60,000 samples a step)."""

    eps: float = 1.0
    attack_steps: int = 10
    n_samples: int = 60_000
    resample: bool = True
    iters: int = 80
    lr: float = 0.03
    trades_beta: float = 6.0
    hidden: tuple[int, ...] = (32, 32)
    eval_every: int = 10
    n_eval: int = 2000
    risk_grid: int = 41
    n_pairs: int = 6
    finite_iters: int = 400
    chunk: int = 8192
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        """Every field checked here, before anything is allocated: a :class:`~scoretune.config.ConfigError`
        (one line) naming the field and its ``scoretune toy`` flag where it has one."""
        for name in ("eps", "lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ConfigError(f"toy {_flag(name)}: must be a finite number > 0 (got {v!r}); the paper uses "
                                  f"{'eps 1' if name == 'eps' else 'lr 0.03'}")
        for name in ("attack_steps", "n_samples", "iters", "eval_every", "n_eval", "n_pairs", "finite_iters", "chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"toy {_flag(name)}: must be an integer >= 1 (got {v!r})")
        if isinstance(self.risk_grid, bool) or not isinstance(self.risk_grid, int) or self.risk_grid < 2:
            raise ConfigError(f"toy risk_grid: must be an integer >= 2 (got {self.risk_grid!r})")
        need, have = self.step_bytes(), _memory_bytes()
        if have and need > have // 2:
            most = max(1, (have // 2) // self.step_bytes(1))
            raise ConfigError(f"toy {_flag('n_samples')}: {self.n_samples:,} points a step need about {_gb(need)} "
                              f"(a full batch through the MLP and its attack), more than half of this machine's "
                              f"{_gb(have)}; use at most {most:,} (the paper uses 60,000)")

    def step_bytes(self, n: int | None = None) -> int:
        """A generous estimate of the memory one expectation-form step of ``n`` points (default ``n_samples``)
        takes: each point's input, posterior and label, and the MLP's activations and gradients (float32)."""
        per_point = 4 * (2 * (sum(self.hidden) + 2) + 16)
        return per_point * int(self.n_samples if n is None else n)

    def inner_max(self, grid: int) -> InnerMax:
        """The threat ball |x' - x| <= eps with an exact grid of ``grid`` points (unbounded inputs)."""
        return InnerMax(eps=self.eps, norm="linf", grid=grid)

    def attack(self) -> AttackConfig:
        """The training attack of the Madry-type variants: PGD-``attack_steps`` in the same ball."""
        return AttackConfig(eps=self.eps, norm="linf", steps=self.attack_steps, pixel_range=None)


_FLAGS = {"eps": "--eps", "lr": "--lr", "n_samples": "--n-samples", "iters": "--iters",
          "finite_iters": "--finite-iters"}


def _flag(name: str) -> str:
    return f"{name} ({_FLAGS[name]})" if name in _FLAGS else name


def _gb(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


@dataclass
class VariantResult:
    """One trained variant: the model, its evaluation history and final numbers."""

    variant: str
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return VARIANT_LABELS.get(self.variant, self.variant)


@dataclass
class ToyDemo:
    """A demo's results: ``form`` is 'expectation' or 'finite'."""

    form: str
    config: ToyConfig
    results: dict[str, VariantResult]
    C_l1: BoundEstimate
    C_kl: BoundEstimate
    floor: float
    train_x: torch.Tensor | None = None
    train_y: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        """Flat final numbers, e.g. ``expectation.score.gap_grid``, plus ``C_l1``, ``C_kl``, ``madry_floor``."""
        out = {"C_l1": self.C_l1.mean, "C_l1_stderr": self.C_l1.stderr, "C_kl": self.C_kl.mean,
               "madry_floor": self.floor}
        for name, res in self.results.items():
            for k, v in res.final.items():
                out[f"{self.form}.{name}.{k}"] = float(v)
        return out


# ----------------------------------------------------------------------------- data and models


def sample_toy(
    n: int, generator: torch.Generator, *, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` draws (x (n,1) float32, y (n,) int64) of the toy mixture."""
    y = (torch.rand(n, generator=generator, device=device) < TOY_PRIOR[1]).long()
    mu = torch.tensor(TOY_MEANS, device=device)[y]
    sd = torch.tensor(TOY_VARIANCES, device=device).sqrt()[y]
    x = mu + sd * torch.randn(n, generator=generator, device=device)
    return x.reshape(n, 1), y


def _new_model(cfg: ToyConfig) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # the same initial weights for every variant, no global side effect
        torch.manual_seed(cfg.seed)
        return build_model("toy_mlp", input_shape=(1,), num_classes=2, activation="tanh",
                           hidden=tuple(cfg.hidden)).to(cfg.device)


def grid_points(n: int = 2001, *, device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.linspace(*GRID_RANGE, n, device=device).reshape(n, 1)


@torch.no_grad()
def posterior_gap(model: nn.Module, xs: torch.Tensor | None = None) -> float:
    """mean |p_theta(y=1|x) - p_d(y=1|x)| over ``xs`` (default: 2001 grid points on [-10, 10])."""
    dev = next(model.parameters()).device
    xs = grid_points(device=dev) if xs is None else xs.to(dev)
    with eval_mode(model):
        p1 = F.softmax(model(xs), dim=-1)[:, 1]
    return float((p1 - toy_posterior(xs)[:, 1]).abs().mean())


# ----------------------------------------------------------------------------- objectives


def _soft_ce(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-sum_k target_k log p_k: KL(target || p) up to the target's entropy (same gradient)."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1)


def _kl_logits(p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    return (p * (torch.log(p.clamp_min(1e-12)) - F.log_softmax(logits_q, dim=-1))).sum(-1)


def _score_loss(model: nn.Module, x: torch.Tensor, attack: AttackConfig, generator: torch.Generator) -> torch.Tensor:
    """SCORE with the exact posterior: max and min over x' of SE(p_d(.|x'), p_theta(.|x'))."""
    se = get_divergence("se")
    pair = PairModule(as_probability_module(toy_posterior, logits=False), as_probability_module(model, True))
    x_adv = pgd(pair, x, lambda out: se(out[:, :2], out[:, 2:]), attack, generator=generator)
    return se(toy_posterior(x_adv), F.softmax(model(x_adv), dim=-1)).mean()


def expectation_loss(
    variant: str, model: nn.Module, x: torch.Tensor, attack: AttackConfig, cfg: ToyConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """The mean objective of ``variant`` on points ``x`` with the exact posterior as target."""
    se = get_divergence("se")
    pd_x = toy_posterior(x)
    if variant == "standard":
        return _soft_ce(pd_x, model(x)).mean()
    if variant == "pgdat_kl":
        x_adv = pgd(model, x, lambda out: _soft_ce(pd_x, out), attack, generator=generator)
        return _soft_ce(pd_x, model(x_adv)).mean()
    if variant == "pgdat_se":
        x_adv = pgd(model, x, lambda out: se(pd_x, F.softmax(out, dim=-1)), attack, generator=generator)
        return se(pd_x, F.softmax(model(x_adv), dim=-1)).mean()
    if variant == "score":
        return _score_loss(model, x, attack, generator)
    if variant == "trades":
        with eval_mode(model), torch.no_grad():
            p_nat = F.softmax(model(x), dim=-1)
        x0 = x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device)
        x_adv = pgd(model, x, lambda out: _kl_logits(p_nat, out), attack, x_init=x0, generator=generator)
        logits_nat = model(x)
        robust = _kl_logits(F.softmax(logits_nat, dim=-1), model(x_adv))
        return (_soft_ce(pd_x, logits_nat) + cfg.trades_beta * robust).mean()
    raise ValueError(f"unknown toy variant {variant!r}; choose one of: {', '.join(EXPECTATION_VARIANTS)}")


def finite_loss(
    variant: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """The empirical objective of ``variant`` on labelled pairs (x_i, y_i)."""
    se = get_divergence("se")
    if variant == "standard":
        return F.cross_entropy(model(x), y)
    if variant == "score":
        return _score_loss(model, x, attack, generator)
    if variant == "score_label":  # empirical SCORE: the label is the self-consistent target on B(x_i)
        onehot = F.one_hot(y, 2).to(x.dtype)
        x_adv = pgd(model, x, lambda out: se(onehot, F.softmax(out, dim=-1)), attack, generator=generator)
        return se(onehot, F.softmax(model(x_adv), dim=-1)).mean()
    raise ValueError(f"unknown finite-sample variant {variant!r}; choose one of: {', '.join(FINITE_VARIANTS)}")


# ----------------------------------------------------------------------------- evaluation


def evaluate_risks(model: nn.Module, xs: torch.Tensor, cfg: ToyConfig) -> dict[str, float]:
    """R_SCORE^l1, R_Standard^l1, R_Madry^l1, R_Madry^KL (exact grid inner max) and the two gaps."""
    inner = cfg.inner_max(cfg.risk_grid)
    return {
        "R_score_l1": score_risk(model, toy_posterior, xs, inner, "l1", keep_values=False).mean,
        "R_standard_l1": standard_risk(model, toy_posterior, xs, "l1", keep_values=False).mean,
        "R_madry_l1": madry_risk(model, toy_posterior, xs, inner, "l1", keep_values=False).mean,
        "R_madry_kl": madry_risk(model, toy_posterior, xs, inner, "kl", keep_values=False).mean,
        "gap_grid": posterior_gap(model),
        "gap_data": posterior_gap(model, xs),
    }


def _train(
    variant: str, cfg: ToyConfig, iters: int, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    step_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor],
    eval_xs: torch.Tensor, progress: Callable[[str], None] | None,
) -> VariantResult:
    model = _new_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # constant, then a linear decay to lr/10 over the last 20% of the steps: the end point
    # settles instead of landing on an Adam overshoot
    decay_from = int(0.8 * iters)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else 1.0 - 0.9 * (s - decay_from) / max(iters - decay_from, 1))
    gen = torch.Generator(device=cfg.device)
    gen.manual_seed(cfg.seed + 17)
    res = VariantResult(variant, model)
    t0 = time.perf_counter()
    for it in range(1, iters + 1):
        x, y = batch(it)
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        # Full batch, processed in chunks (the objectives are per-sample means and the model has
        # no batch statistics, so accumulating chunk gradients is exact); keeps tensors in cache.
        for i in range(0, x.shape[0], cfg.chunk):
            xc, yc = x[i: i + cfg.chunk], y[i: i + cfg.chunk]
            w = xc.shape[0] / x.shape[0]
            part = step_loss(model, xc, yc, gen)
            if not torch.isfinite(part):
                raise FloatingPointError(f"toy {variant}: non-finite loss at iteration {it}; lower the learning rate")
            (part * w).backward()
            loss += float(part.detach()) * w
        opt.step()
        sched.step()
        if it % cfg.eval_every == 0 or it == iters or it == 1:
            row = {"iter": float(it), "train_loss": loss}
            row.update(evaluate_risks(model, eval_xs, cfg))
            res.history.append(row)
    res.seconds = time.perf_counter() - t0
    res.final = {k: v for k, v in res.history[-1].items() if k != "iter"}
    res.final["seconds"] = res.seconds
    if progress:
        progress(f"{variant:>12}: gap_grid={res.final['gap_grid']:.4f} gap_data={res.final['gap_data']:.4f} "
                 f"R_SCORE^l1={res.final['R_score_l1']:.4f} R_Madry^KL={res.final['R_madry_kl']:.4f} "
                 f"({res.seconds:.1f}s)")
    model.eval()
    return res


def _eval_sample(cfg: ToyConfig) -> torch.Tensor:
    gen = torch.Generator(device=cfg.device)
    gen.manual_seed(cfg.seed + 1_000_003)
    return sample_toy(cfg.n_eval, gen, device=cfg.device)[0]


def toy_constants(cfg: ToyConfig, n: int = 20_000, grid: int = 401) -> tuple[BoundEstimate, BoundEstimate, float]:
    """(C^l1, C^KL, floor (C^l1)^2/2) of the toy at ``cfg.eps``: exact posterior, exact grid inner
    max, mean over ``n`` samples of p(x)."""
    gen = torch.Generator(device=cfg.device)
    gen.manual_seed(cfg.seed + 2_000_003)
    xs = sample_toy(n, gen, device=cfg.device)[0].double()
    inner = cfg.inner_max(grid)
    c_l1 = estimate_C(toy_posterior, xs, inner, "l1", keep_values=False)
    c_kl = estimate_C(toy_posterior, xs, inner, "kl", keep_values=False)
    return c_l1, c_kl, madry_floor(c_l1)


def train_expectation_variant(variant: str, cfg: ToyConfig, *, eval_xs: torch.Tensor | None = None,
                              progress: Callable[[str], None] | None = None) -> VariantResult:
    """Train one expectation-form variant (full batch of ``cfg.n_samples`` points a step)."""
    if variant not in EXPECTATION_VARIANTS:
        raise ValueError(f"unknown toy variant {variant!r}; choose one of: {', '.join(EXPECTATION_VARIANTS)}")
    attack = cfg.attack()
    gen = torch.Generator(device=cfg.device)
    gen.manual_seed(cfg.seed)
    fixed = None if cfg.resample else sample_toy(cfg.n_samples, gen, device=cfg.device)

    def batch(_it: int) -> tuple[torch.Tensor, torch.Tensor]:
        return fixed if fixed is not None else sample_toy(cfg.n_samples, gen, device=cfg.device)

    def step(model, x, _y, g):
        return expectation_loss(variant, model, x, attack, cfg, g)

    return _train(variant, cfg, cfg.iters, batch, step, _eval_sample(cfg) if eval_xs is None else eval_xs, progress)


def finite_pairs(cfg: ToyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``cfg.n_pairs`` labelled draws with both classes present (redrawn until they are)."""
    gen = torch.Generator(device=cfg.device)
    gen.manual_seed(cfg.seed + 7)
    for _ in range(1000):
        x, y = sample_toy(cfg.n_pairs, gen, device=cfg.device)
        if cfg.n_pairs < 2 or 0 < int(y.sum()) < cfg.n_pairs:
            return x, y
    raise RuntimeError("could not draw pairs with both classes")  # pragma: no cover


def train_finite_variant(variant: str, cfg: ToyConfig, x: torch.Tensor, y: torch.Tensor, *,
                         eval_xs: torch.Tensor | None = None,
                         progress: Callable[[str], None] | None = None) -> VariantResult:
    """Train one finite-sample variant on the pairs (x, y) for ``cfg.finite_iters`` full-batch steps."""
    if variant not in FINITE_VARIANTS:
        raise ValueError(f"unknown finite-sample variant {variant!r}; choose one of: {', '.join(FINITE_VARIANTS)}")
    attack = cfg.attack()

    def step(model, xb, yb, g):
        return finite_loss(variant, model, xb, yb, attack, g)

    return _train(variant, cfg, cfg.finite_iters, lambda _it: (x, y), step,
                  _eval_sample(cfg) if eval_xs is None else eval_xs, progress)


Constants = tuple[BoundEstimate, BoundEstimate, float]


def run_expectation_demo(cfg: ToyConfig = ToyConfig(), variants: tuple[str, ...] = EXPECTATION_VARIANTS, *,
                         constants: Constants | None = None,
                         progress: Callable[[str], None] | None = None) -> ToyDemo:
    """Demo 1: train each variant in expectation form. SCORE (like Standard, whose minimiser is
    also p_d) ends near p_d; the Madry-type objectives (PGD-AT, TRADES) end elsewhere.
    ``constants``: a precomputed :func:`toy_constants` for ``cfg.eps``."""
    c_l1, c_kl, floor = constants or toy_constants(cfg)
    eval_xs = _eval_sample(cfg)
    results = {v: train_expectation_variant(v, cfg, eval_xs=eval_xs, progress=progress) for v in variants}
    return ToyDemo("expectation", cfg, results, c_l1, c_kl, floor)


def run_finite_demo(cfg: ToyConfig = ToyConfig(), variants: tuple[str, ...] = FINITE_VARIANTS, *,
                    constants: Constants | None = None,
                    progress: Callable[[str], None] | None = None) -> ToyDemo:
    """Demo 2: ``cfg.n_pairs`` labelled pairs; SCORE vs Standard."""
    c_l1, c_kl, floor = constants or toy_constants(cfg)
    x, y = finite_pairs(cfg)
    eval_xs = _eval_sample(cfg)
    results = {v: train_finite_variant(v, cfg, x, y, eval_xs=eval_xs, progress=progress) for v in variants}
    return ToyDemo("finite", cfg, results, c_l1, c_kl, floor, train_x=x, train_y=y)


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_posteriors(demo: ToyDemo, path: str | Path | None = None):
    """p_theta(y=1|x) of every variant against the exact p_d(y=1|x) over [-10, 10] (and p(x))."""
    plt = _pyplot()
    xs = grid_points(801)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(xs[:, 0], toy_posterior(xs)[:, 1], "k--", lw=2.2, label="p_d(y=1|x) (exact)")
    for res in demo.results.values():
        with torch.no_grad(), eval_mode(res.model):
            p1 = F.softmax(res.model(xs.to(next(res.model.parameters()).device)), -1)[:, 1].cpu()
        ax.plot(xs[:, 0], p1, lw=1.6, label=f"{res.label}  (gap {res.final['gap_grid']:.3f})")
    dens = _density(xs[:, 0])
    ax.fill_between(xs[:, 0], 0, dens / dens.max() * 0.15, color="0.85", label="p(x) (scaled)")
    if demo.train_x is not None:
        ax.scatter(demo.train_x[:, 0].cpu(), demo.train_y.cpu().float(), c="red", zorder=5, marker="x",
                   label=f"{len(demo.train_y)} training pairs (x_i, y_i)")
    ax.set(xlabel="x", ylabel="p(y=1|x)", ylim=(-0.05, 1.05),
           title=f"toy, {demo.form} form, eps={demo.config.eps}: learned vs exact posterior")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _density(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for pri, mu, var in zip(TOY_PRIOR, TOY_MEANS, TOY_VARIANCES):
        out += pri * torch.exp(-(x - mu) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)
    return out


def plot_risks(demo: ToyDemo, path: str | Path | None = None):
    """Risk curves per variant: R_SCORE^l1 (and R_Standard^l1), R_Madry^l1 with the C^l1 line,
    R_Madry^KL with the floor (C^l1)^2/2 line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for i, res in enumerate(demo.results.values()):
        it = [r["iter"] for r in res.history]
        color = f"C{i}"
        axes[0].plot(it, [r["R_score_l1"] for r in res.history], color=color, label=f"{res.label}: R_SCORE")
        axes[0].plot(it, [r["R_standard_l1"] for r in res.history], color=color, ls=":", label="  R_Standard")
        axes[1].plot(it, [r["R_madry_l1"] for r in res.history], color=color, label=res.label)
        axes[2].plot(it, [r["R_madry_kl"] for r in res.history], color=color, label=res.label)
    axes[1].axhline(demo.C_l1.mean, color="k", ls="--", label=f"C^l1 = {demo.C_l1.mean:.4f}")
    axes[2].axhline(demo.floor, color="k", ls="--", label=f"floor (C^l1)^2/2 = {demo.floor:.4f}")
    axes[0].set(title="R_SCORE^l1 (solid), R_Standard^l1 (dotted)", xlabel="iteration", yscale="log")
    axes[1].set(title="R_Madry^l1 vs C^l1 (Theorem 1)", xlabel="iteration")
    axes[2].set(title="R_Madry^KL vs the floor (Corollary 1)", xlabel="iteration", yscale="log")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.suptitle(f"toy, {demo.form} form, eps={demo.config.eps}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def config_dict(cfg: ToyConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["hidden"] = list(cfg.hidden)
    return d
