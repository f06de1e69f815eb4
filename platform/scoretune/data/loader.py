"""The on-device batch loader: sharding by rank, crop/flip augmentation, DDPM mixing, channels_last."""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from .base import Split, _derive_seed, to_float

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
