"""Per-depth BatchNorm running statistics of a depth-dynamic network.

The paper shares the statistics; but a BatchNorm layer after the point where two depths
diverge sees other inputs per depth, so its shared running statistics mix those
distributions and evaluation suffers (slimmable networks, Once-for-All keep them per
sub-net). Each layer then holds numbered *sets* of statistics: set 0 is its ordinary
``running_mean`` etc. (the full-net's), set ``i`` the buffers ``running_mean_d<i>`` etc.;
the affine weights stay shared.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
_PRIVATE_KEY = re.compile(r"_d\d+$")


def stat_key(key: str, set_id: int) -> str:
    """The buffer (or state-dict key) holding set ``set_id``'s copy of BatchNorm buffer ``key``."""
    return key if set_id == 0 else f"{key}_d{set_id}"


def is_private_key(key: str) -> bool:
    """Whether buffer or state-dict key ``key`` is a private copy (``*_d<i>``)."""
    return _PRIVATE_KEY.search(key) is not None


def strip_private(module: nn.Module) -> None:
    """Delete every private copy under ``module``: set 0 (the full-net's) is all that stays."""
    for m in module.modules():
        for key in [k for k in m._buffers if is_private_key(k)]:
            del m._buffers[key]


class DepthBNStats:
    """The sets of BatchNorm statistics of one network, one per depth it trains and evaluates.

    Sets ``0..count-1`` belong to the net's depths and are saved in its state dict; later ids
    are scratch sets (see :meth:`sets_for`). The BatchNorm layers of each module the net runs
    (its stem, every block, its head) are found once, here, so a call walks no module tree.
    A deep copy of the net copies this object with it, the cached layers mapped onto the
    copy's own (``copy.deepcopy`` gives each module one copy, wherever it meets it).
    """

    def __init__(self, modules: Sequence[nn.Module], sources: Sequence[int]) -> None:
        """Give ``len(sources)`` depths their own statistics in the BatchNorm layers of
        ``modules`` (those the net runs: together, all of it): set ``i`` starts as a copy of
        the set ``sources[i]`` they hold now (set 0 stays itself); other private sets go."""
        self.count = len(sources)
        self._scratch = 0  # scratch sets registered so far
        self._partitions: dict[tuple, list[list[int]]] = {}
        self._layers: dict[nn.Module, list[_BatchNorm]] = {
            module: [
                m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            ]
            for module in modules
        }
        for bn in self._all_layers():
            held = dict(bn._buffers)
            strip_private(bn)
            for i, source in enumerate(sources[1:], start=1):
                for key in BN_STATS:
                    bn.register_buffer(stat_key(key, i), held[stat_key(key, source)].clone())

    def _all_layers(self) -> list[_BatchNorm]:
        """Every BatchNorm layer of the net."""
        return [bn for layers in self._layers.values() for bn in layers]

    def invalidate(self) -> None:
        """Forget the cached partitions (:meth:`partition`): the statistics may have changed."""
        self._partitions.clear()

    def sets_for(self, ids: Sequence[int | None]) -> list[int]:
        """The set each of a call's depths runs with: ``ids[i]`` for a depth of the net, and for
        each ``None`` (a lattice depth beyond the net's, sampled in training) a scratch set of
        its own: updated, never saved, never evaluated. One per depth: a buffer updated in
        place by two runs of a layer in one step would break the backward pass, which saves it.
        """
        needed = sum(i is None for i in ids)
        for new in range(self.count + self._scratch, self.count + needed):
            for bn in self._all_layers():
                for key in BN_STATS:
                    bn.register_buffer(
                        stat_key(key, new), bn._buffers[key].clone(), persistent=False
                    )
        self._scratch = max(self._scratch, needed)
        scratch = iter(range(self.count, self.count + needed))
        return [next(scratch) if i is None else i for i in ids]

    def run(self, module: nn.Module, x: Tensor, ids: Sequence[int]) -> Tensor:
        """Run ``module`` once on ``x`` for the depths of sets ``ids`` (all holding input ``x``).

        Its BatchNorm layers use the first set's statistics, and in train mode the updated
        ones are copied to the others: the depths of a group have seen the same inputs, so
        their statistics are equal, as in separate runs. The net's sets lead: scratch
        statistics never spread.
        """
        ids = sorted(ids, key=lambda i: i >= self.count)
        layers = self._layers[module]
        saved = [{k: bn._buffers[k] for k in BN_STATS} for bn in layers]
        for bn in layers:
            for key in BN_STATS:
                bn._buffers[key] = bn._buffers[stat_key(key, ids[0])]
        try:
            out = module(x)
            if module.training:  # eval leaves the statistics as they are: nothing to spread
                for bn in layers:
                    for other in ids[1:]:
                        for key in BN_STATS:
                            bn._buffers[stat_key(key, other)].copy_(bn._buffers[key])
        finally:
            for bn, buffers in zip(layers, saved, strict=True):
                bn._buffers.update(buffers)
        return out

    def partition(self, module: nn.Module, ids: Sequence[int]) -> list[list[int]]:
        """Positions in ``ids`` grouped by equal statistics (running mean and variance) in
        ``module``, first appearance first. Cached until :meth:`invalidate`."""
        key = (module, tuple(ids))
        if key not in self._partitions:
            layers = self._layers[module]
            classes: list[list[int]] = []
            for pos, i in enumerate(ids):
                for cls in classes:
                    j = ids[cls[0]]
                    if all(
                        torch.equal(bn._buffers[stat_key(k, i)], bn._buffers[stat_key(k, j)])
                        for bn in layers
                        for k in ("running_mean", "running_var")
                    ):
                        cls.append(pos)
                        break
                else:
                    classes.append([pos])
            self._partitions[key] = classes
        return self._partitions[key]

    @contextmanager
    def reestimating(self, ids: Sequence[int]) -> Iterator[None]:
        """Within: sets ``ids`` restart empty and each layer's momentum is ``None``, so that
        train-mode runs leave them the exact average over the batches; momenta come back."""
        layers = self._all_layers()
        momenta = [bn.momentum for bn in layers]
        try:
            for bn in layers:
                bn.momentum = None  # cumulative average over the batches seen
                for i in ids:
                    bn._buffers[stat_key("running_mean", i)].zero_()
                    bn._buffers[stat_key("running_var", i)].fill_(1)
                    bn._buffers[stat_key("num_batches_tracked", i)].zero_()
            yield
        finally:
            for bn, momentum in zip(layers, momenta, strict=True):
                bn.momentum = momentum
