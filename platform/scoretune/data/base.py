"""The dataset types (splits, info, datasets), the registry of loaders and the seeded split helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import UserError

# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------


class DatasetError(UserError, ValueError):
    """A dataset's files are missing or corrupt. The message is one line saying what is expected where."""


@dataclass(frozen=True)
class Split:
    """One split of a dataset.

    ``x``: uint8 images (N,C,H,W) (scaled to [0,1] at batch time by :func:`to_float`), float32 images
    already in [0,1] (digits), or float32 raw reals (toy, shape (N,1)).
    ``y``: int64 labels (N,).
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"Split: x has {self.x.shape[0]} rows but y has {self.y.shape[0]}; they must match")
        if self.y.dim() != 1 or self.y.dtype != torch.int64:
            raise ValueError(f"Split: y must be an int64 vector, got dtype {self.y.dtype} shape {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    ``mean``/``std``: per-channel normalisation the MODEL applies internally (models take [0,1] pixels).
    ``augment``: whether random crop + horizontal flip makes sense (CIFAR yes; SVHN/digits/toy no).
    ``pixel_range``: the valid input box, (0.0, 1.0) for images (attacks clamp to it); None for toy.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    pixel_range: tuple[float, float] | None


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: train / val (carved from the training data, for checkpoint selection) / test.

    ``val`` is an empty Split (len 0) when ``load_dataset(..., val_size=0)``.
    ``extra`` holds DDPM-generated pseudo-labelled images when ``ddpm_path`` was given, else None.
    """

    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    extra: Split | None = None


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 / 255; floating tensors pass through as float32."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if x.is_floating_point():
        return x.to(torch.float32)
    raise TypeError(f"to_float expects uint8 or floating tensors, got {x.dtype}")


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

# name -> loader(root: Path, *, val_size, seed, **options) -> Dataset. Filled once at import time.
_REGISTRY: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str, input_shape: tuple[int, ...] | None = None
                     ) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator registering ``loader(root: Path, *, val_size, seed, **options) -> Dataset`` under ``name``.

    Keyword-only parameters of the loader other than ``val_size`` and ``seed`` are the dataset's
    options (e.g. ``n_train`` for ``toy``), passed through from :func:`load_dataset`. ``input_shape``,
    when the loader always gives that shape (``DatasetInfo.input_shape``), lets a config be checked
    against it before any data is read (:func:`static_input_shape`: the l2 eps range).
    """

    def decorator(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"dataset '{name}' is already registered; pick another name")
        fn.input_shape = tuple(input_shape) if input_shape is not None else None  # type: ignore[attr-defined]
        _REGISTRY[name] = fn
        return fn

    return decorator


def static_input_shape(name: str) -> tuple[int, ...] | None:
    """The input shape dataset ``name`` was registered with (None: unknown until it is loaded)."""
    return getattr(_REGISTRY.get(name), "input_shape", None)


def available_datasets() -> list[str]:
    """Sorted names of the registered datasets."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------------
# Seeding and splitting helpers
# --------------------------------------------------------------------------------------------------

def _n_holdout(n: int, val_size: float | int) -> int:
    """Number of samples a val_size (fraction or count) holds out of n."""
    k = int(round(val_size * n)) if isinstance(val_size, (float, np.floating)) else int(val_size)
    if k >= n and n > 0:
        raise ValueError(f"val_size={val_size} would leave no training data out of {n} samples")
    return k


def _derive_seed(*keys: int) -> int:
    """A 63-bit seed derived deterministically from integer keys (e.g. (seed, epoch, rank, stream))."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _stratified_holdout(labels: np.ndarray, n_hold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, hold) with ``n_hold`` held out, class-proportionally, seeded.

    Class quotas use largest remainders (ties broken at random), so the held-out class counts are
    within one of proportional. Both index arrays are sorted (original order preserved).
    """
    n = labels.shape[0]
    if n_hold == 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = n_hold * counts / n
    take = np.floor(quota).astype(np.int64)
    remainder = n_hold - int(take.sum())
    order = np.lexsort((rng.random(len(classes)), -(quota - take)))
    take[order[:remainder]] += 1
    hold = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    )
    hold.sort()
    mask = np.ones(n, dtype=bool)
    mask[hold] = False
    return np.flatnonzero(mask), hold


def eval_subset(split: Split, n: int | None, seed: int = 0) -> Split:
    """The ``n`` examples of ``split`` an evaluation of ``n`` examples (``--n-ex``) runs on.

    A fixed, seeded, class-stratified sample (class counts within one of proportional, the
    examples of each class drawn at random with ``seed``, kept in their split order), so every
    model evaluated with the same ``(n, seed)`` sees the same examples and a split stored in class
    order (mnist5k) gives no class-biased prefix. ``n`` None or >= len(split): the whole split.
    """
    if n is None or n >= len(split):
        return split
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n_ex must be a positive integer (or None for the whole split), got {n!r}")
    _, idx = _stratified_holdout(split.y.cpu().numpy(), int(n), int(seed))
    idx_t = torch.from_numpy(idx).to(split.y.device)
    return Split(split.x.index_select(0, idx_t.to(split.x.device)), split.y.index_select(0, idx_t))


def _split(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> Split:
    xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    yt = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(y).astype(np.int64))
    return Split(xt, yt)


def _empty_like(split: Split) -> Split:
    return Split(split.x[:0].clone(), split.y[:0].clone())


def _carve_val(train: Split, val_size: float | int, seed: int) -> tuple[Split, Split]:
    """Hold out a seeded, stratified validation split from ``train``; val is empty when val_size == 0."""
    k = _n_holdout(len(train), val_size)
    if k == 0:
        return train, _empty_like(train)
    keep, hold = _stratified_holdout(train.y.numpy(), k, seed)
    keep_t, hold_t = torch.from_numpy(keep), torch.from_numpy(hold)
    return (
        Split(train.x.index_select(0, keep_t), train.y.index_select(0, keep_t)),
        Split(train.x.index_select(0, hold_t), train.y.index_select(0, hold_t)),
    )


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())


