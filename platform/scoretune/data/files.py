"""Datasets read from local files: CIFAR-10/100 python pickles (numpy-only unpickler), SVHN .mat, DDPM .npz."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .base import Dataset, DatasetError, DatasetInfo, Split, _carve_val, _one_line, _split, register_dataset

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


_FIX = "run scoretune data fetch {name} --root {root} (or download {what} and {how}), or pass --set data.root=DIR"


@register_dataset("cifar10", input_shape=(3, 32, 32))
def _load_cifar10(root: Path, *, val_size: float | int, seed: int) -> Dataset:
    """CIFAR-10 python version: data_batch_1..5 + test_batch in root or root/cifar-10-batches-py."""
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    d = _find_dir(
        "cifar10",
        root,
        "cifar-10-batches-py",
        train_files + ["test_batch"],
        "data_batch_1..data_batch_5 and test_batch (CIFAR-10 python version)",
        _FIX.format(name="cifar10", root=root, what="cifar-10-python.tar.gz", how="extract it there"),
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


@register_dataset("cifar100", input_shape=(3, 32, 32))
def _load_cifar100(root: Path, *, val_size: float | int, seed: int) -> Dataset:
    """CIFAR-100 python version (fine labels): train + test in root or root/cifar-100-python."""
    d = _find_dir(
        "cifar100",
        root,
        "cifar-100-python",
        ["train", "test"],
        "train and test (CIFAR-100 python version)",
        _FIX.format(name="cifar100", root=root, what="cifar-100-python.tar.gz", how="extract it there"),
    )
    x_tr, y_tr = _load_cifar_batch(d / "train", "cifar100", b"fine_labels")
    x_te, y_te = _load_cifar_batch(d / "test", "cifar100", b"fine_labels")
    return _cifar_dataset("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                          (x_tr, y_tr, d / "train"), (x_te, y_te, d / "test"), val_size, seed)


def _load_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN .mat -> (uint8 (N,3,32,32), int64 (N,)) with label 10 mapped to digit 0."""
    import scipy.io
    from scipy.io.matlab import MatReadError

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
    except (OSError, EOFError, KeyError, ValueError, TypeError, NotImplementedError, MatReadError) as e:
        raise DatasetError(f"svhn: {path} is not a readable SVHN MATLAB file ({_one_line(e)}); re-download it from "
                           "http://ufldl.stanford.edu/housenumbers/ (cropped digits, *_32x32.mat)") from None
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


@register_dataset("svhn", input_shape=(3, 32, 32))
def _load_svhn(root: Path, *, val_size: float | int, seed: int) -> Dataset:
    """SVHN cropped digits: train_32x32.mat + test_32x32.mat in root or root/svhn."""
    d = _find_dir(
        "svhn",
        root,
        "svhn",
        ["train_32x32.mat", "test_32x32.mat"],
        "train_32x32.mat and test_32x32.mat (SVHN cropped digits)",
        _FIX.format(name="svhn", root=root, what="them from http://ufldl.stanford.edu/housenumbers/",
                    how="put them there"),
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


