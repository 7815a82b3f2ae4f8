"""ImageNet ResNets (He et al. 2016) as DDNNs, built from torchvision's own modules.

The stem, the ``layer1..4`` stages and the head are taken from a ``torchvision.models.ResNet``,
so a torchvision weights file loads before wrapping and any depth extracts back into a plain
``torchvision.models.ResNet`` (``[2,2,2,2]`` of a ResNet-34 loads into ``resnet18()``).
Names: basic blocks ``2*sum+2`` (``resnet18``), bottlenecks ``3*sum+2`` (``resnet26``).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ekd_ddnn.errors import UserError
from ekd_ddnn.models.base import Depth, DepthDynamicNet

BLOCK_TYPES: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}


def resnet_namer(block: str):
    """The namer of a block type: ``2*sum+2`` (basic) or ``3*sum+2`` (bottleneck)."""
    per_block = 2 if block == "basic" else 3
    return lambda depth: f"resnet{per_block * sum(depth) + 2}"


def _load_weights(model: ResNet, weights_path: str | Path) -> None:
    """Load a local torchvision state-dict file into ``model`` (never downloads)."""
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; give model.weights_path a local file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or not a torch file
        raise UserError(f"cannot read weights file {path}: {exc}") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is not None and fc.shape[0] != model.fc.out_features:
        raise UserError(
            f"weights file {path} has {fc.shape[0]} classes but the model has "
            f"{model.fc.out_features}; set model.num_classes={fc.shape[0]} or use another file"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"weights file {path} does not fit this architecture: {first}") from None


def imagenet_resnet(
    *,
    blocks: Sequence[int],
    block: str,
    subnets: Sequence[Sequence[int]] = (),
    num_classes: int,
    in_channels: int = 3,
    weights_path: str | None = None,
    config: dict | None = None,
) -> DepthDynamicNet:
    """A torchvision ResNet of depth ``blocks`` wrapped as a DDNN with the given sub-nets."""
    if in_channels != 3:
        raise UserError(
            f"the ImageNet ResNet family takes 3-channel images, the data has {in_channels}; "
            "use a CIFAR model (model=cifar_resnet20, ...) for this data"
        )
    model = ResNet(BLOCK_TYPES[block], list(blocks), num_classes=num_classes)
    if weights_path:
        _load_weights(model, weights_path)
    stem = nn.Sequential(
        OrderedDict(conv1=model.conv1, bn1=model.bn1, relu=model.relu, maxpool=model.maxpool)
    )
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    head = nn.Sequential(OrderedDict(avgpool=model.avgpool, flatten=nn.Flatten(), fc=model.fc))
    return DepthDynamicNet(
        stem,
        stages,
        head,
        subnets=subnets,
        namer=resnet_namer(block),
        config=config,
        extractor=functools.partial(extract_torchvision, block=BLOCK_TYPES[block]),
    )


def to_torchvision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename DDNN keys (``stem.conv1``, ``stages.0``, ``head.fc``) to torchvision's."""
    renamed = {}
    for key, value in state.items():
        if key.startswith(("stem.", "head.")):
            key = key.split(".", 1)[1]
        elif key.startswith("stages."):
            _, stage, rest = key.split(".", 2)
            key = f"layer{int(stage) + 1}.{rest}"
        renamed[key] = value
    return renamed


def extract_torchvision(
    net: DepthDynamicNet, depth: Depth, *, block: type[BasicBlock] | type[Bottleneck]
) -> ResNet:
    """Depth ``depth`` of an ImageNet DDNN as a plain ``torchvision.models.ResNet``."""
    model = ResNet(block, list(depth), num_classes=net.head.fc.out_features)
    model.load_state_dict(to_torchvision_state_dict(net.subnet_state_dict(depth)))
    return model.train(net.training)
