"""What every data module shares: its shape facts and the loader settings."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ekd_ddnn.data.device import Augmentation, DeviceBatches, EpochDraws
from ekd_ddnn.errors import UserError

ON_DEVICE_DATA = ("cifar10", "cifar100", "digits", "synthetic")  # data configs with on_device


class ImageDataModule(L.LightningDataModule):
    """Base of the image-classification data modules.

    Subclasses set ``num_classes``, ``in_channels`` and ``image_size`` (the model's
    configuration interpolates them) and fill ``train_set``, ``val_set`` and, where the data
    has one, ``test_set`` in ``setup``. Training batches drop the last incomplete batch (a
    batch of one breaks BatchNorm); evaluation batches keep every sample.
    """

    num_classes: int
    in_channels: int
    image_size: int

    def __init__(
        self,
        *,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        if on_device and type(self).device_split is ImageDataModule.device_split:
            raise UserError(
                f"data.on_device=true is supported for {', '.join(ON_DEVICE_DATA)}, not for "
                f"{type(self).__name__}; set data.on_device=false"
            )
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise UserError(f"data.eval_batch_size must be >= 1, got {eval_batch_size}")
        if num_workers < 0:
            raise UserError(
                f"data.num_workers must be >= 0, got {num_workers} (0 loads in the main process)"
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.on_device = on_device
        self.train_collate: Callable | None = None  # batched training augmentation
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def has_test_split(self) -> bool:
        """Whether the data has a test split (results are reported on it, else on val)."""
        return True

    def _loader(self, dataset: Dataset | None, *, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a data loader")
        sampler = None
        if not train and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning's default DistributedSampler pads the evaluation set to a multiple of
            # the world size, counting some samples twice; this one gives each sample to
            # exactly one rank, so metrics synced by torchmetrics equal a single process's.
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            sampler=sampler,
            drop_last=train,
            collate_fn=self.train_collate if train else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and self._feeds_cuda(),
            persistent_workers=self.persistent_workers,
        )

    def _feeds_cuda(self) -> bool:
        """Whether batches go to a CUDA device (the trainer's, else any there is): pinned
        host memory serves only those copies; elsewhere the DataLoader would warn on every
        run (no accelerator, MPS) or pin for nothing (trainer.accelerator=cpu)."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def device_split(self) -> tuple[Tensor, Tensor, Augmentation]:
        """The training split as stored, images (N, C, H, W) and labels (N,), and its
        augmentation as batched operations: what ``on_device`` holds on the device."""
        raise NotImplementedError(f"{type(self).__name__} has no on-device training split")

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        """Shuffled, augmented training batches (``on_device``: computed on the device)."""
        if self.train_set is None:
            raise RuntimeError("call setup() before asking for a data loader")
        trainer = self.trainer
        device, rank, world_size = torch.device("cpu"), 0, 1
        if trainer is not None:  # each rank takes its own shard of the epoch's order
            device, rank, world_size = (
                trainer.strategy.root_device,
                trainer.global_rank,
                trainer.world_size,
            )
        if trainer is not None and trainer.state.fn == "fit":
            self._check_batches(len(self.train_set), world_size)
        if not self.on_device:
            return self._loader(self.train_set, train=True)
        images, labels, augmentation = self.device_split()
        # the seed torch was seeded with: the run's seed under train (seed_everything, equal on
        # every rank), the calibration seed under recalibrate_bn
        draws = EpochDraws(
            len(labels), augmentation, seed=torch.initial_seed(), rank=rank, world_size=world_size
        )
        return DeviceBatches(images, labels, draws, batch_size=self.batch_size, device=device)

    def _check_batches(self, num_images: int, world_size: int) -> None:
        """Refuse, while fitting, a training split that gives a rank no full batch: the last
        incomplete batch is dropped, so such a run would make no training step and report
        an untrained net (BatchNorm recalibration reads the loader too, and says so itself).
        A rank's share: ``num_images // world_size`` on the device (equal shards), rounded
        up by the DataLoader's distributed sampler (it repeats images to equal shards)."""
        per_rank = num_images // world_size if self.on_device else -(-num_images // world_size)
        if per_rank >= self.batch_size:
            return
        split = f"{num_images} training images"
        if world_size > 1:
            split += f", {per_rank} per rank on {world_size} ranks,"
        fix = (
            f"lower data.batch_size to at most {per_rank} or train on more images"
            if per_rank
            else "train on more images or on fewer ranks"
        )
        raise UserError(
            f"{split} make no batch of data.batch_size={self.batch_size}: no training step; {fix}"
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        if not self.has_test_split:
            raise UserError(f"{type(self).__name__} has no test split; evaluate on validation")
        return self._loader(self.test_set, train=False)


def check_num_classes(num_classes: int) -> None:
    """Refuse a configured class count below 2: a classifier over one class learns nothing
    (and its losses degenerate), so this is a configuration mistake."""
    if num_classes < 2:
        raise UserError(
            f"data.num_classes must be >= 2 (a classifier needs two classes), got {num_classes}"
        )


def check_fixed(dataset: str, **given_and_expected: tuple[int | None, int]) -> None:
    """Fail clearly when a configured shape fact (``num_classes=(given, expected)``, ...)
    contradicts the dataset; ``None`` means not configured."""
    for key, (given, expected) in given_and_expected.items():
        if given is not None and given != expected:
            raise UserError(
                f"{dataset} has {key}={expected} but data.{key}={given}; "
                f"remove the override or set data.{key}={expected}"
            )
