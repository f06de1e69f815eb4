"""Model zoo for adversarial training (pure torch).

Every model takes inputs in their *natural* scale -- ``[0, 1]`` pixels for images, raw reals for
vectors -- and normalises inside itself: its first child module is a :class:`Normalize` whose
``mean``/``std`` are buffers (saved in the ``state_dict``, never trained). Attacks therefore work
in ``[0, 1]`` pixel space and exported checkpoints follow RobustBench's convention (the model takes
``[0, 1]`` inputs).

Architectures
-------------
``mlp``
    flatten -> (Linear, act) * len(hidden) -> Linear. Any input shape. Option ``hidden=(256, 256)``.
``toy_mlp``
    the small tanh MLP of the 1-D toy in Pang et al. 2022 (1 -> 32 -> 32 -> 2). Default activation
    ``tanh``; option ``hidden=(32, 32)``.
``small_cnn``
    conv3x3-BN-act, conv3x3-BN-act, maxpool2, conv3x3-BN-act, global avg pool, Linear. Cheap enough
    for CPU; works on 8x8 digits ``(1, 8, 8)`` and 32x32 images. Options ``channels=(32, 64, 128)``,
    ``stem_stride='auto'`` (the first convolution's stride: ``auto`` is 2 for one-channel images of
    28x28 or more -- the 28x28 setting for ``mnist5k``, about 4x fewer multiply-adds -- else 1).
``preact_resnet18``
    PreActResNet-18 (He et al. 2016) exactly as in Rice et al. 2020 / the SCORE code: 11,172,170
    parameters for 10 classes (the often-quoted 11,171,146 is kuangliu's variant without the final
    BatchNorm(512); that BN holds the 1,024-parameter difference). Submodule names match that code (``conv1``, ``layer1``..``layer4``,
    ``bn``, ``linear``). Global average pooling is adaptive, so any ``H, W >= 8`` works.
``wrn-<depth>-<width>`` (``wrn-28-10``, ``wrn-34-10``, ``wrn-70-16`` listed)
    DeepMind's PyTorch ``WideResNet`` (Gowal et al. 2020 / Rebuffi et al. 2021), which SCORE's
    official code trains: pre-activation blocks, BatchNorm momentum 0.01, TF-style "SAME" padding
    for strided convs, 1x1 conv shortcut whenever the channel count changes. Submodule names match
    it (``init_conv``, ``layer.<g>.block.<b>.{batchnorm_0,conv_0,batchnorm_1,conv_1,shortcut}``,
    ``batchnorm``, ``logits``), so dropping the ``normalize.*`` keys yields a state_dict loadable
    into RobustBench's ``DMWideResNet``. Its parameter count equals Zagoruyko & Komodakis' WRN
    (WRN-28-10: 36,479,194; WRN-34-10: 46,160,474; WRN-70-16: 266,796,506 for 10 classes).
    ``depth`` must be ``6n + 4``. Option ``bn_momentum=0.01``.

Activations (``activation=``): relu, silu (alias swish), tanh, gelu, softplus, leaky_relu (slope 0.1,
as in Pang et al. 2021 "Bag of Tricks for AT"), elu. ``None`` picks the model's default.

Options common to every model: ``device`` (default CPU). Weights are always initialised on the CPU
(so a seed gives the same weights on every device) and then moved, except ``device='meta'``, which
builds a shape-only model without allocating memory (handy for counting WRN-70-16's parameters).

Initialisation: convolutions Kaiming-normal (fan_out, ReLU gain, as in Zagoruyko's WRN code),
Linear weights PyTorch's default, every bias zero, BatchNorm weight 1 / bias 0. It only draws from
torch's global RNG, so ``torch.manual_seed`` makes it deterministic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

__all__ = [
    "ModelSizeError",
    "Normalize",
    "available_activations",
    "available_models",
    "build_model",
    "count_parameters",
    "make_activation",
]


# --------------------------------------------------------------------------------------------
# Normalisation and activations
# --------------------------------------------------------------------------------------------


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (images) or per feature (vectors).

    ``mean`` and ``std`` are registered as buffers (in the ``state_dict``, moved by ``.to()``, not
    returned by ``.parameters()``). Their shape depends on ``input_shape`` (the shape of one
    example, without the batch dimension):

    * ``None`` or ``(C, H, W)`` (any rank >= 2): image layout, buffers shaped ``(C, 1, 1)``
      (one trailing 1 per spatial dimension) so they broadcast over ``(N, C, H, W)``;
    * ``(D,)``: vector layout, buffers shaped ``(D,)``.

    A length-1 ``mean``/``std`` is repeated to ``C`` (or ``D``) when ``input_shape`` is given.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        mean_v = [float(v) for v in torch.as_tensor(mean, dtype=torch.float64, device="cpu").flatten().tolist()]
        std_v = [float(v) for v in torch.as_tensor(std, dtype=torch.float64, device="cpu").flatten().tolist()]
        if not mean_v or not std_v:
            raise ValueError("Normalize needs a non-empty mean and std, e.g. mean=(0.5,), std=(0.25,)")
        if not all(math.isfinite(v) for v in mean_v) or not all(math.isfinite(v) and v > 0 for v in std_v):
            raise ValueError("Normalize: mean must be finite and std finite and > 0 for every channel")
        if input_shape is None:
            if len(mean_v) != len(std_v):
                raise ValueError(
                    f"Normalize: mean has {len(mean_v)} values but std has {len(std_v)}; "
                    "give one value per channel for both"
                )
            channels, spatial_dims = len(mean_v), 2
        else:
            shape = tuple(int(s) for s in input_shape)
            if not shape:
                raise ValueError("Normalize: input_shape must have at least one dimension, e.g. (3, 32, 32) or (2,)")
            channels, spatial_dims = shape[0], len(shape) - 1
            mean_v = _per_channel(mean_v, channels, "mean", shape)
            std_v = _per_channel(std_v, channels, "std", shape)
        view = (channels,) + (1,) * spatial_dims
        # Created on the default device, so a model built under ``torch.device("meta")`` stays meta.
        self.register_buffer("mean", torch.tensor(mean_v, dtype=torch.float32).reshape(view))
        self.register_buffer("std", torch.tensor(std_v, dtype=torch.float32).reshape(view))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        if self.mean.is_meta:
            return f"shape={tuple(self.mean.shape)}"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _per_channel(values: list[float], channels: int, what: str, shape: tuple[int, ...]) -> list[float]:
    """Repeat a length-1 statistic to ``channels`` values; reject any other length mismatch."""
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    raise ValueError(
        f"{what} has {len(values)} values but input_shape {shape} has {channels} channels/features; "
        f"give 1 or {channels} values"
    )


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,  # swish (beta = 1) is SiLU, as in Rebuffi et al. 2021
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": nn.ELU,
}


def available_activations() -> list[str]:
    """Names accepted by ``activation=`` (``swish`` is an alias of ``silu``)."""
    return list(_ACTIVATIONS)


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (case-insensitive); ValueError listing the choices."""
    key = str(name).lower().replace("-", "_")
    if key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[key]()


