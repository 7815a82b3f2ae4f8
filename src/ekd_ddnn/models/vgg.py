"""VGG with BatchNorm for CIFAR-sized images (Simonyan & Zisserman 2015; 5 stages).

Stage widths 64/128/256/512/512; depth ``[2,2,3,3,3]`` is VGG-16 (13 convs + 3 counted
layers, so ``sum + 3``). Each block is conv3x3 -> BN -> ReLU. The 2x2 max-pool that closes a
stage in the original opens the next stage's first block here, so a stage's output is the
last kept block's and a skipped block never takes a pool with it. The head max-pools to 1x1
and applies one linear layer (the usual CIFAR variant).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ekd_ddnn.models.base import Depth, DepthDynamicNet, kaiming_init_convs

WIDTHS = (64, 128, 256, 512, 512)


def vgg_name(depth: Depth) -> str:
    """``vgg16`` for ``[2,2,3,3,3]``: convolutions plus three."""
    return f"vgg{sum(depth) + 3}"


def conv_bn_relu(in_channels: int, out_channels: int, *, pool: bool = False) -> nn.Sequential:
    """One VGG block; ``pool`` halves the resolution first (a stage's first block)."""
    layers: list[nn.Module] = [nn.MaxPool2d(2)] if pool else []
    layers += [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]
    return nn.Sequential(*layers)


def cifar_vgg(
    *,
    blocks: Sequence[int],
    subnets: Sequence[Sequence[int]] = (),
    num_classes: int,
    in_channels: int = 3,
    config: dict | None = None,
) -> DepthDynamicNet:
    """A VGG-BN DDNN with full depth ``blocks`` (5 stages) and the given sub-nets."""
    stages, channels = [], in_channels
    for i, (width, n) in enumerate(zip(WIDTHS, blocks, strict=True)):
        stage = [conv_bn_relu(channels, width, pool=i > 0)]
        stage += [conv_bn_relu(width, width) for _ in range(n - 1)]
        stages.append(nn.Sequential(*stage))
        channels = width
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    net = DepthDynamicNet(
        nn.Identity(), stages, head, subnets=subnets, namer=vgg_name, config=config
    )
    kaiming_init_convs(net)
    return net
