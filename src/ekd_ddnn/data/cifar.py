"""CIFAR-10 / CIFAR-100 on torchvision's datasets (the official "python version" files).

Training: 4-pixel zero-pad + random 32x32 crop + horizontal flip, per-channel normalisation
(He et al. 2016). A seeded fraction of the training images is held out for validation.

torchvision checks every file against the official release's MD5 sums, which rejects subsets
of the same format (e.g. ``../shared/data/cifar10-subset``, whose batches hold fewer rows). We
check instead that the files exist and load, warn once when their sums differ from the
official ones, and read them as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Subset
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from ekd_ddnn.data.base import ImageDataModule, check_fixed
from ekd_ddnn.errors import UserError

log = logging.getLogger(__name__)

STATS = {  # per-channel mean and std of the training images
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class _CIFAR10(CIFAR10):
    meta = {**CIFAR10.meta, "md5": None}

    def _check_integrity(self) -> bool:  # files are checked by CIFARDataModule
        return True


class _CIFAR100(CIFAR100):
    meta = {**CIFAR100.meta, "md5": None}

    def _check_integrity(self) -> bool:  # files are checked by CIFARDataModule
        return True


DATASETS = {"cifar10": (CIFAR10, _CIFAR10, 10), "cifar100": (CIFAR100, _CIFAR100, 100)}


class CIFARDataModule(ImageDataModule):
    """CIFAR-10 or CIFAR-100 from ``data_dir`` (which holds ``cifar-10-batches-py/`` etc.)."""

    in_channels = 3
    image_size = 32

    def __init__(
        self,
        *,
        name: str = "cifar10",
        data_dir: str = "data",
        num_classes: int | None = None,
        in_channels: int | None = None,
        image_size: int | None = None,
        download: bool = False,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        **loader_kwargs,
    ) -> None:
        super().__init__(**loader_kwargs)
        if name not in DATASETS:
            raise UserError(f"unknown CIFAR dataset {name!r}; choose cifar10 or cifar100")
        self.name = name
        official, _, self.num_classes = DATASETS[name]
        check_fixed(
            name,
            num_classes=(num_classes, self.num_classes),
            in_channels=(in_channels, 3),
            image_size=(image_size, 32),
        )
        if not 0 < val_fraction < 1:
            raise UserError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.data_dir = Path(data_dir)
        self.folder = self.data_dir / official.base_folder
        self.download = download
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def _files(self, split: str) -> list[tuple[str, str]]:
        official = DATASETS[self.name][0]
        return [tuple(f) for f in (official.train_list if split == "train" else official.test_list)]

    def _missing(self, split: str) -> list[str]:
        return [name for name, _ in self._files(split) if not (self.folder / name).is_file()]

    @property
    def has_test_split(self) -> bool:
        return not self._missing("test")

    def prepare_data(self) -> None:
        if self.download:
            DATASETS[self.name][0](self.data_dir, train=True, download=True)
            DATASETS[self.name][0](self.data_dir, train=False, download=True)

    def _check_files(self) -> None:
        missing = self._missing("train")
        meta = DATASETS[self.name][0].meta["filename"]
        if not (self.folder / meta).is_file():
            missing.append(meta)
        if missing:
            where = f"missing {', '.join(missing)}" if self.folder.is_dir() else "no such directory"
            raise UserError(
                f"{self.name} not found in {self.folder} ({where}): put the official "
                f"python-version files there (set data.data_dir to the folder that holds "
                f"{self.folder.name}/), or set data.download=true where there is internet"
            )
        present = [f for split in ("train", "test") for f in self._files(split)]
        present = [(n, m) for n, m in present if (self.folder / n).is_file()]
        changed = [n for n, m in present if not check_integrity(str(self.folder / n), m)]
        if changed:
            log.warning(
                "%s files in %s differ from the official release (MD5 of %s); using them as "
                "they are (a subset or a re-export of the same format)",
                self.name,
                self.folder,
                ", ".join(changed),
            )

    def _dataset(self, train: bool, transform: v2.Transform):
        cls = DATASETS[self.name][1]
        try:
            dataset = cls(self.data_dir, train=train, transform=transform)
        except Exception as exc:  # unreadable pickles: truncated or not CIFAR files
            raise UserError(f"cannot read {self.name} files in {self.folder}: {exc}") from None
        if len(dataset.data) != len(dataset.targets):
            raise UserError(
                f"cannot read {self.name} files in {self.folder}: {len(dataset.data)} images but "
                f"{len(dataset.targets)} labels"
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._check_files()
        mean, std = STATS[self.name]
        to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        train_tf = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *to_tensor])
        eval_tf = v2.Compose(to_tensor)
        train_full = self._dataset(True, train_tf)
        n = len(train_full)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        n_val = max(1, round(self.val_fraction * n))
        if n - n_val < self.batch_size:
            raise UserError(
                f"{n - n_val} training images remain after the validation split, fewer than "
                f"data.batch_size={self.batch_size}; lower data.val_fraction or data.batch_size"
            )
        val_set = Subset(self._dataset(True, eval_tf), order[:n_val])
        test_set = self._dataset(False, eval_tf) if self.has_test_split else None
        # assigned last: a failed setup leaves nothing half-built behind
        self.train_set, self.val_set, self.test_set = (
            Subset(train_full, order[n_val:]),
            val_set,
            test_set,
        )
