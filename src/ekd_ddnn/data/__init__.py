"""LightningDataModules: digits (embedded default), CIFAR-10/100, ImageNet folders, synthetic."""

from ekd_ddnn.data.base import ImageDataModule
from ekd_ddnn.data.cifar import CIFARDataModule
from ekd_ddnn.data.digits import DigitsDataModule
from ekd_ddnn.data.imagenet import ImageNetDataModule
from ekd_ddnn.data.synthetic import SyntheticDataModule

__all__ = [
    "CIFARDataModule",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageNetDataModule",
    "SyntheticDataModule",
]
