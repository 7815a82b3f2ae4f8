"""Private per-depth BatchNorm statistics (models/bn_stats.py): no module walk per call,
copies of a net (deep copies, ``with_depths``) update their own statistics only, and a net
is freed as soon as it is dropped."""

from __future__ import annotations

import copy
import gc
import weakref

import torch
from torch import nn

from ekd_ddnn.models import build_net

SUBNETS = [[2, 2, 2], [1, 1, 1]]
SAMPLED = (1, 2, 1)  # a lattice depth beyond the named ones: scratch statistics in training


def _net() -> nn.Module:
    torch.manual_seed(0)
    return build_net("cifar_resnet20", subnets=SUBNETS, image_size=8, bn_stats="private")


def _buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.named_buffers()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=0, atol=0, msg=key)


def test_forward_walks_no_modules(monkeypatch):
    """Training steps (a sampled depth's scratch statistics made on the first) and evaluation
    with private statistics never call ``nn.Module.named_modules`` (behind ``modules()``):
    the BatchNorm layers of every module are found once, when the statistics are made."""
    net = _net()
    x = torch.randn(4, 3, 8, 8)
    calls = []
    walk = nn.Module.named_modules

    def counted(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return walk(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counted)
    for mode, depths in (("train", [*net.depths, SAMPLED]), ("eval", net.depths)):
        net.train(mode == "train")
        for _ in range(3):
            net.forward_depths(x, depths)
        assert calls == [], mode
    assert hasattr(net.stem[1], f"running_mean_d{len(net.depths)}")  # the scratch set


def test_deep_copy_and_with_depths_update_their_own_statistics():
    """A training step of a deep copy (or a ``with_depths`` clone) of a net that has run
    before moves the copy's statistics, as the same step moves the original's later, and
    leaves the original's untouched."""
    net = _net().train()
    net.forward_depths(torch.randn(4, 3, 8, 8), [*net.depths, SAMPLED])  # caches filled
    before = _buffers(net)
    x = torch.randn(4, 3, 8, 8) * 2 + 1

    clone = copy.deepcopy(net)
    clone.forward_depths(x, [*clone.depths, SAMPLED])
    _assert_equal(_buffers(net), before)
    net.forward_depths(x, [*net.depths, SAMPLED])
    _assert_equal(_buffers(clone), _buffers(net))
    assert not torch.equal(
        net.stages[1][0].bn1.running_mean_d2, before["stages.1.0.bn1.running_mean_d2"]
    )

    view = net.with_depths([[2, 2, 2], SAMPLED])
    before = _buffers(net)
    view.forward_depths(x, view.depths)
    _assert_equal(_buffers(net), before)
    bn = view.stages[1][0].bn1  # [1,2,1] starts from the full-net's statistics, then moves
    assert not torch.equal(bn.running_mean_d2, before["stages.1.0.bn1.running_mean"])
    assert "stages.1.0.bn1.running_mean_d2" in view.state_dict()
    assert "stages.1.0.bn1.running_mean_d3" not in dict(view.named_buffers())  # scratch gone


def test_a_dropped_net_is_freed_at_once():
    """The statistics' caches make no reference cycle with the net: a discarded view (front.py
    makes many) frees its tensors when dropped, without waiting for the garbage collector."""
    net = _net()
    gc.disable()
    try:
        view = net.with_depths([SAMPLED])
        view.train().forward_depths(torch.randn(2, 3, 8, 8), [*view.depths, (1, 1, 1)])
        view.eval().forward_depths(torch.randn(2, 3, 8, 8), view.depths)
        dropped = weakref.ref(view)
        del view
        assert dropped() is None
    finally:
        gc.enable()


def test_statistics_loaded_through_a_parent_are_used_and_kept():
    """Evaluate (caching which depths hold equal statistics), then load other statistics
    through a parent module (as Lightning loads an EKDModule): the next evaluation uses the
    loaded statistics of every depth, and evaluating leaves every buffer as loaded."""
    x = torch.randn(4, 3, 8, 8)
    trained = _net().train()
    for _ in range(2):  # the depths' statistics now differ
        trained.forward_depths(torch.randn(4, 3, 8, 8), [(1, 2, 2), *SUBNETS])
        trained.forward_depths(torch.randn(4, 3, 8, 8), trained.depths)
    state = {f"net.{k}": v for k, v in trained.state_dict().items()}
    net = _net().eval()
    with torch.no_grad():
        net.forward_depths(x, net.depths)  # every set equal: one partition cached
    nn.ModuleDict({"net": net}).load_state_dict(state)
    loaded = _buffers(net)
    with torch.no_grad():
        got = [lg for lg, _ in net.forward_depths(x, net.depths)]
        want = [lg for lg, _ in trained.eval().forward_depths(x, trained.depths)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _assert_equal(_buffers(net), loaded)
