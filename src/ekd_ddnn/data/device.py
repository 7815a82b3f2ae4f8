"""Training data held on the training device (``data.on_device=true``).

The training split lives as one tensor on the device, as stored (CIFAR: uint8 pixels; digits
and synthetic: their float32 images), padded once. Each batch is a single gather (rows of the
epoch's order, cropped at per-image offsets, mirrored per image) followed, for uint8 images, by
the scale and normalisation of torchvision's ``ToDtype(scale=True)`` and ``Normalize``: no
DataLoader, no workers, no per-image Python. :func:`augment` is the same computation on a batch,
for comparison with the per-image transforms.

Each epoch's order, offsets and flips are drawn on the CPU from a generator seeded with
``(seed, epoch)`` and copied to the device once per epoch, so they are the same on every
device, every rank, and after a resume at an epoch boundary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation of a data module, as batched operations.

    ``pad``: zero padding before a random crop back to the image size (``RandomCrop(size,
    padding=pad)``; 0: no crop); ``flip``: a random horizontal flip per image; ``mean`` and
    ``std``: per-channel normalisation of uint8 images scaled to [0, 1] (None: the images are
    stored ready, e.g. already normalised floats).
    """

    pad: int = 0
    flip: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def crop_flip(
    padded: Tensor, index: Tensor, offsets: Tensor, flips: Tensor | None, pad: int
) -> Tensor:
    """Crops of ``padded[index]`` (images padded by ``pad``: (N, C, H + 2 pad, W + 2 pad)) back
    to (H, W) at ``offsets`` (B, 2) = (top, left) in ``0..2 pad``, mirrored left-right where
    ``flips`` (B,) is true (None: none): (B, C, H, W), contiguous, in one gather."""
    _, c, hp, wp = padded.shape
    h, w = hp - 2 * pad, wp - 2 * pad
    device = padded.device
    rows = offsets[:, :1] + torch.arange(h, device=device)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(w, device=device)  # (B, W)
    if flips is not None:
        cols = torch.where(flips[:, None], cols.flip(1), cols)  # crop, then mirror
    channels = torch.arange(c, device=device)
    return padded[
        index[:, None, None, None],
        channels[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def normalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 images (B, C, H, W) to float32 in [0, 1], normalised per channel (``mean`` and
    ``std``: (C, 1, 1) float32): torchvision's ``ToDtype(float32, scale=True)`` and
    ``Normalize`` operation for operation, so the values are bit-identical."""
    return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


def channel_stats(values: Sequence[float] | Tensor, device: torch.device | str) -> Tensor:
    """Per-channel statistics as a (C, 1, 1) float32 tensor on ``device``."""
    return torch.as_tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


def augment(
    images: Tensor,
    offsets: Tensor,
    flips: Tensor | None,
    mean: Sequence[float] | Tensor | None,
    std: Sequence[float] | Tensor | None,
    *,
    pad: int = 4,
) -> Tensor:
    """The training augmentation of a batch (B, C, H, W) with explicit random choices: zero
    pad by ``pad``, crop back at ``offsets`` (B, 2) = (top, left), mirror where ``flips``, then
    (uint8 images, ``mean``/``std`` given) scale to [0, 1] and normalise. Equal to
    ``RandomCrop(padding=pad)`` + ``RandomHorizontalFlip`` + ``ToDtype`` + ``Normalize`` per
    image when those draw the same offsets and flips."""
    padded = F.pad(images, (pad, pad, pad, pad))
    index = torch.arange(len(images), device=images.device)
    if flips is not None:
        flips = flips.to(images.device)
    crops = crop_flip(padded, index, offsets.to(images.device), flips, pad)
    if mean is None or std is None:
        return crops
    return normalise(crops, channel_stats(mean, images.device), channel_stats(std, images.device))


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for ``(seed, epoch)``, well mixed (numpy's SeedSequence), so
    neighbouring seeds and epochs give unrelated streams."""
    return int(np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1, np.uint64)[0] >> 1)


class EpochDraws:
    """Per-epoch random choices of the on-device loader: this rank's share of the epoch's
    permutation of ``num_images`` and each position's crop offsets and flip.

    Lightning calls :meth:`set_epoch` before every training epoch (as on a
    ``DistributedSampler``). Every rank draws the same permutation from ``(seed, epoch)`` and
    takes positions ``rank, rank + world_size, ...`` of its first
    ``num_images // world_size * world_size`` entries: disjoint shards of equal size (so every
    rank runs the same number of steps); the remainder, under ``world_size`` images, waits for
    another epoch's order.
    """

    def __init__(
        self,
        num_images: int,
        augmentation: Augmentation,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_images = num_images
        self.augmentation = augmentation
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the choices of ``epoch`` on the next :meth:`draw`."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Images this rank sees per epoch."""
        return self.num_images // self.world_size

    def draw(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """This rank's image indices (n,), offsets (n, 2) in ``0..2 pad`` and flips (n,) bool
        (None without flips) for the current epoch, on the CPU."""
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        n, aug = self.num_images, self.augmentation
        order = torch.randperm(n, generator=gen)
        offsets = torch.randint(0, 2 * aug.pad + 1, (n, 2), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5 if aug.flip else None
        mine = slice(self.rank, len(self) * self.world_size, self.world_size)
        return order[mine], offsets[mine], None if flips is None else flips[mine]


class DeviceBatches:
    """The training loader of ``data.on_device=true``: an iterable of ``(images, labels)``
    batches (``batch_size`` each, the incomplete last one dropped) computed on ``device`` from
    the whole split held there.

    Args:
        images: the training split as stored, (N, C, H, W) (uint8 where ``augmentation``
            normalises); copied to ``device`` once, zero-padded by ``augmentation.pad``.
        labels: (N,) class indices.
        draws: the per-epoch order, offsets and flips (its ``set_epoch`` is what Lightning
            calls, found as this loader's ``sampler``).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        draws: EpochDraws,
        *,
        batch_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        aug = draws.augmentation
        self.padded = F.pad(images.to(device), (aug.pad,) * 4)
        self.labels = labels.to(device)
        self.sampler = draws
        self.batch_size = batch_size
        self.device = torch.device(device)
        normalises = aug.mean is not None and aug.std is not None
        self.stats = (
            (channel_stats(aug.mean, device), channel_stats(aug.std, device))
            if normalises
            else None
        )

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        index, offsets, flips = self.sampler.draw()
        # one host-to-device copy per epoch; each batch then slices device tensors only
        parts = [index[:, None], offsets] + ([] if flips is None else [flips[:, None].long()])
        choices = torch.cat(parts, 1).to(self.device)
        index, offsets = choices[:, 0], choices[:, 1:3]
        flips = None if flips is None else choices[:, 3].bool()
        pad = self.sampler.augmentation.pad
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            rows = slice(start, start + self.batch_size)
            batch = crop_flip(
                self.padded, index[rows], offsets[rows], None if flips is None else flips[rows], pad
            )
            if self.stats is not None:
                batch = normalise(batch, *self.stats)
            yield batch, self.labels[index[rows]]
