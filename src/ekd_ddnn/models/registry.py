"""Architectures by name, and the one builder Hydra calls (``ekd_ddnn.models.build_net``).

Depths are data: each full-net is a family plus its per-stage block counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ekd_ddnn.errors import InvalidDepthError, UserError
from ekd_ddnn.models.base import COMPILE_MODES, COMPILE_SCOPES, DepthDynamicNet
from ekd_ddnn.models.cifar_resnet import cifar_resnet
from ekd_ddnn.models.imagenet_resnet import imagenet_resnet
from ekd_ddnn.models.vgg import cifar_vgg


@dataclass(frozen=True)
class Arch:
    """A registered full-net: its family builder, block counts and default input size."""

    family: str
    blocks: tuple[int, ...]
    image_size: int
    num_classes: int
    kwargs: dict = field(default_factory=dict)


FAMILIES = {
    "cifar_resnet": cifar_resnet,
    "imagenet_resnet": imagenet_resnet,
    "cifar_vgg": cifar_vgg,
}

ARCHS: dict[str, Arch] = {
    **{
        f"cifar_resnet{6 * n + 2}": Arch("cifar_resnet", (n, n, n), 32, 10)
        for n in (3, 5, 7, 9, 18)
    },
    "resnet18": Arch("imagenet_resnet", (2, 2, 2, 2), 224, 1000, {"block": "basic"}),
    "resnet34": Arch("imagenet_resnet", (3, 4, 6, 3), 224, 1000, {"block": "basic"}),
    "resnet50": Arch("imagenet_resnet", (3, 4, 6, 3), 224, 1000, {"block": "bottleneck"}),
    "resnet101": Arch("imagenet_resnet", (3, 4, 23, 3), 224, 1000, {"block": "bottleneck"}),
    "resnet152": Arch("imagenet_resnet", (3, 8, 36, 3), 224, 1000, {"block": "bottleneck"}),
    "cifar_vgg11": Arch("cifar_vgg", (1, 1, 2, 2, 2), 32, 10),
    "cifar_vgg13": Arch("cifar_vgg", (2, 2, 2, 2, 2), 32, 10),
    "cifar_vgg16": Arch("cifar_vgg", (2, 2, 3, 3, 3), 32, 10),
    "cifar_vgg19": Arch("cifar_vgg", (2, 2, 4, 4, 4), 32, 10),
}


def list_archs() -> list[str]:
    """Names accepted by :func:`build_net`'s ``arch``."""
    return sorted(ARCHS)


def build_net(
    arch: str,
    *,
    blocks: Sequence[int] | None = None,
    subnets: Sequence[Sequence[int]] = (),
    num_classes: int | None = None,
    in_channels: int = 3,
    image_size: int | None = None,
    weights_path: str | None = None,
    bn_stats: str = "shared",
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str = "default",
    compile_scope: str = "blocks",
    min_blocks: int = 1,
) -> DepthDynamicNet:
    """Build the DDNN ``arch`` (optionally with other full ``blocks``) and its ``subnets``.

    ``num_classes`` and ``image_size`` (the input resolution MACs are reported at) default to
    the architecture's dataset (10 classes at 32x32 for CIFAR nets, 1000 at 224x224).
    ``weights_path`` (ImageNet family only) loads a local torchvision state-dict file.
    ``bn_stats``: ``shared`` (the paper) or ``private`` BatchNorm running statistics per
    depth (see :meth:`DepthDynamicNet.use_private_bn_stats`).
    ``channels_last``: keep weights and activations in NHWC memory layout (faster convolutions
    with mixed precision on tensor-core GPUs); results equal the default layout's up to
    float rounding.
    ``compile``: ``torch.compile`` in ``compile_mode``: with ``compile_scope="blocks"`` every
    block on its own, here (:meth:`DepthDynamicNet.compile_blocks`); with ``"step"`` the
    net stays eager and :class:`~ekd_ddnn.module.EKDModule` compiles its training step.
    ``min_blocks``: the fewest blocks a stage keeps in the depth lattice
    (:meth:`DepthDynamicNet.lattice`).
    """
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(list_archs())}")
    spec = ARCHS[arch]
    blocks = tuple(spec.blocks if blocks is None else blocks)
    if len(blocks) != len(spec.blocks) or any(int(n) < 1 for n in blocks):
        raise InvalidDepthError(
            f"{arch} needs {len(spec.blocks)} stages of at least 1 block each, got {list(blocks)}"
        )
    blocks = tuple(int(n) for n in blocks)
    if not 1 <= min_blocks <= min(blocks):
        raise InvalidDepthError(
            f"model.min_blocks must be between 1 and the smallest stage's count {min(blocks)}, "
            f"got {min_blocks}"
        )
    num_classes = spec.num_classes if num_classes is None else num_classes
    if bn_stats not in ("shared", "private"):
        raise UserError(f"model.bn_stats must be 'shared' or 'private', got {bn_stats!r}")
    if compile_mode not in COMPILE_MODES:
        raise UserError(
            f"model.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}"
        )
    if compile_scope not in COMPILE_SCOPES:
        raise UserError(
            f"model.compile_scope must be one of {', '.join(COMPILE_SCOPES)}, got {compile_scope!r}"
        )
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    config = {
        "arch": arch,
        "blocks": list(blocks),
        "subnets": [],  # filled in once the net has validated them
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "image_size": int(image_size or spec.image_size),
        "bn_stats": bn_stats,
        "channels_last": bool(channels_last),
        "compile": bool(compile),
        "compile_mode": compile_mode,
        "compile_scope": compile_scope,
        "min_blocks": int(min_blocks),
    }
    kwargs = dict(spec.kwargs)
    if weights_path:
        if spec.family != "imagenet_resnet":
            raise UserError(f"model.weights_path is for torchvision ResNets, not {arch}")
        kwargs["weights_path"] = weights_path
    net = FAMILIES[spec.family](
        blocks=blocks,
        subnets=subnets,
        num_classes=num_classes,
        in_channels=in_channels,
        config=config,
        **kwargs,
    )
    net.config["subnets"] = [list(depth) for depth in net.subnets]
    if bn_stats == "private":
        net.use_private_bn_stats()
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if compile and compile_scope == "blocks":
        net.compile_blocks(compile_mode)
    return net
