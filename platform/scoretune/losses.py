"""Divergences and adversarial-training objectives of SCORE (Pang et al., ICML 2022).

Everything here works on probability vectors (rows of a ``(N, K)`` tensor) and returns
per-sample values of shape ``(N,)``; reductions are the caller's choice.

The eight divergences are the rows of the paper's loss table (Table 1):

============  ==========================  ======================
name          D(P, Q)                     note
============  ==========================  ======================
``l2``        ||P - Q||_2                 distance
``l1``        ||P - Q||_1                 distance
``linf``      ||P - Q||_inf               distance
``sqrt_js``   sqrt(JS(P || Q))            distance
``js``        JS(P || Q)                  phi o distance (Thm 2)
``kl``        KL(P || Q)                  classic (not a distance)
``l1_sq``     ||P - Q||_1^2               phi o distance (Thm 2)
``se``        ||P - Q||_2^2               squared error, the paper's choice
============  ==========================  ======================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# Probabilities are clamped away from 0 inside logarithms and square roots so that
# one-hot inputs give finite values and finite gradients.
_TINY = 1e-12


def _l2(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """l2 distance ||P - Q||_2 (smoothed at 0 so its gradient stays finite)."""
    return torch.sqrt(((p - q) ** 2).sum(dim=-1) + _TINY)


def _l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """l1 distance ||P - Q||_1 = 2 TV(P, Q)."""
    return (p - q).abs().sum(dim=-1)


def _linf(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """l_inf distance max_k |P_k - Q_k|."""
    return (p - q).abs().amax(dim=-1)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum_k P_k log(P_k / Q_k), with 0 log 0 = 0 (and finite gradients there)."""
    return (p * (torch.log(p.clamp_min(_TINY)) - torch.log(q.clamp_min(_TINY)))).sum(dim=-1)


def _js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence JS(P || Q) = KL(P || M)/2 + KL(Q || M)/2, M = (P + Q)/2 (nats)."""
    m = 0.5 * (p + q)
    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)


def _sqrt_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon distance sqrt(JS(P || Q)) (smoothed at 0 so its gradient stays finite)."""
    return torch.sqrt(_js(p, q).clamp_min(0.0) + _TINY)


