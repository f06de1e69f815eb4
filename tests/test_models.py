"""Spec tests for scoretune.models (model zoo; normalisation inside the model)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scoretune.models import (
    Normalize,
    available_activations,
    available_models,
    build_model,
    count_parameters,
    make_activation,
)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


def _meta(name: str, num_classes: int = 10, **kw) -> nn.Module:
    return build_model(name, input_shape=(3, 32, 32), num_classes=num_classes, device="meta", **kw)


# ---------------------------------------------------------------- registry


def test_available_models_lists_every_documented_name():
    assert available_models() == [
        "mlp", "toy_mlp", "small_cnn", "preact_resnet18", "wrn-28-10", "wrn-34-10", "wrn-70-16",
    ]


def test_available_activations_cover_the_documented_names():
    assert {"relu", "silu", "swish", "tanh", "gelu", "softplus", "leaky_relu"} <= set(available_activations())
    assert isinstance(make_activation("swish"), nn.SiLU)
    assert isinstance(make_activation("leaky_relu"), nn.LeakyReLU)


# ---------------------------------------------------------------- forward + input gradient

FORWARD_CASES = [
    ("mlp", (2,), {}),
    ("mlp", (1, 8, 8), {"hidden": (16,)}),
    ("toy_mlp", (1,), {"activation": "tanh"}),
    ("small_cnn", (1, 8, 8), {}),
    ("small_cnn", (3, 32, 32), {"channels": (8, 16, 32)}),
    ("preact_resnet18", (3, 32, 32), {}),
    ("wrn-10-1", (3, 32, 32), {"activation": "silu"}),
    ("wrn-16-2", (3, 16, 16), {}),
]


FORWARD_IDS = [f"{n}-{'x'.join(map(str, s))}" for n, s, _ in FORWARD_CASES]


@pytest.mark.parametrize("name,shape,kw", FORWARD_CASES, ids=FORWARD_IDS)
def test_forward_gives_finite_logits_and_an_input_gradient(name, shape, kw):
    torch.manual_seed(0)
    model = build_model(name, input_shape=shape, num_classes=7, mean=(0.5,), std=(0.25,), **kw).eval()
    x = torch.rand(3, *shape, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()
    logits[:, 0].sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_small_cnn_takes_digits_shape_and_cifar_shape_and_has_batchnorm():
    for shape in [(1, 8, 8), (3, 32, 32)]:
        model = build_model("small_cnn", input_shape=shape, num_classes=10)
        assert model(torch.rand(4, *shape)).shape == (4, 10)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3


def test_small_cnn_learns_digits_above_85_percent_in_two_epochs():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()  # bundled with scikit-learn, no download
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1300], perm[1300:]
    torch.manual_seed(0)
    model = build_model("small_cnn", input_shape=(1, 8, 8), num_classes=10, mean=(0.3,), std=(0.4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        model.train()
        for i in range(0, len(train), 64):
            idx = train[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.85


# ---------------------------------------------------------------- Normalize


def test_normalize_image_layout_matches_manual_formula():
    mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
    norm = Normalize(CIFAR_MEAN, CIFAR_STD)
    x = torch.rand(2, 3, 5, 4)
    expected = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    assert norm.mean.shape == (3, 1, 1) and norm.std.shape == (3, 1, 1)


def test_normalize_vector_layout_matches_manual_formula():
    norm = Normalize((1.0, -2.0), (2.0, 0.5), input_shape=(2,))
    x = torch.tensor([[3.0, 0.0], [1.0, -2.5]])
    torch.testing.assert_close(norm(x), torch.tensor([[1.0, 4.0], [0.0, -1.0]]))
    assert norm.mean.shape == (2,)


def test_normalize_repeats_a_single_value_per_channel():
    norm = Normalize((0.5,), (0.25,), input_shape=(3, 4, 4))
    assert norm.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(norm(x), (x - 0.5) / 0.25)


def test_normalize_statistics_are_buffers_not_parameters():
    norm = Normalize(CIFAR_MEAN, CIFAR_STD)
    assert list(norm.parameters()) == []
    assert set(norm.state_dict()) == {"mean", "std"}
    assert norm.to(torch.float64).mean.dtype == torch.float64


@pytest.mark.parametrize("mean,std,shape", [
    ((0.5,), (0.0,), None),            # zero std
    ((0.5, 0.5), (0.2,), None),        # length mismatch without a shape
    ((0.1, 0.2), (0.3, 0.3), (3, 8, 8)),  # 2 values for 3 channels
])
def test_normalize_rejects_bad_statistics(mean, std, shape):
    with pytest.raises(ValueError):
        Normalize(mean, std, input_shape=shape)


def test_models_normalise_inside_with_their_first_layer():
    torch.manual_seed(3)
    plain = build_model("small_cnn", input_shape=(3, 8, 8), num_classes=4).eval()
    torch.manual_seed(3)
    normed = build_model("small_cnn", input_shape=(3, 8, 8), num_classes=4, mean=CIFAR_MEAN, std=CIFAR_STD).eval()
    assert isinstance(next(normed.children()), Normalize)
    assert "normalize.mean" in normed.state_dict() and "normalize.std" in normed.state_dict()
    assert count_parameters(normed) == count_parameters(plain)
    x = torch.rand(5, 3, 8, 8)
    manual = (x - torch.tensor(CIFAR_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR_STD).view(3, 1, 1)
    torch.testing.assert_close(normed(x), plain(manual))


def test_mean_with_wrong_number_of_channels_is_rejected_by_build_model():
    with pytest.raises(ValueError, match="channels"):
        build_model("small_cnn", input_shape=(1, 8, 8), num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD)


# ---------------------------------------------------------------- parameter counts


def test_preact_resnet18_parameter_count():
    model = _meta("preact_resnet18")
    # Rice et al. 2020 / SCORE code: with the final BatchNorm(512) before pooling.
    assert count_parameters(model) == 11_172_170
    # kuangliu's PreActResNet-18 (no final BN) is the often-quoted 11,171,146.
    assert count_parameters(model) - count_parameters(model.bn) == 11_171_146


def test_wrn_28_10_parameter_count_matches_zagoruyko_and_deepmind():
    n = count_parameters(_meta("wrn-28-10"))
    assert n == 36_479_194
    assert abs(n - 36.5e6) / 36.5e6 < 0.01
    assert count_parameters(_meta("wrn-28-10", num_classes=100)) == 36_479_194 + (640 + 1) * 90


def test_wrn_34_10_and_70_16_parameter_counts():
    assert count_parameters(_meta("wrn-34-10")) == 46_160_474
    assert count_parameters(_meta("wrn-70-16")) == 266_796_506


def test_meta_device_allocates_nothing_and_keeps_buffers_meta():
    model = _meta("wrn-70-16", mean=CIFAR_MEAN, std=CIFAR_STD)
    assert all(p.is_meta for p in model.parameters())
    assert model.normalize.mean.is_meta


def test_toy_mlp_defaults_to_tanh_32_32():
    model = build_model("toy_mlp", input_shape=(1,), num_classes=2)
    assert count_parameters(model) == (1 * 32 + 32) + (32 * 32 + 32) + (32 * 2 + 2)
    acts = [m for m in model.modules() if isinstance(m, (nn.Tanh, nn.ReLU))]
    assert len(acts) == 2 and all(isinstance(m, nn.Tanh) for m in acts)
    relu = build_model("toy_mlp", input_shape=(1,), num_classes=2, activation="relu", hidden=(8,))
    assert [type(m) for m in relu.modules() if isinstance(m, (nn.Tanh, nn.ReLU))] == [nn.ReLU]


def test_count_parameters_excludes_buffers_and_can_skip_frozen():
    model = build_model("mlp", input_shape=(3,), num_classes=2, hidden=(4,))
    assert count_parameters(model) == (3 * 4 + 4) + (4 * 2 + 2)
    model.head.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == (3 * 4 + 4) + 2


# ---------------------------------------------------------------- WRN architecture details


@pytest.mark.parametrize("activation,cls,other", [("relu", nn.ReLU, nn.SiLU), ("silu", nn.SiLU, nn.ReLU),
                                                  ("swish", nn.SiLU, nn.ReLU)])
def test_wrn_uses_the_requested_activation_modules(activation, cls, other):
    model = build_model("wrn-16-1", input_shape=(3, 32, 32), num_classes=10, activation=activation)
    # 3 groups x 2 blocks x 2 activations + the final one.
    assert sum(isinstance(m, cls) for m in model.modules()) == 13
    assert not any(isinstance(m, other) for m in model.modules())


def test_wrn_batchnorm_momentum_is_deepmind_0_01():
    model = build_model("wrn-10-1", input_shape=(3, 32, 32), num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 for m in bns)


def test_wrn_state_dict_keys_follow_deepmind_naming():
    keys = set(build_model("wrn-16-2", input_shape=(3, 32, 32), num_classes=10).state_dict())
    for key in ["init_conv.weight", "layer.0.block.0.batchnorm_0.weight", "layer.0.block.0.conv_0.weight",
                "layer.0.block.0.shortcut.weight", "layer.2.block.1.conv_1.weight",
                "batchnorm.running_mean", "logits.weight", "logits.bias"]:
        assert key in keys
    assert "layer.0.block.1.shortcut.weight" not in keys  # identity shortcut when widths match


def test_wrn_downsamples_32_to_8_like_deepmind():
    model = build_model("wrn-10-1", input_shape=(3, 32, 32), num_classes=10).eval()
    seen = {}

    def record(module, inputs, output):
        seen["shape"] = tuple(output.shape)

    model.batchnorm.register_forward_hook(record)
    model(torch.rand(1, 3, 32, 32))
    assert seen["shape"] == (1, 64, 8, 8)


# ---------------------------------------------------------------- errors


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet50'") as err:
        build_model("resnet50", input_shape=(3, 32, 32), num_classes=10)
    for name in available_models():
        assert name in str(err.value)
    assert "wrn-<depth>-<width>" in str(err.value)


@pytest.mark.parametrize("name", ["wrn-27-10", "wrn-4-1"])
def test_bad_wrn_depth_says_6n_plus_4(name):
    with pytest.raises(ValueError, match=r"6n\+4"):
        build_model(name, input_shape=(3, 32, 32), num_classes=10, device="meta")


def test_unknown_activation_lists_choices():
    with pytest.raises(ValueError, match="unknown activation 'sigmoidish'") as err:
        build_model("mlp", input_shape=(2,), num_classes=2, activation="sigmoidish")
    for name in ["relu", "silu", "tanh", "gelu", "softplus", "leaky_relu"]:
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["preact_resnet18", "wrn-28-10", "small_cnn"])
def test_image_models_reject_vector_inputs_and_say_what_is_supported(name):
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model(name, input_shape=(2,), num_classes=2)


def test_unknown_option_is_rejected_with_allowed_options():
    with pytest.raises(ValueError, match="hidden"):
        build_model("mlp", input_shape=(2,), num_classes=2, widths=(3,))


# ---------------------------------------------------------------- initialisation


def test_same_seed_same_weights_and_different_seed_different_weights():
    def weights(seed):
        torch.manual_seed(seed)
        return build_model("wrn-10-2", input_shape=(3, 32, 32), num_classes=10, activation="silu").state_dict()

    a, b, c = weights(1), weights(1), weights(2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["init_conv.weight"], c["init_conv.weight"])


def test_init_is_kaiming_fan_out_for_convs_and_zero_for_biases():
    torch.manual_seed(0)
    model = build_model("wrn-16-4", input_shape=(3, 32, 32), num_classes=10)
    conv = model.layer[2].block[1].conv_1  # 256 -> 256, 3x3
    expected_std = math.sqrt(2.0 / (3 * 3 * 256))
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    assert torch.count_nonzero(model.logits.bias) == 0
    mlp = build_model("mlp", input_shape=(5,), num_classes=3)
    assert all(torch.count_nonzero(m.bias) == 0 for m in mlp.modules() if isinstance(m, nn.Linear))
