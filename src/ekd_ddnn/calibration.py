"""BatchNorm recalibration per depth before evaluation or export (``recalibrate_bn=<images>``).

A depth's BatchNorm running statistics are estimated during training while every depth runs
on each batch; shared statistics (the paper) mix the depths' distributions. Re-estimating them
per depth from a few hundred training images after training (Once-for-All's
``set_running_statistics``) costs seconds and gives each depth statistics of its own inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ekd_ddnn.data.base import ImageDataModule
from ekd_ddnn.errors import UserError
from ekd_ddnn.models import DepthDynamicNet


def calibration_batches(
    datamodule: ImageDataModule, num_images: int, seed: int, *, at_most: bool = False
) -> list[Tensor]:
    """The first ``num_images`` images of the (augmented, shuffled) training loader; the same
    images for the same ``seed`` whatever else drew random numbers before. ``at_most``: fewer
    where the split holds fewer (else that is an error)."""
    datamodule.setup("fit")
    batches, seen = [], 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for images, _ in datamodule.train_dataloader():
            batches.append(images[: num_images - seen])
            seen += len(batches[-1])
            if seen >= num_images:
                return batches
    if at_most and seen:
        return batches
    raise UserError(
        f"recalibrate_bn={num_images} but the training split yields only {seen} images per "
        "epoch; pass a smaller number"
    )


def recalibrate_bn(
    net: DepthDynamicNet,
    datamodule: ImageDataModule,
    num_images: int,
    seed: int = 0,
    *,
    depths: Sequence[Sequence[int]] | None = None,
    at_most: bool = False,
) -> int:
    """Give ``depths`` (default: every depth) of ``net`` BatchNorm statistics estimated from
    ``num_images`` training images (``at_most``: fewer where the split holds fewer); returns
    the number of images used."""
    if num_images < 0:
        raise UserError(f"recalibrate_bn must be >= 0 (0: off), got {num_images}")
    if num_images == 0:
        return 0
    device = next(net.parameters()).device
    batches = [
        b.to(device) for b in calibration_batches(datamodule, num_images, seed, at_most=at_most)
    ]
    with torch.no_grad():
        net.recalibrate_bn_stats(batches, depths)
    return sum(len(b) for b in batches)
