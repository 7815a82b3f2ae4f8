"""CIFAR ResNet (He et al. 2016, Sec. 4.2): basic blocks in 3 stages of 16/32/64 channels.

Depth ``[n, n, n]`` is ResNet-``6n+2`` (``[3,3,3]`` = ResNet-20). The blocks are torchvision's
``BasicBlock``; a stage's first block projects its shortcut with a 1x1 conv + BN where the
shape changes (He et al.'s option B; option A's zero-padding shortcut has no parameters and is
about 1% smaller).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1, conv3x3

from ekd_ddnn.models.base import Depth, DepthDynamicNet, kaiming_init_convs

WIDTHS = (16, 32, 64)


def cifar_resnet_name(depth: Depth) -> str:
    """``resnet20`` for a uniform ``[3,3,3]``; ``resnet-3-2-3`` otherwise."""
    if len(set(depth)) == 1:
        return f"resnet{6 * depth[0] + 2}"
    return "resnet-" + "-".join(map(str, depth))


def _stage(inplanes: int, planes: int, stride: int, num_blocks: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
    blocks = [BasicBlock(inplanes, planes, stride, downsample)]
    blocks += [BasicBlock(planes, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def cifar_resnet(
    *,
    blocks: Sequence[int],
    subnets: Sequence[Sequence[int]] = (),
    num_classes: int,
    in_channels: int = 3,
    config: dict | None = None,
) -> DepthDynamicNet:
    """A CIFAR ResNet DDNN with full depth ``blocks`` (3 stages) and the given sub-nets."""
    stem = nn.Sequential(conv3x3(in_channels, WIDTHS[0]), nn.BatchNorm2d(WIDTHS[0]), nn.ReLU())
    stages, inplanes = [], WIDTHS[0]
    for i, (planes, n) in enumerate(zip(WIDTHS, blocks, strict=True)):
        stages.append(_stage(inplanes, planes, 1 if i == 0 else 2, n))
        inplanes = planes
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes))
    net = DepthDynamicNet(
        stem, stages, head, subnets=subnets, namer=cifar_resnet_name, config=config
    )
    kaiming_init_convs(net)
    return net
