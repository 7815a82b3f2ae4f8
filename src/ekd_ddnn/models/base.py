"""The depth-dynamic network shared by every family: stem -> stages of blocks -> head.

A *depth* is a tuple of per-stage block counts, e.g. ``(3, 4, 6, 3)`` for ResNet-50. A depth
runs the stem, the first ``n_i`` blocks of every stage ``i`` and the head; all depths share
one set of weights (Zhao et al., "Embedded Knowledge Distillation in Depth-Level Dynamic
Neural Network", arXiv 2103.00793, Sec. 3.1).
"""

from __future__ import annotations

import copy
import decimal
import itertools
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ekd_ddnn.errors import InvalidDepthError, UserError
from ekd_ddnn.models.bn_stats import BN_STATS, DepthBNStats, is_private_key, stat_key, strip_private

Depth = tuple[int, ...]
# torch's refusals of an input too small for a layer (pooling or convolution output below
# 1x1, BatchNorm in training with one value per channel)
_TOO_SMALL = (
    "Output size is too small",
    "Kernel size can't be greater than actual input size",
    "Expected more than 1 value per channel when training",
)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
# what model.compile compiles: every block on its own (any set of depths reuses them) or the
# whole training step of one fixed set of depths, network and loss together (EKDModule)
COMPILE_SCOPES = ("blocks", "step")
NetOutput = tuple[Tensor, list[Tensor]]  # logits (B, classes), per-stage features [(B, C, H, W)]


