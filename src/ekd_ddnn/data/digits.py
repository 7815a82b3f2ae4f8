"""scikit-learn's handwritten digits: the embedded default data (ships with scikit-learn).

1797 real 8x8 grey-scale images of the digits 0-9 (UCI), upsampled to ``image_size`` so the
CIFAR-style networks have room for three stages. The split into train / val / test is seeded.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset, default_collate

from ekd_ddnn.data.base import ImageDataModule, check_fixed
from ekd_ddnn.data.device import Augmentation, augment
from ekd_ddnn.errors import UserError


def random_shift(images: Tensor, pad: int) -> Tensor:
    """Shift each image (B, C, H, W) by its own random offset of up to ``pad`` pixels, filling
    with zeros: ``RandomCrop(padding=pad)`` for a whole batch at once (one gather instead of
    one transform call per image, 17x faster on the digits batches)."""
    b = len(images)
    dy = torch.randint(0, 2 * pad + 1, (b, 1))
    dx = torch.randint(0, 2 * pad + 1, (b, 1))
    return augment(images, torch.cat([dy, dx], 1), None, None, None, pad=pad)


def shifted_batch(samples: list[tuple[Tensor, Tensor]], pad: int) -> tuple[Tensor, Tensor]:
    """Collate ``(image, label)`` samples and shift the images randomly (training only)."""
    images, labels = default_collate(samples)
    return random_shift(images, pad), labels


class DigitsDataModule(ImageDataModule):
    """Digits as (1, image_size, image_size) tensors, normalised with the training statistics.

    Training batches get a random shift of up to ``image_size // 8`` pixels per image; no
    flips, since a mirrored digit is another symbol. ``on_device`` holds the normalised float32
    training images and shifts them the same way.
    """

    in_channels = 1

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        **loader_kwargs,
    ) -> None:
        super().__init__(**loader_kwargs)
        check_fixed("digits", num_classes=(num_classes, 10), in_channels=(in_channels, 1))
        if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
            raise UserError("data.val_fraction and data.test_fraction must be > 0 and sum to < 1")
        self.num_classes = 10
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.augmentation = Augmentation(pad=image_size // 8)

    def device_split(self) -> tuple[Tensor, Tensor, Augmentation]:
        return *self.train_set.tensors, self.augmentation

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        labels = torch.tensor(digits.target, dtype=torch.long)
        gen = torch.Generator().manual_seed(self.split_seed)
        test_idx, val_idx, train_idx = torch.randperm(len(labels), generator=gen).split(
            [
                n_test := round(self.test_fraction * len(labels)),
                n_val := round(self.val_fraction * len(labels)),
                len(labels) - n_test - n_val,
            ]
        )
        images = (images - images[train_idx].mean()) / images[train_idx].std()
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.train_collate = functools.partial(shifted_batch, pad=self.augmentation.pad)
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(images[test_idx], labels[test_idx])
