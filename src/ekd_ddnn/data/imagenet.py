"""ImageNet (or any image-folder dataset) in torchvision's ``ImageFolder`` layout.

``data_dir/train/<class>/*.JPEG`` and ``data_dir/val/<class>/*.JPEG`` (and optionally
``test/``). Training: RandomResizedCrop + horizontal flip; evaluation: resize to
``image_size / 0.875`` then centre crop (the torchvision reference recipe).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from ekd_ddnn.data.base import ImageDataModule, check_fixed, check_num_classes
from ekd_ddnn.errors import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB, as torchvision's ``pil_loader`` does; a file PIL cannot read
    (not an image, truncated) is a one-line UserError naming it instead of an error deep in
    PIL during an epoch."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except UnidentifiedImageError:
        reason = "not an image format PIL recognises"
    except (OSError, SyntaxError) as exc:  # PIL raises SyntaxError for some corrupt files
        text = (getattr(exc, "strerror", None) or str(exc)).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
    raise UserError(f"cannot read image {path}: {reason}; remove or replace the file")


class ImageNetDataModule(ImageDataModule):
    """An ``ImageFolder`` dataset with ``train/`` and ``val/`` (``test/`` if present)."""

    in_channels = 3

    def __init__(
        self,
        *,
        data_dir: str = "data/imagenet",
        num_classes: int = 1000,
        image_size: int = 224,
        in_channels: int = 3,
        **loader_kwargs,
    ) -> None:
        super().__init__(**loader_kwargs)
        check_fixed("an image folder", in_channels=(in_channels, 3))
        check_num_classes(num_classes)
        self.data_dir = Path(data_dir)
        self.num_classes = num_classes
        self.image_size = image_size

    @property
    def has_test_split(self) -> bool:
        return (self.data_dir / "test").is_dir()

    def _folder(self, split: str, transform: v2.Transform) -> ImageFolder:
        path = self.data_dir / split
        if not path.is_dir():
            raise UserError(
                f"image folder {path} does not exist: put one sub-folder of images per class in "
                f"{self.data_dir}/train and {self.data_dir}/val, or set data.data_dir"
            )
        try:
            dataset = ImageFolder(str(path), transform=transform, loader=load_rgb)
        except (FileNotFoundError, RuntimeError) as exc:
            raise UserError(f"cannot read image folder {path}: {exc}") from None
        if len(dataset.classes) != self.num_classes:
            raise UserError(
                f"{path} has {len(dataset.classes)} class folders but data.num_classes="
                f"{self.num_classes}; set data.num_classes={len(dataset.classes)}"
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
        size = self.image_size
        train_tf = v2.Compose(
            [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *to_tensor]
        )
        resize = v2.Resize(round(size / 0.875), antialias=True)
        eval_tf = v2.Compose([resize, v2.CenterCrop(size), *to_tensor])
        train_set = self._folder("train", train_tf)
        splits = ["val", "test"] if self.has_test_split else ["val"]
        evals = {split: self._folder(split, eval_tf) for split in splits}
        for split, dataset in evals.items():
            if dataset.classes != train_set.classes:
                raise UserError(
                    f"{self.data_dir}/{split} has other class folders than {self.data_dir}/train"
                )
        # assigned last: a failed setup leaves nothing half-built behind
        self.train_set, self.val_set, self.test_set = train_set, evals["val"], evals.get("test")