def _activation_factory(name: str) -> Callable[[], nn.Module]:
    make_activation(name)  # validate eagerly, before any layer is built
    return lambda: make_activation(name)


# --------------------------------------------------------------------------------------------
# MLPs
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """normalize -> flatten -> (Linear, act) per hidden width -> Linear(num_classes)."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: Sequence[int],
        act: Callable[[], nn.Module],
        normalize: Normalize,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), act()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.flatten(self.normalize(x))))


# --------------------------------------------------------------------------------------------
# Small CNN
# --------------------------------------------------------------------------------------------


def _conv_bn_act(cin: int, cout: int, act: Callable[[], nn.Module], stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), act()]


class SmallCNN(nn.Module):
    """conv-BN-act, conv-BN-act, maxpool2, conv-BN-act, global average pool, Linear.

    ``stem_stride`` is the first convolution's stride: 2 halves the resolution at once (the 28x28
    setting: mnist5k's 28 -> 14 -> 7, about 4x fewer multiply-adds than stride 1)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int],
        act: Callable[[], nn.Module],
        normalize: Normalize,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.normalize = normalize
        self.features = nn.Sequential(
            *_conv_bn_act(in_channels, c1, act, stride=stem_stride),
            *_conv_bn_act(c1, c2, act),
            nn.MaxPool2d(2),
            *_conv_bn_act(c2, c3, act),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


# --------------------------------------------------------------------------------------------
# PreActResNet-18 (He et al. 2016; code of Rice et al. 2020)
# --------------------------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-act-conv3x3-BN-act-conv3x3 + shortcut (1x1 conv if reshaped)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.act1 = act()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = act()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """PreActResNet (Rice et al. 2020 layout); ``num_blocks=(2, 2, 2, 2)`` is PreActResNet-18."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_blocks: Sequence[int],
        act: Callable[[], nn.Module],
        normalize: Normalize,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        planes_in = 64
        layers = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            blocks = []
            for s in strides:
                blocks.append(PreActBlock(planes_in, planes, s, act))
                planes_in = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.act = act()
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.act(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # == avg_pool2d(out, 4) on 32x32 inputs
        return self.linear(out)


# --------------------------------------------------------------------------------------------
# WideResNet (DeepMind / Rebuffi et al. 2021 variant, used by SCORE's official code)
# --------------------------------------------------------------------------------------------


class WRNBlock(nn.Module):
    """DeepMind's ``_Block``: pre-activation, manual TF "SAME" padding, 1x1 shortcut on channel change.

    When the block has a shortcut conv, both branches start from ``act(bn(x))``; otherwise the
    identity branch carries the raw ``x`` (exactly as in DeepMind's code).
    """

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, act: Callable[[], nn.Module], bn_momentum: float
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"WRN block stride must be 1 or 2, got {stride}")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=bn_momentum)
        self.act_0 = act()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=bn_momentum)
        self.act_1 = act()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False) if self.has_shortcut else None
        )
        # TF "SAME": symmetric for stride 1, bottom/right only for stride 2.
        self._pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act_0(self.batchnorm_0(x))
        out = self.conv_0(F.pad(pre, self._pad))
        out = self.conv_1(self.act_1(self.batchnorm_1(out)))
        identity = self.shortcut(pre) if self.shortcut is not None else x
        return identity + out


