"""Random tensors of any shape and class count, for tests and benchmarks (no files)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from ekd_ddnn.data.base import ImageDataModule, check_num_classes
from ekd_ddnn.data.device import Augmentation
from ekd_ddnn.errors import UserError


def make_synthetic(
    num_samples: int, num_classes: int, in_channels: int, image_size: int, seed: int
) -> TensorDataset:
    """Gaussian images with a per-class mean shift (so a net can learn them) and labels."""
    gen = torch.Generator().manual_seed(seed)
    means_gen = torch.Generator().manual_seed(0)  # the same class means for every split
    class_means = torch.randn(num_classes, in_channels, 1, 1, generator=means_gen)
    labels = torch.randint(num_classes, (num_samples,), generator=gen)
    images = torch.randn(num_samples, in_channels, image_size, image_size, generator=gen)
    return TensorDataset(images + class_means[labels], labels)


class SyntheticDataModule(ImageDataModule):
    """Fixed random train / val / test sets (seeded, identical on every rank); no
    augmentation (``on_device``: shuffled batches of the stored float32 images)."""

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        num_train: int = 256,
        num_val: int = 64,
        num_test: int = 64,
        seed: int = 0,
        **loader_kwargs,
    ) -> None:
        super().__init__(**loader_kwargs)
        check_num_classes(num_classes)
        sizes = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
        for key, value in {**sizes, "in_channels": in_channels, "image_size": image_size}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"data.{key} must be an integer >= 1, got {value!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed = seed

    def device_split(self) -> tuple[Tensor, Tensor, Augmentation]:
        return *self.train_set.tensors, Augmentation()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        shape = (self.num_classes, self.in_channels, self.image_size)
        self.train_set = make_synthetic(self.sizes["train"], *shape, seed=self.seed)
        self.val_set = make_synthetic(self.sizes["val"], *shape, seed=self.seed + 1)
        self.test_set = make_synthetic(self.sizes["test"], *shape, seed=self.seed + 2)
