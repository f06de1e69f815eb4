"""Dataset registry and on-device batch loader.

Datasets (``load_dataset(name)``):

* ``digits``  -- scikit-learn's bundled 8x8 handwritten digits (no download), float32 in [0, 1].
* ``toy``     -- the 1-D two-class Gaussian mixture used by Pang et al. (ICML 2022) to illustrate the
  Bayes-optimal classifier: p(y=0)=5/6, x|y=0 ~ N(-1, 4); p(y=1)=1/6, x|y=1 ~ N(1, 1).
  :func:`toy_posterior` gives the exact p_d(y|x).
* ``cifar10`` / ``cifar100`` -- the official "python version" pickle batches.
* ``svhn``    -- ``train_32x32.mat`` / ``test_32x32.mat`` (cropped digits format).

Optionally, DDPM-generated pseudo-labelled images (the ``.npz`` files of Gowal et al. / Rebuffi et al. /
Wang et al., arrays ``image`` (N,H,W,C) uint8 and ``label`` (N,)) are attached as ``Dataset.extra``
and mixed into batches by :class:`BatchLoader` (``extra_fraction``).

Images are stored as uint8 (N,C,H,W) and turned into float32 in [0, 1] at batch time by
:func:`to_float`; models normalise internally with ``DatasetInfo.mean/std``.

This module imports only torch, numpy, scipy and scikit-learn.
"""

from __future__ import annotations

import inspect
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

__all__ = [
    "Split",
    "DatasetInfo",
    "Dataset",
    "DatasetError",
    "register_dataset",
    "available_datasets",
    "load_dataset",
    "to_float",
    "toy_posterior",
    "BatchLoader",
    "TOY_PRIOR",
    "TOY_MEANS",
    "TOY_VARIANCES",
]

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