class WRNBlockGroup(nn.Module):
    """``num_blocks`` WRN blocks; the first changes width/stride (DeepMind's ``_BlockGroup``)."""

    def __init__(
        self,
        num_blocks: int,
        in_planes: int,
        out_planes: int,
        stride: int,
        act: Callable[[], nn.Module],
        bn_momentum: float,
    ) -> None:
        super().__init__()
        self.block = nn.Sequential(
            *(
                WRNBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, act, bn_momentum)
                for i in range(num_blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` (``depth = 6n + 4``), DeepMind layout; channels 16, 16w, 32w, 64w."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int,
        width: int,
        act: Callable[[], nn.Module],
        normalize: Normalize,
        bn_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"wrn depth must be 6n+4 with n >= 1 (e.g. 10, 16, 22, 28, 34, 40, 70), got {depth}")
        if width < 1:
            raise ValueError(f"wrn width must be a positive integer (e.g. 10), got {width}")
        n = (depth - 4) // 6
        ch = (16, 16 * width, 32 * width, 64 * width)
        self.normalize = normalize
        self.init_conv = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            WRNBlockGroup(n, ch[0], ch[1], 1, act, bn_momentum),
            WRNBlockGroup(n, ch[1], ch[2], 2, act, bn_momentum),
            WRNBlockGroup(n, ch[2], ch[3], 2, act, bn_momentum),
        )
        self.batchnorm = nn.BatchNorm2d(ch[3], momentum=bn_momentum)
        self.act = act()
        self.logits = nn.Linear(ch[3], num_classes)
        self.num_channels = ch[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(self.init_conv(self.normalize(x)))
        out = self.act(self.batchnorm(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # == avg_pool2d(out, 8) on 32x32 inputs
        return self.logits(out)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_LISTED = ["mlp", "toy_mlp", "small_cnn", "preact_resnet18", "wrn-28-10", "wrn-34-10", "wrn-70-16"]
_WRN_PATTERN = re.compile(r"^wrn-(\d+)-(\d+)$")

# model family -> (allowed options with defaults, default activation, minimum spatial size or None)
_FAMILIES: dict[str, tuple[dict, str, int | None]] = {
    "mlp": ({"hidden": (256, 256)}, "relu", None),
    "toy_mlp": ({"hidden": (32, 32)}, "tanh", None),
    "small_cnn": ({"channels": (32, 64, 128), "stem_stride": "auto"}, "relu", 2),
    "preact_resnet18": ({}, "relu", 8),
    "wrn": ({"bn_momentum": 0.01}, "relu", 8),
}


def available_models() -> list[str]:
    """Listed model names; any ``wrn-<depth>-<width>`` with ``depth = 6n + 4`` is accepted too."""
    return list(_LISTED)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (buffers such as BN running stats and Normalize excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class ModelSizeError(UserError, ValueError):
    """A model spec asking for more parameters than :func:`max_parameters` allows."""


MAX_PARAMETERS = 500_000_000
"""Default cap on a model's parameter count (``SCORETUNE_MAX_MODEL_PARAMS`` overrides it): about twice
WRN-70-16 (267M), the largest listed model; 2 GB of float32 weights before gradients and optimizer state."""


def max_parameters() -> int:
    import os

    raw = os.environ.get("SCORETUNE_MAX_MODEL_PARAMS", "").strip()
    try:
        return int(raw) if raw else MAX_PARAMETERS
    except ValueError:
        raise ValueError(f"SCORETUNE_MAX_MODEL_PARAMS={raw!r}: expects an integer") from None


def estimate_parameters(name: str, *, input_shape: Sequence[int], num_classes: int, **options) -> int | None:
    """The parameter count of model ``name`` worked out from its spec alone (nothing is allocated), so an
    absurd spec (``wrn-2800-400``, ``hidden=(10**6, 10**6)``) can be refused before it fills the memory.
    Exact for every family; None when the spec is malformed (:func:`build_model` then says why)."""
    try:
        family, depth, width = _family(name)
        shape = [int(s) for s in input_shape]
        k = int(num_classes)
        opts = {**_FAMILIES[family][0], **options}
        if family in ("mlp", "toy_mlp"):
            dims = [math.prod(shape), *(int(h) for h in opts["hidden"]), k]
            return sum(a * b + b for a, b in zip(dims, dims[1:]))
        cin = shape[0]
        if family == "small_cnn":
            c1, c2, c3 = (int(c) for c in opts["channels"])
            return 9 * (cin * c1 + c1 * c2 + c2 * c3) + 2 * (c1 + c2 + c3) + c3 * k + k
        if family == "preact_resnet18":  # 11,172,170 for 3 channels and 10 classes
            return 11_172_170 - 9 * 64 * 3 - 513 * 10 + 9 * 64 * cin + 513 * k
        n = (depth - 4) // 6
        if n < 1 or width < 1:
            return None
        ch = (16, 16 * width, 32 * width, 64 * width)
        total = 9 * cin * ch[0] + 2 * ch[3] + ch[3] * k + k
        for a, b in zip(ch, ch[1:]):  # a group: the first block changes the width, n - 1 keep it
            first = 2 * a + 9 * a * b + 2 * b + 9 * b * b + (a * b if a != b else 0)
            total += first + (n - 1) * (4 * b + 18 * b * b)
        return total
    except (ValueError, TypeError, KeyError):
        return None


def model_name_problem(name: str) -> str | None:
    """Why ``name`` names no model (None when it does): a listed name or ``wrn-<depth>-<width>`` with
    depth = 6n+4 (n >= 1) and width >= 1."""
    try:
        family, depth, width = _family(name)
    except ValueError as e:
        return str(e)
    if family == "wrn" and (depth is None or width is None or depth < 10 or (depth - 4) % 6 or width < 1):
        return (f"unknown model {name!r}: a wide ResNet is wrn-<depth>-<width> with depth = 6n+4 (10, 16, 22, 28, "
                "34, ...) and width >= 1, e.g. wrn-28-10")
    return None


def model_options(name: str) -> tuple[str, ...]:
    """The options (``model.options`` keys) model ``name`` takes; empty for an unknown name."""
    try:
        return tuple(_FAMILIES[_family(name)[0]][0])
    except ValueError:
        return ()


def _family(name: str) -> tuple[str, int | None, int | None]:
    key = str(name).lower()
    if key in _FAMILIES and key != "wrn":
        return key, None, None
    match = _WRN_PATTERN.match(key)
    if match:
        return "wrn", int(match.group(1)), int(match.group(2))
    raise ValueError(
        f"unknown model {name!r}; choose one of: {', '.join(_LISTED)}, or wrn-<depth>-<width> with depth = 6n+4"
    )


def _check_input_shape(name: str, shape: tuple[int, ...], min_spatial: int | None) -> None:
    if min_spatial is None:
        return
    if len(shape) != 3 or min(shape[1:]) < min_spatial:
        raise ValueError(
            f"model {name!r} needs image inputs shaped (C, H, W) with H, W >= {min_spatial} "
            f"(e.g. (3, 32, 32)), got input_shape={shape}; use 'mlp' for vector inputs"
        )


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out), default Linear weights, zero biases, BN weight 1 / bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    activation: str | None = None,
    **options,
) -> nn.Module:
    """Build model ``name`` for examples shaped ``input_shape`` (no batch dim) in natural scale.

    ``mean``/``std`` (one value, or one per channel/feature) go into the model's first layer, a
    :class:`Normalize`. ``activation=None`` means the model's default: ``relu`` everywhere except
    ``toy_mlp`` (``tanh``); see :func:`available_activations`. ``options`` are model specific
    (see the module docstring) plus ``device``. Raises ValueError for an unknown name, activation
    or option, a WRN depth that is not ``6n + 4``, an input shape the model cannot take, or more
    parameters than :func:`max_parameters` (checked by :func:`estimate_parameters` before allocating).
    """
    family, depth, width = _family(name)
    defaults, default_act, min_spatial = _FAMILIES[family]
    device = torch.device(options.pop("device", "cpu"))
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults) + ["device"])
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; allowed: {allowed}")
    opts = {**defaults, **options}

    shape = tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints like (3, 32, 32), got {input_shape}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
    num_classes = int(num_classes)
    _check_input_shape(name, shape, min_spatial)
    act = _activation_factory(activation if activation is not None else default_act)
    size, cap = estimate_parameters(name, input_shape=shape, num_classes=num_classes, **opts), max_parameters()
    if size is not None and size > cap:
        raise ModelSizeError(f"model {name!r}{f' with options {options}' if options else ''} would have {size:,} "
                             f"parameters, over the cap of {cap:,}; pick a smaller model (e.g. wrn-28-10) or raise "
                             "SCORETUNE_MAX_MODEL_PARAMS")

    def construct() -> nn.Module:
        normalize = Normalize(mean, std, input_shape=shape)
        if family in ("mlp", "toy_mlp"):
            hidden = tuple(int(h) for h in opts["hidden"])
            return MLP(shape, num_classes, hidden, act, normalize)
        if family == "small_cnn":
            channels = tuple(int(c) for c in opts["channels"])
            if len(channels) != 3 or min(channels) < 1:
                raise ValueError(f"small_cnn channels must be 3 positive ints like (32, 64, 128), got {channels}")
            stem = opts["stem_stride"]
            if stem == "auto":  # grey digits of 28x28 or more (mnist5k): mostly background, stride 2 loses little
                stem = 2 if shape[0] == 1 and len(shape) == 3 and min(shape[1:]) >= 28 else 1
            if isinstance(stem, bool) or not isinstance(stem, int) or stem not in (1, 2):
                raise ValueError(f"small_cnn stem_stride must be 1 or 2 (2 for 28x28 inputs), got {stem!r}")
            if stem == 2 and min(shape[1:]) < 8:
                raise ValueError(f"small_cnn stem_stride 2 needs inputs of at least 8x8, got {shape}")
            return SmallCNN(shape[0], num_classes, channels, act, normalize, stem_stride=stem)
        if family == "preact_resnet18":
            return PreActResNet(shape[0], num_classes, (2, 2, 2, 2), act, normalize)
        return WideResNet(shape[0], num_classes, depth, width, act, normalize, float(opts["bn_momentum"]))

    if device.type == "meta":
        with torch.device("meta"):
            model = construct()
            _init_weights(model)
        return model
    model = construct()
    _init_weights(model)
    return model.to(device)
