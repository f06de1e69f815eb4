"""SCORE's bounds made computable: the risks, the data constant C^D, Theorem 1 and Corollary 1.

Definitions (Pang et al., ICML 2022, arXiv 2202.10103, Sec. 3), for a divergence D, a threat
ball B(x) = {x' : ||x' - x|| <= eps}, the data posterior p_d(.|x) and a model p_theta(.|x):

* R_Standard^D(theta) = E_x D(p_d(.|x),  p_theta(.|x))                      (standard risk)
* R_Madry^D(theta)    = E_x max_{x' in B(x)} D(p_d(.|x),  p_theta(.|x'))    (Madry et al.; eq. of R_Madry)
* R_SCORE^D(theta)    = E_x max_{x' in B(x)} D(p_d(.|x'), p_theta(.|x'))    (self-consistent robust error)
* C^D                 = E_x max_{x' in B(x)} D(p_d(.|x),  p_d(.|x'))        (a property of the data alone)

Theorem 1 (D a distance): |R_Madry^D - C^D| <= R_SCORE^D <= R_Madry^D + C^D.
It holds for every x separately (two triangle inequalities at the maximisers), hence for the
sample mean over the same points: the only estimation error that can break it is an inner
maximum that was not found.

Corollary 1 (l1 and KL, via Pinsker and Jensen): |R_SCORE^l1 - C^l1| <= sqrt(2 R_Madry^KL).
At the self-consistent optimum (R_SCORE = 0, p_theta = p_d) this gives
R_Madry^KL >= (C^l1)^2 / 2 -- :func:`madry_floor`. A robust KL training loss pushed below that
floor cannot come from a self-consistent model: the floor rule of :mod:`scoretune.stopping`
reads it as robust overfitting.

The expectation over x is a sample mean over ``xs``; every estimate carries its standard error.
The inner maximum is found by PGD (:func:`scoretune.attacks.pgd`, several restarts, keeping the
per-sample maximum) or, for 1-D inputs, by an exact dense grid over [x - eps, x + eps]
(``grid=<points>``), which serves as a cross-check of the PGD value. These settings (eps, norm,
steps, restarts, grid, pixel range, generator) are one :class:`InnerMax`, shared by every estimate.

``posterior`` is p_d: any callable ``x -> probabilities (N, K)`` (e.g.
:func:`scoretune.data.toy_posterior`, exact for the toy), or an ``nn.Module`` returning logits.
For real data p_d is unknown: a trained model (a scoretune checkpoint) serves as a proxy, so C^D
is an estimate of the proxy's constant, not the data's, and should be reported with its
standard error and the proxy it came from. Where only labels are known, the empirical posterior
at the data points is the one-hot label: pass it as a tensor of probabilities to
:func:`madry_risk` / :func:`standard_risk` (this is what the engine's ``train_attack_ce`` logs under PGD-AT).

This module imports only torch and numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import AttackConfig, eval_mode, pgd, random_init
from .losses import Divergence, get_divergence

__all__ = [
    "InnerMax",
    "BoundEstimate",
    "ProbabilityModule",
    "PairModule",
    "as_probability_module",
    "estimate_C",
    "c_l1_pgd",
    "madry_risk",
    "score_risk",
    "standard_risk",
    "Theorem1Terms",
    "theorem1_check",
    "Corollary1Terms",
    "corollary1_check",
    "madry_floor",
]

Posterior = Union[Callable[[torch.Tensor], torch.Tensor], nn.Module]

# Grid evaluations are done in chunks of at most this many points.
_GRID_CHUNK_POINTS = 1 << 20


# ----------------------------------------------------------------------------- the estimate type


@dataclass(frozen=True)
class BoundEstimate:
    """A sample-mean estimate of one risk or constant: ``mean`` +- ``stderr`` over ``n`` points.

    ``method`` says how the inner max over B(x) was taken: ``'pgd'`` (projected gradient ascent,
    a lower bound of the true maximum), ``'grid'`` (exact up to the grid spacing, 1-D inputs) or
    ``'none'`` (no inner maximum: the standard risk). ``values`` are the per-sample values.
    """

    mean: float
    stderr: float
    n: int
    method: str
    divergence: str
    values: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_values(cls, values: torch.Tensor, method: str, divergence: str, keep: bool = True) -> "BoundEstimate":
        v = values.detach().to(torch.float64).cpu()
        n = int(v.numel())
        mean = float(v.mean()) if n else float("nan")
        stderr = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        return cls(mean, stderr, n, method, divergence, v.numpy() if keep else None)

    def __float__(self) -> float:
        return self.mean

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.stderr:.2g}"


# ----------------------------------------------------------------------------- posteriors as modules


def _param_dtype(module: nn.Module) -> torch.dtype | None:
    for t in module.parameters():
        return t.dtype
    for t in module.buffers():
        if t.is_floating_point():
            return t.dtype
    return None


class ProbabilityModule(nn.Module):
    """``x -> probabilities (N, K)`` from a posterior given as probabilities or as logits.

    An ``nn.Module`` is registered as a submodule (so :func:`scoretune.attacks.eval_mode` and
    ``.to()`` reach it) and gets ``x`` in its own floating dtype; the output has ``x``'s dtype.
    """

    def __init__(self, posterior: Posterior, logits: bool):
        super().__init__()
        if isinstance(posterior, nn.Module):
            self.net = posterior
            self._fn = None
        else:
            if not callable(posterior):
                raise TypeError("posterior must be a callable x -> probabilities or an nn.Module, "
                                f"got {type(posterior).__name__}")
            self.net = None
            self._fn = posterior
        self.logits = bool(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.net is not None:
            dtype = _param_dtype(self.net)
            out = self.net(x.to(dtype) if dtype is not None and x.is_floating_point() else x)
        else:
            out = self._fn(x)
        if self.logits:
            out = F.softmax(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, dim=-1)
        return out.to(x.dtype) if x.is_floating_point() else out


class PairModule(nn.Module):
    """``x -> cat([p_a(x), p_b(x)], dim=1)``: two posteriors evaluated at the same point.

    Lets one PGD run maximise a quantity that depends on both at x' (R_SCORE's
    D(p_d(.|x'), p_theta(.|x'))).
    """

    def __init__(self, a: ProbabilityModule, b: ProbabilityModule):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


def as_probability_module(posterior: Posterior, logits: bool | None = None) -> ProbabilityModule:
    """Wrap ``posterior``; ``logits=None`` means: an ``nn.Module`` returns logits, a plain callable
    returns probabilities (as :func:`scoretune.data.toy_posterior` does)."""
    if isinstance(posterior, ProbabilityModule):
        return posterior
    if logits is None:
        logits = isinstance(posterior, nn.Module)
    return ProbabilityModule(posterior, logits)


# ----------------------------------------------------------------------------- inner maximisation


@dataclass(frozen=True)
class InnerMax:
    """How the inner maximum over B(x) = {x' : ||x' - x||_norm <= eps} is found.

    ``grid`` (1-D inputs only): an exact dense grid of that many points over [x - eps, x + eps]
    (``method='grid'``). Otherwise PGD (``method='pgd'``, a lower bound of each maximum):
    ``restarts`` restarts of ``steps`` coarse steps of ``step_size`` (default 2.5 eps / steps)
    and a fine run from each end point. ``pixel_range`` is the valid input box (None: unbounded,
    the toy); ``generator`` draws the random starts (shared, so successive estimates differ).
    """

    eps: float
    norm: str = "linf"
    steps: int = 50
    restarts: int = 5
    step_size: float | None = None
    grid: int | None = None
    pixel_range: tuple[float, float] | None = None
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.grid is not None and int(self.grid) < 2:
            raise ValueError(f"grid needs at least 2 points, got {self.grid}")
        if self.steps < 0 or self.restarts < 0:
            raise ValueError(f"steps and restarts must be >= 0, got steps={self.steps}, restarts={self.restarts}")
        self.coarse_attack()  # eps, norm and step size: checked by AttackConfig

    @property
    def method(self) -> str:
        return "grid" if self.grid is not None else "pgd"

    def coarse_attack(self) -> AttackConfig:
        return AttackConfig(eps=self.eps, norm=self.norm, steps=self.steps, step_size=self.step_size,
                            random_start=True, pixel_range=self.pixel_range)

    def fine_attack(self) -> AttackConfig:
        """Half the steps at a tenth of the coarse step, from the coarse end point."""
        return AttackConfig(eps=self.eps, norm=self.norm, steps=max(self.steps // 2, 1),
                            step_size=self.coarse_attack().alpha / 10, random_start=False,
                            pixel_range=self.pixel_range)


Value = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


def _in_box(x: torch.Tensor, pixel_range: tuple[float, float] | None) -> torch.Tensor:
    return x if pixel_range is None else x.clamp(*pixel_range)


def _pgd_sup(xs: torch.Tensor, module: nn.Module, value: Value, fixed: torch.Tensor | None,
             inner: InnerMax) -> torch.Tensor:
    """Per-sample max of ``value(fixed, module(x'))`` over B(x) by PGD.

    Candidates: x itself, and for each restart a coarse run (step 2.5 eps / steps) followed by a
    fine run (step / 10, half the steps) from its end point. Restarts start at random points of
    the ball in antithetic pairs x + delta, x - delta (delta uniform in the ball), so opposite
    sides of the ball are both explored (in 1-D: both directions). No run starts at x itself:
    for C^D, x' = x is the global minimum (D = 0, zero gradient) and PGD would never leave it.
    The per-sample maximum over all candidates is returned, so more restarts never lower it.
    """
    coarse, fine, generator = inner.coarse_attack(), inner.fine_attack(), inner.generator

    def loss(out: torch.Tensor) -> torch.Tensor:
        return value(fixed, out)

    with eval_mode(module), torch.no_grad():
        best = value(fixed, module(_in_box(xs, inner.pixel_range)))
    if inner.eps == 0 or inner.steps == 0:
        return best
    delta = None
    for r in range(max(inner.restarts, 1)):
        if r % 2 == 0:
            delta = random_init(xs, coarse, generator) - xs
            x_init = xs + delta
        else:
            x_init = xs - delta
        x1 = pgd(module, xs, loss, coarse, x_init=x_init, generator=generator)
        x2 = pgd(module, xs, loss, fine, x_init=x1, generator=generator)
        with eval_mode(module), torch.no_grad():
            for cand in (x1, x2):
                best = torch.maximum(best, value(fixed, module(cand)))
    return best


def _grid_sup(xs: torch.Tensor, module: nn.Module, value: Value, fixed: torch.Tensor | None,
              inner: InnerMax) -> torch.Tensor:
    """Per-sample max over ``grid`` equally spaced points of [x - eps, x + eps] (plus x itself);
    1-D inputs only (shape (N,) or (N, 1)). Exact up to the grid spacing 2 eps / (grid - 1)."""
    if xs[0].numel() != 1:
        raise ValueError(f"grid search is for 1-D inputs (shape (N,) or (N, 1)), got shape {tuple(xs.shape)}; "
                         "use the PGD estimate (grid=None)")
    eps, grid = inner.eps, int(inner.grid)
    dtype = xs.dtype if xs.is_floating_point() else torch.float32
    offsets = torch.linspace(-eps, eps, grid, dtype=dtype, device=xs.device)
    offsets = torch.cat([offsets, offsets.new_zeros(1)])
    g = offsets.numel()
    n = xs.shape[0]
    flat = xs.reshape(n).to(dtype)
    chunk = max(1, _GRID_CHUNK_POINTS // g)
    out = []
    with eval_mode(module), torch.no_grad():
        for i in range(0, n, chunk):
            xc = flat[i: i + chunk]
            xp = _in_box(xc[:, None] + offsets[None, :], inner.pixel_range).reshape(-1, *xs.shape[1:])
            f = fixed[i: i + chunk].repeat_interleave(g, dim=0) if fixed is not None else None
            out.append(value(f, module(xp)).reshape(xc.shape[0], g).amax(dim=1))
    return torch.cat(out) if out else flat.new_zeros(0)


def _sup(xs: torch.Tensor, module: nn.Module, value: Value, fixed: torch.Tensor | None,
         inner: InnerMax) -> tuple[torch.Tensor, str]:
    sup = _grid_sup if inner.method == "grid" else _pgd_sup
    return sup(xs, module, value, fixed, inner), inner.method


def _fixed_targets(posterior: Posterior | torch.Tensor, xs: torch.Tensor, logits: bool | None) -> torch.Tensor:
    """p_d(.|x) at the sample points: a given (N, K) probability tensor, or the posterior evaluated."""
    if isinstance(posterior, torch.Tensor):
        if posterior.dim() != 2 or posterior.shape[0] != xs.shape[0]:
            raise ValueError(f"posterior given as a tensor must be (N, K) probabilities with N={xs.shape[0]}, "
                             f"got shape {tuple(posterior.shape)}")
        return posterior.detach().to(xs.dtype if xs.is_floating_point() else torch.float32)
    module = as_probability_module(posterior, logits)
    with eval_mode(module), torch.no_grad():
        return module(xs).detach()


def _div_value(div: Divergence) -> Value:
    def value(fixed: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        return div(fixed, out)

    return value


def _check_xs(xs: torch.Tensor) -> torch.Tensor:
    if not isinstance(xs, torch.Tensor) or xs.dim() < 1 or xs.shape[0] == 0:
        raise ValueError("xs must be a non-empty tensor of inputs with the batch dimension first")
    return xs.detach()


# ----------------------------------------------------------------------------- the risks and C


def c_l1_pgd(eps: float, norm: str, pixel_range: tuple[float, float] | None,
             generator: torch.Generator | None) -> InnerMax:
    """The inner max a model's C^l1 is measured with off the exact grid: PGD-20 with 2 antithetic
    restarts and a fine run each. The automatic floor's proxy, a ``proxy_checkpoint`` and the engine's
    ``val_c_l1`` (``early_stop.refine``) all use it, so the refined floor compares with the estimated one."""
    return InnerMax(eps=float(eps), norm=norm, steps=20, restarts=2, pixel_range=pixel_range, generator=generator)


def estimate_C(
    posterior: Posterior,
    xs: torch.Tensor,
    inner: InnerMax,
    divergence: str = "l1",
    *,
    logits: bool | None = None,
    keep_values: bool = True,
) -> BoundEstimate:
    """C^D = E_x max_{x' in B(x)} D(p_d(.|x), p_d(.|x')) (Pang et al. 2022, Theorem 1's data term).

    The mean over ``xs`` (samples of p(x)) of the per-sample maximum over B(x), found as
    ``inner`` says (PGD, a lower bound of each maximum, or for 1-D inputs an exact grid).
    ``posterior`` is p_d, or for real data a proxy model (logits), in which case the result is
    the proxy's constant.
    """
    xs = _check_xs(xs)
    div = get_divergence(divergence)
    module = as_probability_module(posterior, logits)
    fixed = _fixed_targets(module, xs, None)
    values, method = _sup(xs, module, _div_value(div), fixed, inner)
    return BoundEstimate.from_values(values, method, div.name, keep_values)


def madry_risk(
    model: nn.Module,
    posterior: Posterior | torch.Tensor,
    xs: torch.Tensor,
    inner: InnerMax,
    divergence: str = "kl",
    *,
    model_logits: bool = True,
    posterior_logits: bool | None = None,
    keep_values: bool = True,
) -> BoundEstimate:
    """R_Madry^D = E_x max_{x' in B(x)} D(p_d(.|x), p_theta(.|x')) (Madry et al.'s robust risk in
    SCORE's notation). ``posterior`` may be an (N, K) tensor of p_d(.|x) at ``xs`` (e.g. one-hot
    labels: the empirical risk; the engine's ``train_r_madry`` is its CE-PGD estimate)."""
    xs = _check_xs(xs)
    div = get_divergence(divergence)
    fixed = _fixed_targets(posterior, xs, posterior_logits)
    module = as_probability_module(model, model_logits)
    values, method = _sup(xs, module, _div_value(div), fixed, inner)
    return BoundEstimate.from_values(values, method, div.name, keep_values)


def score_risk(
    model: nn.Module,
    posterior: Posterior,
    xs: torch.Tensor,
    inner: InnerMax,
    divergence: str = "se",
    *,
    model_logits: bool = True,
    posterior_logits: bool | None = None,
    keep_values: bool = True,
) -> BoundEstimate:
    """R_SCORE^D = E_x max_{x' in B(x)} D(p_d(.|x'), p_theta(.|x')) (SCORE, Pang et al. 2022).

    Both posteriors move with x': the maximisation is joint over one x' (a :class:`PairModule`).
    """
    xs = _check_xs(xs)
    if isinstance(posterior, torch.Tensor):
        raise TypeError("score_risk needs p_d at every x' in the ball: pass a callable posterior or a model, "
                        "not a tensor of probabilities")
    div = get_divergence(divergence)
    pd = as_probability_module(posterior, posterior_logits)
    pt = as_probability_module(model, model_logits)
    pair = PairModule(pd, pt)
    with eval_mode(pair), torch.no_grad():
        k = pd(xs[:1]).shape[1]

    def value(_fixed: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        return div(out[:, :k], out[:, k:])

    values, method = _sup(xs, pair, value, None, inner)
    return BoundEstimate.from_values(values, method, div.name, keep_values)


def standard_risk(
    model: nn.Module,
    posterior: Posterior | torch.Tensor,
    xs: torch.Tensor,
    divergence: str = "kl",
    *,
    model_logits: bool = True,
    posterior_logits: bool | None = None,
    keep_values: bool = True,
) -> BoundEstimate:
    """R_Standard^D = E_x D(p_d(.|x), p_theta(.|x)) (no adversary; ``method='none'``)."""
    xs = _check_xs(xs)
    div = get_divergence(divergence)
    fixed = _fixed_targets(posterior, xs, posterior_logits)
    pt = as_probability_module(model, model_logits)
    with eval_mode(pt), torch.no_grad():
        values = div(fixed, pt(xs))
    return BoundEstimate.from_values(values, "none", div.name, keep_values)


# ----------------------------------------------------------------------------- Theorem 1, Corollary 1


def madry_floor(C_l1: float | BoundEstimate) -> float:
    """(C^l1)^2 / 2: the least R_Madry^KL a self-consistent model (R_SCORE = 0) can have.

    From Corollary 1, |R_SCORE^l1 - C^l1| <= sqrt(2 R_Madry^KL), at R_SCORE^l1 = 0.
    """
    c = float(C_l1)
    if not math.isfinite(c) or c < 0:
        raise ValueError(f"C^l1 must be a finite non-negative number, got {c}")
    return c * c / 2.0


@dataclass(frozen=True)
class Theorem1Terms:
    """The terms of Theorem 1, |R_Madry^D - C^D| <= R_SCORE^D <= R_Madry^D + C^D, on one sample.

    ``slack`` is the smaller of the two margins (negative: violated by that much); ``holds``
    allows ``tol`` for the inner maxima being estimates. ``pointwise_fraction`` is the share of
    samples for which the per-sample sandwich holds within ``tol`` (the theorem holds per x).
    """

    divergence: str
    eps: float
    R_madry: BoundEstimate
    R_score: BoundEstimate
    C: BoundEstimate
    lower: float
    upper: float
    slack_lower: float
    slack_upper: float
    slack: float
    holds: bool
    tol: float
    pointwise_fraction: float


def theorem1_check(
    model: nn.Module,
    posterior: Posterior,
    xs: torch.Tensor,
    inner: InnerMax,
    divergence: str = "l1",
    *,
    tol: float = 1e-4,
    model_logits: bool = True,
    posterior_logits: bool | None = None,
) -> Theorem1Terms:
    """Estimate R_Madry^D, R_SCORE^D and C^D on ``xs`` (each inner max as ``inner`` says) and check
    Theorem 1 (D a distance).

    Raises ValueError for a divergence that is not a distance (Theorem 1 needs the triangle
    inequality; see :attr:`scoretune.losses.Divergence.is_distance`).
    """
    div = get_divergence(divergence)
    if not div.is_distance:
        from .losses import DIVERGENCES

        names = ", ".join(n for n, d in DIVERGENCES.items() if d.is_distance)
        raise ValueError(f"Theorem 1 needs a distance; '{div.name}' is not one (choose one of: {names})")
    m = madry_risk(model, posterior, xs, inner, div.name, model_logits=model_logits,
                   posterior_logits=posterior_logits)
    s = score_risk(model, posterior, xs, inner, div.name, model_logits=model_logits,
                   posterior_logits=posterior_logits)
    c = estimate_C(posterior, xs, inner, div.name, logits=posterior_logits)
    lower, upper = abs(m.mean - c.mean), m.mean + c.mean
    sl, su = s.mean - lower, upper - s.mean
    mv, sv, cv = m.values, s.values, c.values
    ok = (sv >= np.abs(mv - cv) - tol) & (sv <= mv + cv + tol)
    return Theorem1Terms(div.name, float(inner.eps), m, s, c, lower, upper, sl, su, min(sl, su),
                         bool(min(sl, su) >= -tol), float(tol), float(ok.mean()))


@dataclass(frozen=True)
class Corollary1Terms:
    """Corollary 1: |R_SCORE^l1 - C^l1| <= sqrt(2 R_Madry^KL); ``floor`` = (C^l1)^2 / 2."""

    eps: float
    R_score_l1: BoundEstimate
    C_l1: BoundEstimate
    R_madry_kl: BoundEstimate
    lhs: float
    rhs: float
    slack: float
    holds: bool
    tol: float
    floor: float


def corollary1_check(
    model: nn.Module,
    posterior: Posterior,
    xs: torch.Tensor,
    inner: InnerMax,
    *,
    tol: float = 1e-4,
    model_logits: bool = True,
    posterior_logits: bool | None = None,
) -> Corollary1Terms:
    """Estimate the terms of Corollary 1 on ``xs``: lhs = |R_SCORE^l1 - C^l1|, rhs = sqrt(2 R_Madry^KL)."""
    s = score_risk(model, posterior, xs, inner, "l1", model_logits=model_logits, posterior_logits=posterior_logits)
    c = estimate_C(posterior, xs, inner, "l1", logits=posterior_logits)
    m = madry_risk(model, posterior, xs, inner, "kl", model_logits=model_logits, posterior_logits=posterior_logits)
    lhs, rhs = abs(s.mean - c.mean), math.sqrt(2.0 * max(m.mean, 0.0))
    return Corollary1Terms(float(inner.eps), s, c, m, lhs, rhs, rhs - lhs, bool(lhs <= rhs + tol), float(tol),
                           madry_floor(c.mean))