def register_dataset(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator registering ``loader(root: Path, *, val_size, seed, **options) -> Dataset`` under ``name``.

    Keyword-only parameters of the loader other than ``val_size`` and ``seed`` are the dataset's
    options (e.g. ``n_train`` for ``toy``), passed through from :func:`load_dataset`.
    """

    def decorator(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"dataset '{name}' is already registered; pick another name")
        _REGISTRY[name] = fn
        return fn

    return decorator


def available_datasets() -> list[str]:
    """Sorted names of the registered datasets."""
    return sorted(_REGISTRY)


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


def _n_holdout(n: int, val_size: float | int) -> int:
    """Number of samples a val_size (fraction or count) holds out of n."""
    k = int(round(val_size * n)) if isinstance(val_size, (float, np.floating)) else int(val_size)
    if k >= n and n > 0:
        raise ValueError(f"val_size={val_size} would leave no training data out of {n} samples")
    return k


# --------------------------------------------------------------------------------------------------
# Seeding and splitting helpers
# --------------------------------------------------------------------------------------------------


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


@register_dataset("digits")
def _load_digits(root: Path, *, val_size: float | int, seed: int) -> Dataset:
    """sklearn's 8x8 digits: 1797 images, float32 pixel/16 in [0,1], (N,1,8,8); fixed stratified 25% test."""
    pixels, target = _digits_arrays()
    x = (pixels.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = target.astype(np.int64)
    n_test = int(round(_DIGITS_TEST_FRACTION * len(y)))
    keep, hold = _stratified_holdout(y, n_test, _DIGITS_TEST_SEED)
    train, val = _carve_val(_split(x[keep], y[keep]), val_size, seed)
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


@register_dataset("toy")
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


# --------------------------------------------------------------------------------------------------
# File-based datasets: CIFAR-10/100, SVHN
# --------------------------------------------------------------------------------------------------


def _find_dir(name: str, root: Path, subdir: str, files: list[str], expected: str, fix: str) -> Path:
    """Return the first of ``root/subdir``, ``root`` containing all ``files``, else raise DatasetError."""
    candidates = [root / subdir, root]
    for d in candidates:
        if all((d / f).is_file() for f in files):
            return d
    partial = ""
    for d in candidates:
        present = [f for f in files if (d / f).is_file()]
        if present:
            missing = [f for f in files if f not in present]
            partial = f" (in {d} only {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing)"
            break
    raise DatasetError(
        f"{name} not found: expected {expected} in {candidates[0]} or {candidates[1]}{partial}; {fix}"
    )


# Globals that the official CIFAR pickles (and numpy-array pickles in general) need; anything else is
# refused, so a malicious file cannot run code.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _load_cifar_batch(path: Path, name: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle -> (uint8 (N,3,32,32), int64 (N,)); DatasetError naming the file if corrupt."""
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        if not isinstance(d, dict):
            raise ValueError(f"expected a dict, got {type(d).__name__}")
        for key in (b"data", label_key):
            if key not in d:
                raise KeyError(f"missing key {key!r}")
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        if labels.shape != (data.shape[0],):
            raise ValueError(f"{label_key!r} has {labels.size} entries for {data.shape[0]} images")
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise DatasetError(
            f"{name}: corrupt file {path} ({_one_line(e)}); re-download and re-extract the python version"
        ) from None
    return data.reshape(-1, 3, 32, 32), labels


def _check_labels(name: str, y: np.ndarray, num_classes: int, path: Path) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(f"{name}: corrupt file {path} (labels outside 0..{num_classes - 1}); re-download it")


_CIFAR_FIX = "download {tar}, extract it there, or pass --set data.root=DIR"


@register_dataset("cifar10")
def _load_cifar10(root: Path, *, val_size: float | int, seed: int) -> Dataset:
    """CIFAR-10 python version: data_batch_1..5 + test_batch in root or root/cifar-10-batches-py."""
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    d = _find_dir(
        "cifar10",
        root,
        "cifar-10-batches-py",
        train_files + ["test_batch"],
        "data_batch_1..data_batch_5 and test_batch (CIFAR-10 python version)",
        _CIFAR_FIX.format(tar="cifar-10-python.tar.gz"),
    )
    parts = [_load_cifar_batch(d / f, "cifar10", b"labels") for f in train_files]
    x_tr, y_tr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x_te, y_te = _load_cifar_batch(d / "test_batch", "cifar10", b"labels")
    return _cifar_dataset("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616),
                          (x_tr, y_tr, d / "data_batch_*"), (x_te, y_te, d / "test_batch"), val_size, seed)


def _cifar_dataset(name: str, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...],
                   train: tuple[np.ndarray, np.ndarray, Path], test: tuple[np.ndarray, np.ndarray, Path],
                   val_size: float | int, seed: int) -> Dataset:
    """Check the labels of loaded CIFAR arrays, carve the validation split and describe the dataset."""
    (x_tr, y_tr, tr_path), (x_te, y_te, te_path) = train, test
    _check_labels(name, y_tr, num_classes, tr_path)
    _check_labels(name, y_te, num_classes, te_path)
    tr, val = _carve_val(_split(x_tr, y_tr), val_size, seed)
    info = DatasetInfo(name=name, num_classes=num_classes, input_shape=(3, 32, 32), mean=mean, std=std,
                       augment=True, pixel_range=(0.0, 1.0))
    return Dataset(info=info, train=tr, val=val, test=_split(x_te, y_te))


@register_dataset("cifar100")
def _load_cifar100(root: Path, *, val_size: float | int, seed: int) -> Dataset:
    """CIFAR-100 python version (fine labels): train + test in root or root/cifar-100-python."""
    d = _find_dir(
        "cifar100",
        root,
        "cifar-100-python",
        ["train", "test"],
        "train and test (CIFAR-100 python version)",
        _CIFAR_FIX.format(tar="cifar-100-python.tar.gz"),
    )
    x_tr, y_tr = _load_cifar_batch(d / "train", "cifar100", b"fine_labels")
    x_te, y_te = _load_cifar_batch(d / "test", "cifar100", b"fine_labels")
    return _cifar_dataset("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                          (x_tr, y_tr, d / "train"), (x_te, y_te, d / "test"), val_size, seed)


def _load_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN .mat -> (uint8 (N,3,32,32), int64 (N,)) with label 10 mapped to digit 0."""
    import scipy.io

    try:
        m = scipy.io.loadmat(str(path))
        for key in ("X", "y"):
            if key not in m:
                raise KeyError(f"missing variable {key!r}")
        x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1).astype(np.int64)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise ValueError(f"'X' must be uint8 (32, 32, 3, N), got {x.dtype} {x.shape}")
        if y.shape != (x.shape[3],):
            raise ValueError(f"'y' has {y.size} entries for {x.shape[3]} images")
        if y.size and (y.min() < 0 or y.max() > 10):
            raise ValueError("labels outside 0..10")
    except (OSError, EOFError, KeyError, ValueError, TypeError, NotImplementedError) as e:
        raise DatasetError(f"svhn: corrupt file {path} ({_one_line(e)}); re-download it") from None
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


@register_dataset("svhn")
def _load_svhn(root: Path, *, val_size: float | int, seed: int) -> Dataset:
    """SVHN cropped digits: train_32x32.mat + test_32x32.mat in root or root/svhn."""
    d = _find_dir(
        "svhn",
        root,
        "svhn",
        ["train_32x32.mat", "test_32x32.mat"],
        "train_32x32.mat and test_32x32.mat (SVHN cropped digits)",
        "download them from http://ufldl.stanford.edu/housenumbers/, put them there, or pass --set data.root=DIR",
    )
    x_tr, y_tr = _load_svhn_mat(d / "train_32x32.mat")
    x_te, y_te = _load_svhn_mat(d / "test_32x32.mat")
    train, val = _carve_val(_split(x_tr, y_tr), val_size, seed)
    info = DatasetInfo(
        name="svhn",
        num_classes=10,
        input_shape=(3, 32, 32),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=False,  # horizontal flips turn digits into non-digits
        pixel_range=(0.0, 1.0),
    )
    return Dataset(info=info, train=train, val=val, test=_split(x_te, y_te))


# --------------------------------------------------------------------------------------------------
# DDPM extra data
# --------------------------------------------------------------------------------------------------


def _load_ddpm(path: Path, info: DatasetInfo) -> Split:
    """``.npz`` with ``image`` (N,H,W,C) uint8 and ``label`` (N,) -> uint8 (N,C,H,W) Split."""
    if not path.is_file():
        raise DatasetError(
            f"DDPM data not found: expected an .npz file with arrays 'image' (N,H,W,C uint8) and 'label' (N,) "
            f"at {path}; fix data.ddpm_path or drop it"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            for key in ("image", "label"):
                if key not in z.files:
                    raise KeyError(f"missing array {key!r} (has {', '.join(z.files) or 'none'})")
            image, label = z["image"], z["label"]
    except (OSError, EOFError, KeyError, ValueError) as e:
        raise DatasetError(f"DDPM data: corrupt file {path} ({_one_line(e)})") from None
    if image.dtype != np.uint8 or image.ndim != 4:
        raise DatasetError(f"DDPM data {path}: 'image' must be uint8 (N,H,W,C), got {image.dtype} {image.shape}")
    chw = (image.shape[3], image.shape[1], image.shape[2])
    if chw != tuple(info.input_shape):
        raise DatasetError(
            f"DDPM data {path}: images are (H,W,C)={image.shape[1:]} but {info.name} needs "
            f"(C,H,W)={tuple(info.input_shape)}; use DDPM data generated for {info.name}"
        )
    label = np.asarray(label).reshape(-1)
    if label.shape[0] != image.shape[0] or not np.issubdtype(label.dtype, np.integer):
        raise DatasetError(
            f"DDPM data {path}: 'label' must be {image.shape[0]} integers, got {label.dtype} {label.shape}"
        )
    if label.size and (label.min() < 0 or label.max() >= info.num_classes):
        raise DatasetError(f"DDPM data {path}: labels outside 0..{info.num_classes - 1} for {info.name}")
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
    return Split(x, torch.from_numpy(label.astype(np.int64)))


# --------------------------------------------------------------------------------------------------
# BatchLoader
# --------------------------------------------------------------------------------------------------

_CROP_PAD = 4  # pixels of padding for random crops (CIFAR convention)


def _shard(n: int, world_size: int, rank: int, perm: torch.Tensor) -> torch.Tensor:
    """DistributedSampler-style shard: wrap-pad ``perm`` to a multiple of world_size, take [rank::world_size]."""
    total = math.ceil(n / world_size) * world_size
    if total > n:
        reps = math.ceil(total / n)
        perm = perm.repeat(reps)[:total]
    return perm[rank::world_size]


def _augment_crop_flip(
    x: torch.Tensor, generator: torch.Generator, pad: int, fill: float
) -> torch.Tensor:
    """Per-sample random crop (``pad`` pixels of constant ``fill`` padding) and random horizontal flip.

    Vectorised: one gather with per-sample row/column offsets (flip = reversed column index).
    """
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad), value=fill)
    oy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    flip = torch.rand(b, device=dev, generator=generator) < 0.5
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = oy[:, None] + ar_h  # (B,H)
    cols = ox[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # (B,W)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class BatchLoader:
    """Deterministic, shardable batch iterator over a :class:`Split` that lives on ``device``.

    * ``batch_size`` is per rank. Each epoch draws one permutation of all indices from a generator
      seeded with (seed, epoch) -- identical on all ranks -- wrap-pads it to a multiple of world_size
      and gives rank r the indices [r::world_size] (like DistributedSampler), so every rank yields
      the same number of batches. shuffle=False keeps the original order.
    * drop_last drops this rank's last incomplete batch.
    * augment: random crop (4 px padding at ``pixel_range[0]``, i.e. zero/black) + horizontal flip,
      per sample, on the device, from a generator seeded with (seed, epoch, rank); output clamped to
      ``pixel_range``. Only for image splits (N,C,H,W).
    * extra / extra_fraction (Rebuffi et al. 2021 style DDPM mixing): each full batch holds
      round(batch_size * extra_fraction) samples of ``extra`` (appended after the split's samples)
      and the rest from the split; the epoch ends when this rank's share of the split is used up
      (a last partial batch gets a proportional number of extra samples). Extra samples come from
      their own per-epoch permutation, sharded across ranks and cycled if needed.
    * Yields (x float32, y int64) on ``device``, image batches in ``memory_format`` (e.g.
      ``torch.channels_last`` to match a channels_last model); call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool,
        device: torch.device | str = "cpu",
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        extra: Split | None = None,
        extra_fraction: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        pixel_range: tuple[float, float] | None = (0.0, 1.0),
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if not 0.0 <= extra_fraction < 1.0:
            raise ValueError(f"extra_fraction must be in [0, 1), got {extra_fraction}")
        n_extra = int(round(batch_size * extra_fraction)) if extra is not None else 0
        if extra_fraction > 0 and extra is None:
            raise ValueError("extra_fraction > 0 needs extra data: pass extra=dataset.extra (set ddpm_path)")
        if n_extra > 0 and len(extra) == 0:
            raise ValueError("extra_fraction > 0 but the extra split is empty")
        if n_extra >= batch_size:
            raise ValueError(
                f"extra_fraction={extra_fraction} leaves no room for real samples in a batch of {batch_size}"
            )
        if n_extra > 0 and tuple(extra.x.shape[1:]) != tuple(split.x.shape[1:]):
            raise ValueError(
                f"extra samples have shape {tuple(extra.x.shape[1:])} but the split has {tuple(split.x.shape[1:])}"
            )
        if augment and split.x.dim() != 4:
            raise ValueError(f"augment=True needs images (N,C,H,W), got x of shape {tuple(split.x.shape)}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.pixel_range = None if pixel_range is None else (float(pixel_range[0]), float(pixel_range[1]))
        self.memory_format = memory_format if split.x.dim() == 4 else torch.contiguous_format
        self.epoch = 0
        self._x = split.x.to(self.device)
        self._y = split.y.to(self.device)
        self._n = len(split)
        self._n_extra = n_extra
        self._n_base = self.batch_size - n_extra
        if n_extra > 0:
            self._ex = extra.x.to(self.device)
            self._ey = extra.y.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: the order (and augmentation) is a deterministic function of (seed, epoch)."""
        self.epoch = int(epoch)

    def _per_rank(self) -> int:
        return math.ceil(self._n / self.world_size) if self._n else 0

    def __len__(self) -> int:
        per = self._per_rank()
        return per // self._n_base if self.drop_last else math.ceil(per / self._n_base)

    def _indices(self, n: int, stream: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch, stream))
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        return _shard(n, self.world_size, self.rank, perm)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n_batches = len(self)
        if n_batches == 0:
            return
        base = self._indices(self._n, stream=0).to(self.device)
        sizes = [min(self._n_base, base.numel() - i * self._n_base) for i in range(n_batches)]
        if self._n_extra:
            extra_sizes = [int(round(s * self._n_extra / self._n_base)) for s in sizes]
            ex_idx = self._indices(self._ex.shape[0], stream=1)
            need = sum(extra_sizes)
            if ex_idx.numel() < need:
                ex_idx = ex_idx.repeat(math.ceil(need / ex_idx.numel()))
            ex_idx = ex_idx[:need].to(self.device)
        gen = None
        if self.augment:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(_derive_seed(self.seed, self.epoch, self.rank, 2))
        start = ex_start = 0
        for i, size in enumerate(sizes):
            idx = base[start : start + size]
            start += size
            xb = to_float(self._x.index_select(0, idx))
            yb = self._y.index_select(0, idx)
            if self._n_extra and extra_sizes[i]:
                eidx = ex_idx[ex_start : ex_start + extra_sizes[i]]
                ex_start += extra_sizes[i]
                xb = torch.cat([xb, to_float(self._ex.index_select(0, eidx))])
                yb = torch.cat([yb, self._ey.index_select(0, eidx)])
            if self.augment:
                fill = self.pixel_range[0] if self.pixel_range is not None else 0.0
                xb = _augment_crop_flip(xb, gen, _CROP_PAD, fill)
                if self.pixel_range is not None:
                    xb = xb.clamp_(*self.pixel_range)
            if self.memory_format is not torch.contiguous_format:
                xb = xb.contiguous(memory_format=self.memory_format)
            yield xb, yb
