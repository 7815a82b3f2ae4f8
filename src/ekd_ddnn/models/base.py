"""The depth-dynamic network shared by every family: stem -> stages of blocks -> head.

A *depth* is a tuple of per-stage block counts, e.g. ``(3, 4, 6, 3)`` for ResNet-50. A depth
runs the stem, the first ``n_i`` blocks of every stage ``i`` and the head; all depths share
one set of weights (Zhao et al., "Embedded Knowledge Distillation in Depth-Level Dynamic
Neural Network", arXiv 2103.00793, Sec. 3.1).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ekd_ddnn.errors import InvalidDepthError

Depth = tuple[int, ...]
NetOutput = tuple[Tensor, list[Tensor]]  # logits (B, classes), per-stage features [(B, C, H, W)]


class DepthDynamicNet(nn.Module):
    """A network whose depth is chosen per call; every depth shares the full-net's weights.

    Args:
        stem: the layers before the first stage (always run).
        stages: one ``nn.Sequential``/``nn.ModuleList`` of blocks per stage; the full depth.
        head: pooling + classifier (always run) mapping the last stage's output to logits.
        subnets: the sub-net depths trained and evaluated beside the full-net.
        namer: maps a depth to its conventional name (``resnet20``, ``vgg11``, ...).
        config: the builder arguments that rebuild this net (stored in checkpoints).
        extractor: builds a family's own standalone network for a depth (see :meth:`extract`).
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        head: nn.Module,
        *,
        subnets: Sequence[Sequence[int]] = (),
        namer: Callable[[Depth], str],
        config: dict | None = None,
        extractor: Callable[[DepthDynamicNet, Depth], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.full_depth: Depth = tuple(len(stage) for stage in self.stages)
        self._namer = namer
        self._extractor = extractor
        self.config = dict(config or {})
        self.subnets: list[Depth] = []
        for depth in subnets:
            depth = self.check_depth(depth)
            if depth == self.full_depth:
                raise InvalidDepthError(
                    f"sub-net {list(depth)} is the full-net itself; list only shallower depths"
                )
            if depth in self.subnets:
                raise InvalidDepthError(f"sub-net {list(depth)} is listed twice")
            self.subnets.append(depth)

    # ----------------------------------------------------------------- depths and names
    @property
    def depths(self) -> list[Depth]:
        """Every depth this net trains and evaluates, full-net first."""
        return [self.full_depth, *self.subnets]

    @property
    def names(self) -> list[str]:
        """The name of each depth in :attr:`depths`, unique within this net."""
        return [self.name_of(depth) for depth in self.depths]

    def name_of(self, depth: Sequence[int]) -> str:
        """Conventional name of ``depth``; blocks are appended where two depths share a name."""
        depth = tuple(depth)
        name = self._namer(depth)
        if any(self._namer(d) == name for d in self.depths if d != depth):
            name = f"{name}-{'-'.join(map(str, depth))}"
        return name

    def depth_of(self, name_or_blocks: str | Sequence[int]) -> Depth:
        """The depth named ``name_or_blocks`` (a name of :attr:`names`, or block counts)."""
        if isinstance(name_or_blocks, str):
            for depth, name in zip(self.depths, self.names, strict=True):
                if name == name_or_blocks:
                    return depth
            raise InvalidDepthError(
                f"this net has no depth named {name_or_blocks!r}; its depths are "
                f"{', '.join(f'{n} {list(d)}' for n, d in zip(self.names, self.depths, strict=True))}"
            )
        return self.check_depth(name_or_blocks)

    def check_depth(self, depth: Sequence[int]) -> Depth:
        """Validate ``depth`` against the full-net; return it as a tuple of ints."""
        valid = ", ".join(f"1..{n}" for n in self.full_depth)
        try:
            depth = tuple(int(n) for n in depth)
        except (TypeError, ValueError):
            raise InvalidDepthError(
                f"depth {depth!r} is not a list of block counts; give one int per stage "
                f"in [{valid}]"
            ) from None
        if len(depth) != len(self.full_depth):
            raise InvalidDepthError(
                f"depth {list(depth)} has {len(depth)} stages but the full-net "
                f"{list(self.full_depth)} has {len(self.full_depth)}; give one count per stage "
                f"in [{valid}]"
            )
        for i, (n, full) in enumerate(zip(depth, self.full_depth, strict=True)):
            if not 1 <= n <= full:
                raise InvalidDepthError(
                    f"depth {list(depth)}: stage {i + 1} has {n} blocks; each stage keeps "
                    f"between 1 and the full-net's count [{valid}]"
                )
        return depth

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor, blocks: Sequence[int] | None = None) -> NetOutput:
        """Run one depth (default: the full-net); return logits and per-stage features."""
        depth = self.full_depth if blocks is None else self.check_depth(blocks)
        return self.forward_depths(x, [depth])[0]

    def forward_depths(self, x: Tensor, depths: Sequence[Sequence[int]]) -> list[NetOutput]:
        """Run several depths on one batch, computing every shared block once.

        The depths form a prefix tree over their block sequences (stem, stage-1 blocks
        1..n1, stage-2 blocks 1..n2, ...): two depths share every block up to the first one
        that either of them skips. Each node of that tree runs once, so outputs and gradients
        equal running each depth alone. (In train mode a shared block's BatchNorm running
        statistics are updated once per call, not once per depth.)
        """
        depths = [self.check_depth(d) for d in depths]
        features: list[list[Tensor]] = [[] for _ in depths]
        logits: list[Tensor | None] = [None] * len(depths)
        self._run_group(self.stem(x), list(range(len(depths))), 0, 0, depths, features, logits)
        return [(lg, f) for lg, f in zip(logits, features, strict=True)]  # type: ignore[misc]

    def _run_group(
        self,
        x: Tensor,
        group: list[int],
        stage: int,
        block: int,
        depths: list[Depth],
        features: list[list[Tensor]],
        logits: list[Tensor | None],
    ) -> None:
        """Advance the depths in ``group`` (all holding ``x`` at (stage, block)) to the head."""
        while stage < len(self.stages):
            leaving = [i for i in group if depths[i][stage] == block]
            if leaving:
                for i in leaving:
                    features[i].append(x)
                staying = [i for i in group if i not in leaving]
                if not staying:  # the whole group moves on to the next stage together
                    stage, block = stage + 1, 0
                    continue
                self._run_group(x, leaving, stage + 1, 0, depths, features, logits)
                group = staying
            x = self.stages[stage][block](x)
            block += 1
        out = self.head(x)
        for i in group:
            logits[i] = out

    # ----------------------------------------------------------------- standalone nets
    def subnet_state_dict(self, depth: Sequence[int]) -> dict[str, Tensor]:
        """This net's state dict restricted to the blocks ``depth`` keeps (same key names)."""
        depth = self.check_depth(depth)
        kept = {}
        for key, value in self.state_dict().items():
            parts = key.split(".")
            if parts[0] == "stages" and int(parts[2]) >= depth[int(parts[1])]:
                continue
            kept[key] = value
        return kept

    def extract(self, depth: Sequence[int]) -> nn.Module:
        """A standalone network holding only the blocks of ``depth``, with this net's weights.

        Families may return their plain network type (a torchvision ``ResNet`` for the
        ImageNet family); the default is a :class:`DepthDynamicNet` of that depth alone.
        """
        depth = self.check_depth(depth)
        if self._extractor is not None:
            return self._extractor(self, depth)
        return DepthDynamicNet(
            copy.deepcopy(self.stem),
            [copy.deepcopy(stage[:n]) for stage, n in zip(self.stages, depth, strict=True)],
            copy.deepcopy(self.head),
            namer=self._namer,
            config={**self.config, "blocks": list(depth), "subnets": []},
        )


def count_params(module: nn.Module) -> int:
    """Number of parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one input of ``input_shape`` (C, H, W).

    Uses ``torch.utils.flop_counter`` (convolutions and matrix products; 1 MAC = 2 FLOPs),
    the counter behind the "torch's counter" figures in DESIGN section 2.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    param = next(module.parameters())
    x = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
    with FlopCounterMode(display=False) as counter:
        module(x)
    module.train(was_training)
    return counter.get_total_flops() // 2