def _block_count(n: Any) -> int:
    """``n`` as a block count: one integer, or one real number of an integral value, of any
    kind (Python, NumPy, a 0-d tensor or array, ``Fraction``, ``Decimal``); never a bool, a
    string, an array with dimensions, or a rounded value (2.5, inf, nan): TypeError or
    ValueError."""
    if getattr(n, "ndim", None) == 0 and callable(getattr(n, "item", None)):
        try:
            n = n.item()  # NumPy scalars, 0-d arrays and tensors as the Python number
        except RuntimeError as exc:  # a tensor without data (meta)
            raise TypeError("a tensor without a value") from exc
    if isinstance(n, bool) or getattr(n, "ndim", 0) != 0:
        raise TypeError("a block count is one number, not a bool or an array")
    if isinstance(n, numbers.Real | decimal.Decimal) and not isinstance(n, numbers.Integral):
        try:
            count = int(n)
        except (OverflowError, ValueError):  # inf, nan
            raise ValueError("not a finite number") from None
        if count != n:
            raise ValueError("not an integral value")
        return count
    return operator.index(n)  # an integer of any type; a string or None: TypeError


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
        self._bn_stats: DepthBNStats | None = None  # private statistics, if any
        # loaded statistics (also through a parent module's load) make cached partitions stale
        self.register_load_state_dict_post_hook(_forget_partitions)
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

    # ----------------------------------------------------------------- BatchNorm statistics
    @property
    def private_bn_stats(self) -> bool:
        """Whether each depth keeps BatchNorm running statistics of its own."""
        return self._bn_stats is not None

    def use_private_bn_stats(self) -> None:
        """Give every depth its own BatchNorm running statistics (affine weights stay shared),
        each a copy of the full-net's: sub-net ``i``'s are buffers ``running_mean_d<i>`` etc.
        next to the full-net's ordinary ``running_mean`` (why: :mod:`.bn_stats`)."""
        self.config["bn_stats"] = "private"
        self._bn_stats = DepthBNStats(self._units(), [0] * len(self.depths))

    @torch.no_grad()
    def recalibrate_bn_stats(
        self, batches: Sequence[Tensor], depths: Sequence[Sequence[int]] | None = None
    ) -> None:
        """Re-estimate the BatchNorm running statistics of ``depths`` (default: every depth
        of :attr:`depths`) from ``batches``.

        Each depth's statistics are reset and set to the exact average over the batches of
        that depth in train mode (as Once-for-All does for every sub-net it deploys); shared
        statistics become private ones first. The depths run together through the prefix
        tree, so a block shared by several depths runs once per batch: its statistics depend
        only on its input, the same for all of them. Weights are not touched.
        """
        if not self.private_bn_stats:
            self.use_private_bn_stats()
        chosen = self.depths if depths is None else [self.check_depth(d) for d in depths]
        ids = [self.depths.index(d) for d in chosen]
        training = self.training
        try:
            self.train()
            with self._bn_stats.reestimating(ids):
                for x in batches:
                    self.forward_depths(x, chosen)
        finally:
            self.train(training)

    def _units(self) -> list[nn.Module]:
        """The modules the prefix tree runs whole: the stem, every block, the head."""
        return [self.stem, *(block for stage in self.stages for block in stage), self.head]

    def compile_blocks(self, mode: str = "default", **options: Any) -> None:
        """``torch.compile`` the stem, every block and the head, each on its own (regional
        compilation, as the PyTorch recipe does for transformer layers).

        A set of depths only chooses, in Python, which blocks run, so a new set of depths
        (lattice sampling draws one every step) runs the graphs already made: nothing
        recompiles. Blocks of equal configuration share one graph per train/eval, grad mode
        and batch size (training drops its incomplete last batch: one size). ``mode``:
        ``default``, ``max-autotune-no-cudagraphs`` or ``reduce-overhead`` (CUDA graphs per
        block: only where the set of depths is fixed). ``options`` go to ``torch.compile``
        (e.g. a ``backend``, which then replaces ``mode``). State-dict keys stay unchanged;
        deep copies run eager.

        The graphs are static (``dynamic=False``): the regions share ``nn.Module``'s call
        code, so Dynamo's automatic dynamic shapes would take the second block
        configuration's other channel count and map size for a changing input and make
        every dimension symbolic. Those graphs then stamp their outputs dynamic, the loss's
        graph turns symbolic too, and inductor's code generation for them ran for minutes
        (more than 20 on this CPU) in sympy's simplification.
        """
        regions = self._units()
        # every region shares nn.Module's call code, whose compiled entries Dynamo caps at
        # recompile_limit (8 by default): allow each region its train/eval x batch-size
        # graphs. Raised for the process: a config patch around each region's call would
        # cost ~4 us of host time per call, 0.1-0.2 ms per step of ResNet-56's depths.
        limit = max(torch._dynamo.config.recompile_limit, 8 * len(regions))
        torch._dynamo.config.recompile_limit = limit
        for region in regions:
            mode_option = {"mode": mode} if "backend" not in options else {}
            region.compile(dynamic=False, **mode_option, **options)

    # ----------------------------------------------------------------- depths and names
    @property
    def depths(self) -> list[Depth]:
        """Every depth this net trains and evaluates, full-net first."""
        return [self.full_depth, *self.subnets]

    @property
    def smallest_depth(self) -> Depth:
        """The shallowest depth of the lattice: ``model.min_blocks`` blocks in every stage."""
        return tuple(min(self.config.get("min_blocks", 1), n) for n in self.full_depth)

    def lattice(self) -> list[Depth]:
        """Every depth from :attr:`smallest_depth` to the full depth, full-net first: the
        per-stage block counts ``min_blocks..N_i`` of every stage (27 for ResNet-20)."""
        ranges = [
            range(lo, n + 1) for lo, n in zip(self.smallest_depth, self.full_depth, strict=True)
        ]
        return sorted(itertools.product(*ranges), reverse=True)

    def with_depths(self, depths: Sequence[Sequence[int]]) -> DepthDynamicNet:
        """A copy of this net that trains and evaluates the full-net and ``depths``.

        With private BatchNorm statistics each depth keeps its own where this net has them;
        a depth new to the net starts from the full-net's (re-estimate them:
        :meth:`recalibrate_bn_stats`). Shared statistics stay shared.
        """
        new = []
        for depth in depths:
            depth = self.check_depth(depth)
            if depth != self.full_depth and depth not in new:
                new.append(depth)
        clone = copy.deepcopy(self)
        clone.subnets = new
        clone.config["subnets"] = [list(d) for d in new]
        if self._bn_stats is not None:
            sources = [self.depths.index(d) if d in self.depths else 0 for d in clone.depths]
            clone._bn_stats = DepthBNStats(clone._units(), sources)
        return clone

    def shared_stats_copy(self) -> DepthDynamicNet:
        """A copy with one set of BatchNorm statistics (the full-net's): any depth of it can
        be extracted, e.g. to count its params and MACs."""
        clone = copy.deepcopy(self)
        strip_private(clone)
        clone._bn_stats = None
        clone.config["bn_stats"] = "shared"
        return clone

    def names_of(self, depths: Sequence[Sequence[int]]) -> list[str]:
        """Names of ``depths``, unique among them: blocks are appended where two share one
        (``resnet-3-2-3`` and ``resnet-2-3-3`` of a lattice stay apart)."""
        base = [self._namer(tuple(d)) for d in depths]
        return [
            f"{name}-{'-'.join(map(str, d))}" if base.count(name) > 1 else name
            for name, d in zip(base, depths, strict=True)
        ]

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
            known = zip(self.names, self.depths, strict=True)
            raise InvalidDepthError(
                f"this net has no depth named {name_or_blocks!r}; its depths are "
                + ", ".join(f"{name} {list(depth)}" for name, depth in known)
            )
        return self.check_depth(name_or_blocks)

    def check_depth(self, depth: Sequence[int]) -> Depth:
        """Validate ``depth`` against the full-net; return it as a tuple of ints."""
        valid = ", ".join(f"1..{n}" for n in self.full_depth)
        try:
            depth = tuple(_block_count(n) for n in depth)
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

    def check_input(self, batch_size: int) -> None:
        """Refuse, in one line, training batches the net cannot take: an image size
        (``config["image_size"]``) its stages shrink to nothing, or a batch whose smallest
        maps give BatchNorm one value per channel. A training forward of the full-net (every
        depth has its stages' sizes) on the meta device: shapes only, no arithmetic, the net
        and its statistics untouched. Any other failure there skips the check."""
        size, channels = self.config["image_size"], self.config["in_channels"]
        tensors = itertools.chain(self.named_parameters(), self.named_buffers())
        state = {name: t.to("meta") for name, t in tensors}
        x = torch.empty(batch_size, channels, size, size, device="meta")
        training = self.training
        try:
            with torch.compiler.set_stance("force_eager"):
                self.train()
                torch.func.functional_call(self, state, (x,), strict=True)
        except UserError:
            raise
        except (RuntimeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0]
            if not any(s in reason for s in _TOO_SMALL):
                return  # not a size (an op with no meta kernel, ...): the real forward decides
            raise UserError(
                f"{self.name_of(self.full_depth)} cannot train on batches of {batch_size} "
                f"images of {size}x{size}: {reason}; use larger images or batches "
                "(data.image_size, data.batch_size)"
            ) from None
        finally:
            self.train(training)

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
        stats = None  # the set of BatchNorm statistics each depth runs with (if private)
        if self._bn_stats is not None:
            ours = self.depths
            missing = [list(d) for d in depths if d not in ours]
            if missing and not self.training:
                raise InvalidDepthError(
                    f"depth {missing[0]} has no BatchNorm statistics of its own in this net "
                    f"(private BN statistics); run one of {[list(d) for d in ours]}"
                )
            stats = self._bn_stats.sets_for([ours.index(d) if d in ours else None for d in depths])
        features: list[list[Tensor]] = [[] for _ in depths]
        logits: list[Tensor | None] = [None] * len(depths)
        if self.config.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        group = list(range(len(depths)))
        for part in self._split(self.stem, group, stats):
            y = self._run_module(self.stem, x, part, stats)
            self._run_group(y, part, 0, 0, depths, stats, features, logits)
        return [(lg, f) for lg, f in zip(logits, features, strict=True)]  # type: ignore[misc]

    def _run_module(
        self, module: nn.Module, x: Tensor, group: list[int], stats: list[int] | None
    ) -> Tensor:
        """Run ``module`` once for the depths in ``group`` (which all hold input ``x``), with
        their own BatchNorm statistics where they are private (:meth:`DepthBNStats.run`)."""
        if stats is None:
            return module(x)
        return self._bn_stats.run(module, x, [stats[i] for i in group])

    def _split(
        self, module: nn.Module, group: list[int], stats: list[int] | None
    ) -> list[list[int]]:
        """``group`` split into the depths that hold equal BatchNorm statistics in ``module``
        (evaluation with private statistics): a block runs once per distinct set, so every
        depth is evaluated with its own statistics even where they differ at a shared block
        (lattice training updates a named depth's only when it is drawn; re-estimated and
        trained depths meet in one evaluation). Cached until the statistics can change."""
        if stats is None or self.training or len(group) < 2:
            return [group]
        parts = self._bn_stats.partition(module, [stats[i] for i in group])
        return [[group[p] for p in part] for part in parts]

    def train(self, mode: bool = True) -> DepthDynamicNet:
        if self._bn_stats is not None:
            # the partitions are read in eval mode only, and train mode changes statistics:
            # forgotten at every switch, so no training step pays for it
            self._bn_stats.invalidate()
        return super().train(mode)

    def _run_group(
        self,
        x: Tensor,
        group: list[int],
        stage: int,
        block: int,
        depths: list[Depth],
        stats: list[int] | None,
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
                self._run_group(x, leaving, stage + 1, 0, depths, stats, features, logits)
                group = staying
            module = self.stages[stage][block]
            parts = self._split(module, group, stats)
            if len(parts) > 1:  # the depths disagree on this block's statistics
                for part in parts:
                    self._run_group(x, part, stage, block, depths, stats, features, logits)
                return
            x = self._run_module(module, x, group, stats)
            block += 1
        for part in self._split(self.head, group, stats):
            out = self._run_module(self.head, x, part, stats)
            for i in part:
                logits[i] = out

    # ----------------------------------------------------------------- standalone nets
    def subnet_state_dict(self, depth: Sequence[int]) -> dict[str, Tensor]:
        """This net's state dict restricted to the blocks ``depth`` keeps (same key names)."""
        depth = self.check_depth(depth)
        stats_id = self.depths.index(depth) if self.private_bn_stats else 0
        state = self.state_dict()
        kept = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "stages" and int(parts[2]) >= depth[int(parts[1])]:
                continue
            if is_private_key(key):
                continue
            if stats_id and parts[-1] in BN_STATS:
                value = state[stat_key(key, stats_id)]
            kept[key] = value
        return kept

    def extract(self, depth: Sequence[int]) -> nn.Module:
        """A standalone network holding only the blocks of ``depth``, with this net's weights.

        Families may return their plain network type (a torchvision ``ResNet`` for the
        ImageNet family); the default is a :class:`DepthDynamicNet` of that depth alone.
        """
        depth = self.check_depth(depth)
        if self.private_bn_stats and depth not in self.depths:
            raise InvalidDepthError(
                f"depth {list(depth)} has no BatchNorm statistics of its own in this net; "
                f"extract one of {[list(d) for d in self.depths]}"
            )
        if self._extractor is not None:  # built afresh: on the DDNN's device, dtype, layout
            param = next(self.parameters())
            standalone = self._extractor(self, depth).to(device=param.device, dtype=param.dtype)
            if self.config.get("channels_last"):
                standalone = standalone.to(memory_format=torch.channels_last)
            return standalone
        net = DepthDynamicNet(
            copy.deepcopy(self.stem),
            [copy.deepcopy(stage[:n]) for stage, n in zip(self.stages, depth, strict=True)],
            copy.deepcopy(self.head),
            namer=self._namer,
            config={**self.config, "blocks": list(depth), "subnets": [], "bn_stats": "shared"},
        )
        strip_private(net)
        net.load_state_dict(self.subnet_state_dict(depth))
        return net


def _forget_partitions(net: DepthDynamicNet, incompatible_keys: Any) -> None:
    """Load-state-dict post-hook: the statistics were replaced, their partitions are stale."""
    if net._bn_stats is not None:
        net._bn_stats.invalidate()


def kaiming_init_convs(module: nn.Module) -> None:
    """He initialisation of every convolution (fan-out, ReLU), as torchvision's ResNet does."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


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