def _l1_sq(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """||P - Q||_1^2, the Pinsker side of Corollary 1."""
    return _l1(p, q) ** 2


def _se(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Squared error SE = ||P - Q||_2^2 (the paper's recommended loss)."""
    return ((p - q) ** 2).sum(dim=-1)


@dataclass(frozen=True)
class Divergence:
    """One row of the loss table: a per-sample divergence on probability vectors."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    symmetric: bool
    is_distance: bool  # a metric: symmetric and satisfies the triangle inequality (Theorem 1 applies)
    alias: str

    def __call__(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.fn(p, q)


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in (
        Divergence("l2", _l2, True, True, "l2-dis."),
        Divergence("l1", _l1, True, True, "l1-dis."),
        Divergence("linf", _linf, True, True, "linf-dis."),
        Divergence("sqrt_js", _sqrt_js, True, True, "JS-dis."),
        Divergence("js", _js, True, False, "JS-div."),
        Divergence("kl", _kl, False, False, "KL-div."),
        Divergence("l1_sq", _l1_sq, True, False, "||P-Q||_1^2"),
        Divergence("se", _se, True, False, "SE"),
    )
}

LOSS_NAMES: tuple[str, ...] = tuple(DIVERGENCES)
METHODS: tuple[str, ...] = ("trades", "pgdat")
CLIP_MODES: tuple[str, ...] = ("none", "value", "smoothing")


def get_divergence(name: str) -> Divergence:
    """Look a divergence up by name; unknown names raise a ValueError listing the choices."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}'; choose one of: {', '.join(LOSS_NAMES)}") from None


def divergence(name: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-sample D(P, Q) for the named divergence; ``p`` and ``q`` are ``(N, K)`` probabilities."""
    return get_divergence(name)(p, q)


def smooth_onehot(y: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Label-smoothed one-hot targets: 1 - c on the true class, c / (K - 1) elsewhere.

    This is the official SCORE code's ``(1 - K c/(K-1)) onehot + c/(K-1)``.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    onehot = F.one_hot(y, num_classes).to(torch.float32)
    if smoothing == 0.0:
        return onehot
    off = smoothing / (num_classes - 1)
    return onehot * (1.0 - smoothing - off) + off


def clip_bound(name: str, c: float, num_classes: int) -> float:
    """The clip bound b = D(onehot, (1 - c, c/(K-1), ..., c/(K-1))) for a clip value c.

    A per-sample loss below b is the loss of a prediction that is already within a
    label-smoothing radius c of the one-hot target; clipping stops pushing it further
    (the official SCORE code's loss clipping, Table 2).
    """
    if not 0.0 <= c < 1.0:
        raise ValueError(f"clip value must be in [0, 1), got {c}")
    onehot = torch.zeros(1, num_classes, dtype=torch.float64)
    onehot[0, 0] = 1.0
    soft = torch.full((1, num_classes), c / (num_classes - 1), dtype=torch.float64)
    soft[0, 0] = 1.0 - c
    return float(get_divergence(name)(onehot, soft)[0])


def clip_loss(loss: torch.Tensor, bound: float | torch.Tensor) -> torch.Tensor:
    """Loss clipping: ``max(loss - bound, 0)`` per sample. It never raises a loss."""
    return F.relu(loss - bound)


@dataclass(frozen=True)
class Objective:
    """An adversarial-training objective: method x divergence x beta x clip.

    ``method='pgdat'``  (Madry et al.; SCORE eq. for R_Madry^D):
        loss = D(target, p(x'))                       (KL: cross-entropy on x')
    ``method='trades'`` (Zhang et al.; SCORE's TRADES^D):
        loss = D(target, p(x)) + beta * D(p(x), p(x'))  (KL: CE(x) + beta KL(p(x) || p(x')))

    ``target`` is the label-smoothed one-hot. With KL, D(target, p) is the cross-entropy
    minus the (constant) target entropy, so we use cross-entropy as the classic code does.

    Clipping (two forms, both in the official SCORE code):
        ``clip_mode='value'``     the TRADES robust term becomes max(D - clip, 0) with the raw value ``clip``;
        ``clip_mode='smoothing'`` the whole per-sample loss becomes max(loss - b, 0) with
                                   b = clip_bound(loss, clip, K).
    """

    method: str = "trades"
    loss: str = "se"
    beta: float = 6.0
    label_smoothing: float = 0.0
    clip_mode: str = "none"
    clip: float = 0.0

    def __post_init__(self) -> None:
        # Each message starts with the field it blames: a config shows it as objective.<field>.
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.loss not in DIVERGENCES:
            raise ValueError(f"loss: unknown loss {self.loss!r}; choose one of: {', '.join(LOSS_NAMES)}")
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode: unknown clip_mode {self.clip_mode!r}; choose one of: {', '.join(CLIP_MODES)}")
        for name in ("beta", "clip"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: must be a finite number >= 0 (got {v!r})")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1) (got {self.label_smoothing!r})")
        if self.clip_mode == "value" and self.method != "trades":
            raise ValueError("clip_mode: clip_mode 'value' clips the TRADES robust term; use clip_mode 'smoothing' "
                             "with pgdat")
        if self.clip_mode == "smoothing" and self.clip >= 1.0:
            raise ValueError(f"clip: clip_mode 'smoothing' takes a clip value c in [0, 1) (got {self.clip!r})")

    @property
    def divergence(self) -> Divergence:
        return get_divergence(self.loss)

    def per_sample(
        self,
        logits_adv: torch.Tensor,
        y: torch.Tensor,
        logits_nat: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss terms: ``loss`` (what is minimised), ``natural`` and ``robust``.

        ``logits_nat`` is required for TRADES.
        """
        k = logits_adv.shape[-1]
        target = smooth_onehot(y, k, self.label_smoothing).to(logits_adv.dtype)
        p_adv = F.softmax(logits_adv, dim=-1)
        if self.method == "pgdat":
            if self.loss == "kl":
                robust = -(target * F.log_softmax(logits_adv, dim=-1)).sum(dim=-1)
            else:
                robust = self.divergence(target, p_adv)
            natural = torch.zeros_like(robust)
            loss = robust
        else:
            if logits_nat is None:
                raise ValueError("TRADES needs the clean logits (logits_nat)")
            p_nat = F.softmax(logits_nat, dim=-1)
            if self.loss == "kl":
                natural = -(target * F.log_softmax(logits_nat, dim=-1)).sum(dim=-1)
                robust = (p_nat * (F.log_softmax(logits_nat, dim=-1) - F.log_softmax(logits_adv, dim=-1))).sum(dim=-1)
            else:
                natural = self.divergence(target, p_nat)
                robust = self.divergence(p_nat, p_adv)
            if self.clip_mode == "value":
                robust = clip_loss(robust, self.clip)
            loss = natural + self.beta * robust
        if self.clip_mode == "smoothing":
            loss = clip_loss(loss, clip_bound(self.loss, self.clip, k))
        return {"loss": loss, "natural": natural, "robust": robust}

    def __call__(
        self, logits_adv: torch.Tensor, y: torch.Tensor, logits_nat: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean loss over the batch."""
        return self.per_sample(logits_adv, y, logits_nat)["loss"].mean()


def madry_kl(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample KL robust loss KL(onehot(y) || p(x')) = CE(x', y): the summand of R_Madry (Eq. 2).

    The engine reports its mean on the adversarial training batches (``train_attack_ce``) and at the
    CE-PGD maximiser on a fixed subsample (``train_r_madry``: what the floor rule watches).
    """
    return F.cross_entropy(logits_adv, y, reduction="none")
