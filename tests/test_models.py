"""Depth-dynamic networks: sizes against the paper and torchvision, extraction, the shared
prefix tree against separate runs, names, and invalid depths."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from ekd_ddnn.errors import InvalidDepthError, UserError
from ekd_ddnn.models import ARCHS, build_net, count_macs, count_params, list_archs

# DESIGN section 2 / the paper's Table 2: ResNet-50 sub-nets as standalone nets (params, M).
TABLE2 = {
    (2, 2, 2, 2): ("resnet26", 16.0),
    (2, 3, 3, 2): ("resnet32", 17.4),
    (3, 3, 3, 3): ("resnet38", 21.9),
    (3, 4, 4, 2): ("resnet41", 18.9),
    (3, 4, 4, 3): ("resnet44", 23.3),
    (3, 4, 6, 3): ("resnet50", 25.6),
}

# (arch, sub-nets, input size) for the family-parametrised tests; small inputs keep them fast.
FAMILIES = [
    ("cifar_resnet20", [[2, 2, 2], [1, 3, 1], [3, 1, 2]], 16),
    ("cifar_vgg16", [[1, 1, 2, 2, 2], [2, 1, 3, 1, 3]], 32),
    ("resnet34", [[2, 2, 2, 2], [3, 4, 2, 1]], 64),
    ("resnet50", [[3, 4, 4, 3], [3, 3, 3, 3]], 64),
]


def test_table2_params_match_paper():
    """Standalone params of every Table-2 depth match the paper to 0.1M."""
    net = build_net("resnet50", subnets=[d for d in TABLE2 if d != (3, 4, 6, 3)])
    for depth, (name, params_m) in TABLE2.items():
        assert net.name_of(depth) == name
        assert abs(count_params(net.extract(depth)) / 1e6 - params_m) < 0.05 + 1e-9


@pytest.mark.parametrize(
    ("arch", "builder", "depth"),
    [
        ("resnet34", torchvision.models.resnet18, (2, 2, 2, 2)),
        ("resnet34", torchvision.models.resnet34, (3, 4, 6, 3)),
        ("resnet50", torchvision.models.resnet50, (3, 4, 6, 3)),
    ],
)
def test_params_and_macs_equal_torchvision(arch, builder, depth):
    """Where torchvision has the net, params are equal exactly and MACs too."""
    net = build_net(arch, subnets=[depth] if depth != (3, 4, 6, 3) else [])
    ours = net.extract(depth)
    ref = builder()
    assert count_params(ours) == count_params(ref)
    assert count_macs(ours, (3, 224, 224)) == count_macs(ref, (3, 224, 224))


def test_resnet50_macs_torch_counter():
    """torch's flop counter gives 4.09 GMACs for ResNet-50 (DESIGN: paper 3.8, torch 4.1)."""
    macs = count_macs(torchvision.models.resnet50(), (3, 224, 224))
    assert round(macs / 1e9, 1) == 4.1


def test_cifar_resnet_params_by_hand():
    """ResNet-20 with 1x1 projection shortcuts: conv/BN/fc params counted by hand."""
    conv = lambda i, o, k=3: i * o * k * k  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    stem = conv(3, 16) + bn(16)
    block = lambda c: 2 * (conv(c, c) + bn(c))  # noqa: E731
    down = lambda i, o: conv(i, o) + bn(o) + conv(o, o) + bn(o) + conv(i, o, 1) + bn(o)  # noqa: E731
    total = stem + 3 * block(16) + down(16, 32) + 2 * block(32) + down(32, 64) + 2 * block(64)
    total += 64 * 10 + 10
    assert count_params(build_net("cifar_resnet20")) == total


def test_resnet18_extracted_from_resnet34_loads_into_torchvision():
    """[2,2,2,2] of a ResNet-34 DDNN loads strictly into resnet18() and gives equal logits."""
    torch.manual_seed(0)
    net = build_net("resnet34", subnets=[[2, 2, 2, 2]], num_classes=7).eval()
    ref = torchvision.models.resnet18(num_classes=7)
    ref.load_state_dict(net.extract([2, 2, 2, 2]).state_dict(), strict=True)
    ref.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x, [2, 2, 2, 2])[0], ref(x))


def _built_alone(net: nn.Module, arch: str, depth: Sequence[int], **kwargs) -> nn.Module:
    """``depth`` built on its own by ``build_net(arch, blocks=depth)``, its weights copied by
    name from ``net``'s state dict (a block ``stages.i.j`` exists in both where kept; private
    BatchNorm copies ``*_d<i>`` are left out)."""
    alone = build_net(arch, blocks=list(depth), **kwargs)
    full = {k: v for k, v in net.state_dict().items() if not re.search(r"_d\d+$", k)}
    own = alone.state_dict()
    dropped = [
        k
        for k in full
        if k.startswith("stages.") and int(k.split(".")[2]) >= depth[int(k.split(".")[1])]
    ]
    assert sorted(own) == sorted(k for k in full if k not in dropped)
    alone.load_state_dict({k: full[k] for k in own}, strict=True)
    return alone


@pytest.mark.parametrize(("arch", "subnets", "size"), FAMILIES)
def test_extracted_net_equals_ddnn_depth(arch, subnets, size):
    """Every depth, built alone by ``build_net(arch, blocks=depth)`` with the kept blocks'
    weights copied by name, gives the DDNN's logits at that depth; ``extract`` holds only
    those blocks and gives the same logits."""
    torch.manual_seed(0)
    net = build_net(arch, subnets=subnets, num_classes=7).eval()
    x = torch.randn(2, 3, size, size)
    for depth in net.depths:
        alone = _built_alone(net, arch, depth, num_classes=7).eval()
        assert alone.full_depth == depth and alone.subnets == []
        standalone = net.extract(depth).eval()
        stages = getattr(standalone, "stages", None) or [
            getattr(standalone, f"layer{i}") for i in range(1, 5)
        ]
        assert sum(len(s) for s in stages) == sum(depth)
        with torch.no_grad():
            expected = alone(x)[0]
            torch.testing.assert_close(net(x, depth)[0], expected, rtol=0, atol=0)
            out = standalone(x)
            out = out[0] if isinstance(out, tuple) else out
            torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _separate(net, x, depths):
    return [net(x, d) for d in depths]


@pytest.mark.parametrize("bn_stats", ["shared", "private"])
@pytest.mark.parametrize(("arch", "subnets", "size"), FAMILIES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_shared_prefix_equals_separate_runs(arch, subnets, size, mode, bn_stats):
    """forward_depths == one forward per depth: logits, stage features and gradients."""
    torch.manual_seed(0)
    net = build_net(arch, subnets=subnets, bn_stats=bn_stats).train(mode == "train")
    x = torch.randn(4, 3, size, size)
    weights = [torch.randn(net.config["num_classes"]) for _ in net.depths]

    def loss_of(outputs):
        loss = 0
        for (logits, feats), w in zip(outputs, weights, strict=True):
            loss = loss + (logits * w).sum() + sum(f.pow(2).mean() for f in feats)
        return loss

    shared = net.forward_depths(x, net.depths)
    loss_of(shared).backward()
    grads_shared = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    separate = _separate(net, x, net.depths)
    loss_of(separate).backward()
    for (lg_a, f_a), (lg_b, f_b) in zip(shared, separate, strict=True):
        torch.testing.assert_close(lg_a, lg_b, rtol=1e-5, atol=1e-5)
        assert len(f_a) == len(f_b) == len(net.full_depth)
        for a, b in zip(f_a, f_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, p in net.named_parameters():  # float32 sums in another order: relative to the max
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(grads_shared[name], p.grad, rtol=0, atol=1e-5 * scale, msg=name)


def test_prefix_tree_runs_each_shared_block_once():
    """ResNet-50 with [3,4,4,3] and [3,3,3,3]: blocks run = nodes of the block prefix tree."""
    net = build_net("resnet50", subnets=[[3, 4, 4, 3], [3, 3, 3, 3]]).eval()
    calls = []
    for s, stage in enumerate(net.stages):
        for b, block in enumerate(stage):
            block.register_forward_hook(lambda *_, key=(s, b): calls.append(key))
    net.forward_depths(torch.randn(1, 3, 32, 32), net.depths)
    # shared: stage 1 (3), stage 2 blocks 1-3 (3); then full/[3,4,4,3] share stage-2 block 4
    # and stage-3 blocks 1-4; [3,3,3,3] branches after stage-2 block 3.
    shared = 3 + 3
    full_and_44 = 1 + 4
    full_only = 2 + 3
    r44_only = 3
    r38_only = 3 + 3
    assert len(calls) == shared + full_and_44 + full_only + r44_only + r38_only
    assert len(calls) == len(set(calls)) + r44_only + r38_only  # re-runs only after branching


def test_stage_features_shapes():
    """Per-stage features have the channels and resolutions of each family's stages."""
    net = build_net("cifar_resnet56")
    _, feats = net(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    net = build_net("resnet18")
    _, feats = net(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [
        (64, 16, 16),
        (128, 8, 8),
        (256, 4, 4),
        (512, 2, 2),
    ]


def test_private_bn_stats_are_per_depth():
    """With private statistics each depth's running statistics follow its own inputs only:
    after one train-mode step of both depths, the sub-net's equal those of the same depth
    built alone and run alone on the batch, and so do its eval-mode logits."""
    torch.manual_seed(0)
    net = build_net("cifar_resnet20", subnets=[[1, 1, 1]], bn_stats="private").train()
    alone = _built_alone(net, "cifar_resnet20", (1, 1, 1)).train()  # fresh statistics too
    x = torch.randn(8, 3, 16, 16)
    net.forward_depths(x, net.depths)
    alone(x)
    state = net.extract([1, 1, 1]).state_dict()
    assert sorted(state) == sorted(alone.state_dict())
    for key, value in alone.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    x_eval = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            net.eval()(x_eval, [1, 1, 1])[0], alone.eval()(x_eval)[0], rtol=0, atol=0
        )
    # stage 2 block 1 sees the output of stage-1 block 1 only in the sub-net
    bn = net.stages[1][0].bn1
    assert not torch.equal(bn.running_mean, bn.running_mean_d1)
    assert torch.equal(state["stages.1.0.bn1.running_mean"], bn.running_mean_d1)
    # the stem is shared: its statistics are equal for both depths
    assert torch.equal(net.stem[1].running_mean, net.stem[1].running_mean_d1)


def test_private_bn_stats_of_every_depth_equal_each_depth_trained_alone():
    """Train-mode steps of three sub-nets branching at different blocks and a sampled
    lattice depth (scratch statistics) through one prefix tree: every named depth's extracted
    net holds exactly the buffers of that depth built alone and run alone on the same
    batches, and gives its eval-mode logits; the sampled depth leaves no trace."""
    torch.manual_seed(0)
    subnets = [[2, 2, 2], [1, 3, 1], [1, 1, 1]]
    net = build_net("cifar_resnet20", subnets=subnets, image_size=8, bn_stats="private").train()
    alone = {d: _built_alone(net, "cifar_resnet20", d, image_size=8).train() for d in net.depths}
    batches = [torch.randn(4, 3, 8, 8) * (i + 1) + i for i in range(2)]
    for x in batches:
        net.forward_depths(x, [*net.depths, (2, 1, 3)])
        for ref in alone.values():
            ref(x)
    scratch = f"running_mean_d{len(net.depths)}"  # the sampled depth's: kept, never saved
    assert hasattr(net.stem[1], scratch) and not any(k.endswith(scratch) for k in net.state_dict())
    x_eval = torch.randn(4, 3, 8, 8)
    for depth, ref in alone.items():
        state = net.extract(depth).state_dict()
        assert sorted(state) == sorted(ref.state_dict())
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=f"{depth} {key}")
        with torch.no_grad():
            torch.testing.assert_close(
                net.eval()(x_eval, depth)[0], ref.eval()(x_eval)[0], rtol=0, atol=0
            )
        net.train()


def _recalibrated_alone(net: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Reference: plain torch BatchNorm re-estimation on a standalone copy."""
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None
    with torch.no_grad():
        for x in batches:
            net.train()(x)
    return net.eval()


@pytest.mark.parametrize("bn_stats", ["shared", "private"])
def test_recalibrate_bn_stats_equals_plain_reestimation(bn_stats):
    """Each depth ends with the statistics a standalone copy re-estimated alone gets, and the
    stem's running mean is the mean of its conv outputs over all images (equal batches)."""
    torch.manual_seed(0)
    net = build_net("cifar_resnet20", subnets=[[2, 2, 2], [1, 1, 1]], bn_stats=bn_stats)
    net.forward_depths(torch.randn(8, 3, 16, 16), net.depths)  # statistics to overwrite
    batches = [torch.randn(6, 3, 16, 16) + i for i in range(3)]
    refs = {d: _recalibrated_alone(net.extract(d), batches) for d in net.depths}
    weights = {k: v.clone() for k, v in net.named_parameters()}
    net.eval().recalibrate_bn_stats(batches)
    assert net.private_bn_stats and not net.training
    assert all(torch.equal(v, weights[k]) for k, v in net.named_parameters())
    assert all(bn.momentum == 0.1 for bn in net.modules() if isinstance(bn, nn.BatchNorm2d))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        for depth, ref in refs.items():
            torch.testing.assert_close(net(x, depth)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
            stem_mean = net.extract(depth).stem[1].running_mean
            conv_out = net.stem[0](torch.cat(batches))
            torch.testing.assert_close(stem_mean, conv_out.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("arch", "depth", "message"),
    [
        ("cifar_resnet20", [0, 3, 3], "stage 1 has 0 blocks; each stage keeps between 1 and"),
        ("cifar_resnet20", [3, 4, 3], "[1..3, 1..3, 1..3]"),
        ("cifar_resnet20", [3, 3], "has 2 stages but the full-net [3, 3, 3] has 3"),
        (
            "resnet50",
            [3, 4, 7, 3],
            "stage 3 has 7 blocks; each stage keeps between 1 and the "
            "full-net's count [1..3, 1..4, 1..6, 1..3]",
        ),
        ("cifar_resnet20", [3, 3, 3], "is the full-net itself"),
        ("cifar_resnet20", ["a", 1, 1], "is not a list of block counts"),
        ("cifar_resnet20", [2.5, 1, 1], "depth [2.5, 1, 1] is not a list of block counts"),
        ("cifar_resnet20", [True, 1, 1], "depth [True, 1, 1] is not a list of block counts"),
        ("cifar_resnet20", [np.True_, 1, 1], "depth [np.True_, 1, 1] is not a list of block"),
        ("cifar_resnet20", [float("inf"), 1, 1], "depth [inf, 1, 1] is not a list of block"),
        ("cifar_resnet20", [torch.tensor(True), 1, 1], "is not a list of block counts"),
        ("cifar_resnet20", ["2", 1, 1], "depth ['2', 1, 1] is not a list of block counts"),
        ("cifar_resnet20", [np.float32(2.5), 1, 1], "is not a list of block counts"),
        ("cifar_resnet20", [torch.tensor(float("nan")), 1, 1], "is not a list of block counts"),
        ("cifar_resnet20", [Fraction(5, 2), 1, 1], "is not a list of block counts"),
        ("cifar_resnet20", [Decimal("NaN"), 1, 1], "is not a list of block counts"),
        ("cifar_resnet20", [Decimal("Infinity"), 1, 1], "is not a list of block counts"),
        ("cifar_resnet20", [torch.tensor([2]), 1, 1], "is not a list of block counts"),
        ("cifar_resnet20", [np.array([2.0]), 1, 1], "is not a list of block counts"),
        ("cifar_resnet20", [torch.empty((), device="meta"), 1, 1], "is not a list of block"),
        ("cifar_resnet20", [complex(2, 0), 1, 1], "is not a list of block counts"),
    ],
)
def test_invalid_depths(arch, depth, message):
    """Each invalid sub-net depth raises ValueError naming the valid range."""
    with pytest.raises(ValueError) as info:
        build_net(arch, subnets=[depth])
    assert isinstance(info.value, InvalidDepthError)
    assert message in str(info.value)


def test_depths_of_any_integer_kind():
    """NumPy integers, 0-d integer tensors and integral real numbers of any kind (Python,
    NumPy of any width, 0-d tensors and arrays, Fraction, Decimal) are block counts."""
    net = build_net("cifar_resnet20")
    assert net.check_depth([np.int64(2), torch.tensor(1), 3.0]) == (2, 1, 3)
    assert net.check_depth([np.float32(2.0), torch.tensor(1.0), np.float64(3.0)]) == (2, 1, 3)
    assert net.check_depth([Fraction(4, 2), Decimal("1"), np.array(3.0)]) == (2, 1, 3)
    assert net.check_depth([np.array(2), torch.tensor(1.0, dtype=torch.float16), 3]) == (2, 1, 3)


def test_duplicate_subnets_and_unknown_arch():
    """Duplicates and unknown architectures give their own messages."""
    with pytest.raises(ValueError, match=r"sub-net \[2, 2, 2\] is listed twice"):
        build_net("cifar_resnet20", subnets=[[2, 2, 2], [2, 2, 2]])
    with pytest.raises(UserError, match="unknown architecture 'resnet99'; choose one of"):
        build_net("resnet99")
    with pytest.raises(ValueError, match="cifar_resnet20 needs 3 stages of at least 1 block"):
        build_net("cifar_resnet20", blocks=[3, 0, 3])


def test_names():
    """DESIGN section 3 names; colliding names get their blocks appended."""
    assert build_net("cifar_resnet56", subnets=[[7, 7, 7], [3, 2, 3]]).names == [
        "resnet56",
        "resnet44",
        "resnet-3-2-3",
    ]
    assert build_net("resnet34", subnets=[[2, 2, 2, 2]]).names == ["resnet34", "resnet18"]
    assert build_net("cifar_vgg16", subnets=[[1, 1, 2, 2, 2], [2, 2, 2, 2, 2]]).names == [
        "vgg16",
        "vgg11",
        "vgg13",
    ]
    net = build_net("resnet50", subnets=[[2, 3, 3, 2], [3, 3, 2, 2]])
    assert net.names == ["resnet50", "resnet32-2-3-3-2", "resnet32-3-3-2-2"]
    assert net.depth_of("resnet32-3-3-2-2") == (3, 3, 2, 2)
    with pytest.raises(InvalidDepthError, match="no depth named 'resnet18'"):
        net.depth_of("resnet18")


@pytest.mark.parametrize("arch", list_archs())
def test_every_arch_builds_and_runs(arch):
    """Every registered full-net builds, runs a small batch, and every parameter learns."""
    net = build_net(arch, num_classes=5)
    size = 32 if arch.startswith("cifar") else 64
    logits, feats = net(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 5)
    assert len(feats) == len(net.full_depth)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_weights_file_loads_and_is_checked(tmp_path):
    """A local torchvision weights file loads; a mismatched class count is a clear error."""
    ref = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    net = build_net("resnet18", num_classes=10, weights_path=str(path))
    torch.testing.assert_close(net.stem.conv1.weight, ref.conv1.weight, rtol=0, atol=0)
    with pytest.raises(UserError, match="has 10 classes but the model has 1000"):
        build_net("resnet18", weights_path=str(path))
    with pytest.raises(UserError, match="does not exist"):
        build_net("resnet18", weights_path=str(tmp_path / "missing.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file"):
        build_net("resnet18", weights_path=str(tmp_path / "bad.pth"))


def test_vgg_blocks_are_conv_bn_relu():
    """VGG-11's standalone network holds 8 conv layers, each followed by BN and ReLU."""
    net = build_net("cifar_vgg16", subnets=[[1, 1, 2, 2, 2]]).extract([1, 1, 2, 2, 2])
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 8


def test_prefix_tree_macs_ratio_matches_design():
    """ResNet-50 + [3,4,4,3] + [3,3,3,3]: 1.59x a full forward shared, 2.68x separately."""
    from torch.utils.flop_counter import FlopCounterMode

    net = build_net("resnet50", subnets=[[3, 4, 4, 3], [3, 3, 3, 3]]).eval()
    x = torch.zeros(1, 3, 224, 224)

    def flops(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    full = flops(lambda: net(x))
    assert round(flops(lambda: net.forward_depths(x, net.depths)) / full, 2) == 1.59
    assert round(sum(flops(lambda d=d: net(x, d)) for d in net.depths) / full, 2) == 2.68


@pytest.mark.parametrize(("arch", "subnets", "size"), FAMILIES[:3])
def test_channels_last_equals_default_layout(arch, subnets, size):
    """model.channels_last gives the logits and gradients of the NCHW layout. Compared in
    float64 (to 1e-9): in float32, train-mode BatchNorm over tiny 2x2 maps amplifies the
    other kernels' rounding to ~2% in some deep gradients, which says nothing of the code."""
    torch.manual_seed(0)
    nchw = build_net(arch, subnets=subnets).train().double()
    nhwc = build_net(arch, subnets=subnets, channels_last=True).train().double()
    nhwc.load_state_dict(nchw.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    first_conv = next(m for m in nhwc.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    outputs = [net.forward_depths(x, net.depths) for net in (nchw, nhwc)]
    for (a, _), (b, feats) in zip(*outputs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
        assert feats[0].is_contiguous(memory_format=torch.channels_last)
    for outs in outputs:
        sum(lg.square().mean() for lg, _ in outs).backward()
    for (name, p), q in zip(nchw.named_parameters(), nhwc.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-9, msg=name)


def _lattice_sets(net, count, seed=0):
    """``count`` different training depth sets of ``net``'s lattice (full, smallest, 2 drawn),
    none of them the net's own."""
    from ekd_ddnn.sampling import sample_depths

    sets = [net.depths]
    for step in range(100):
        drawn = sample_depths(net.lattice(), 2, seed=seed, step=step)
        if drawn not in sets:
            sets.append(drawn)
    return sets[1 : count + 1]


@pytest.mark.parametrize("bn_stats", ["shared", "private"])
def test_compiled_blocks_equal_eager_and_never_recompile_for_new_depths(bn_stats):
    """Regional compilation (each block compiled on its own): losses, updated weights, BN
    statistics and eval logits equal eager to 1e-6 (Dynamo's graphs run through a counting
    backend: inductor's kernels are for the GPU bench). The graphs are made by the first
    training step and the first evaluation at each batch size; training and evaluating other
    sets of depths (the lattice's, drawn per step) makes none."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_net(
        "cifar_resnet20", subnets=[[2, 2, 2], [1, 1, 1]], image_size=8, bn_stats=bn_stats
    )
    compiled = copy.deepcopy(eager)
    counter = CompileCounter()
    compiled.compile_blocks(backend=counter)
    optims = [torch.optim.SGD(n.parameters(), lr=0.1) for n in (eager, compiled)]
    sets = [eager.depths] + _lattice_sets(eager, 4)
    assert len({tuple(s) for s in sets}) == 5
    graphs = []
    for depths in sets:
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
        losses = []
        for net, opt in zip((eager, compiled), optims, strict=True):
            opt.zero_grad()
            outs = net.train().forward_depths(x, depths)
            loss = sum(F.cross_entropy(logits, y) for logits, _ in outs)
            loss.backward()
            opt.step()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
        graphs.append(counter.frame_count)
    # stem, head, and the block configurations: stage 1, each later stage's first and rest
    assert graphs == [7] * 5, graphs
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    evaluated = [eager.depths] + ([] if bn_stats == "private" else _lattice_sets(eager, 3, 1))
    with torch.no_grad():
        for batch in (8, 8, 5, 3):
            for depths in evaluated:
                x = torch.randn(batch, 3, 8, 8)
                for (a, _), (b, _) in zip(
                    eager.eval().forward_depths(x, depths),
                    compiled.eval().forward_depths(x, depths),
                    strict=True,
                ):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            graphs.append(counter.frame_count)
    # eval mode: 7 more; each new batch size 7 more (static graphs), other depths none
    assert graphs[5:] == [14, 14, 21, 28], graphs
    assert sorted(compiled.state_dict()) == sorted(eager.state_dict())
    torch._dynamo.reset()


def test_compiled_blocks_and_loss_make_static_graphs_only():
    """Every graph of model.compile=true (blocks and loss) has static sizes, through
    AOTAutograd as inductor runs it: with Dynamo's automatic dynamic shapes the block
    configurations after the first (other channels and map sizes through the same call
    code) made symbolic graphs, whose outputs then made the loss's graph symbolic too, and
    inductor's code generation for those ran for minutes in sympy."""
    from torch._dynamo.backends.debugging import aot_eager

    from ekd_ddnn.losses import EKDLoss

    symbolic: list[list[str]] = []  # per graph, its symbolic sizes

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        symbolic.append(
            [
                n.name
                for n in gm.graph.nodes
                if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.SymInt)
            ]
        )
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = build_net("cifar_resnet20", subnets=[[2, 2, 2], [1, 1, 1]], image_size=8)
    net.compile_blocks(backend=backend)
    loss = EKDLoss()
    loss.compile(backend=backend)
    for batch in (8, 8, 6):
        x, y = torch.randn(batch, 3, 8, 8), torch.randint(0, 10, (batch,))
        loss(net.train().forward_depths(x, net.depths), y).total.backward()
    # stem, head, 5 block configurations and the loss, for each of the two batch sizes
    assert symbolic == [[]] * 16
    torch._dynamo.reset()


def test_build_net_compile_flag():
    """model.compile=true compiles every block on its own and records it with its mode."""
    net = build_net("cifar_resnet20", subnets=[[1, 1, 1]], compile=True)
    assert net.config["compile"] is True and net.config["compile_mode"] == "default"
    regions = [net.stem, *(b for stage in net.stages for b in stage), net.head]
    assert all(r._compiled_call_impl is not None for r in regions)
    assert net._compiled_call_impl is None  # the prefix tree itself stays Python
    plain = build_net("cifar_resnet20")
    assert all(m._compiled_call_impl is None for m in plain.modules())
    with pytest.raises(UserError) as info:
        build_net("cifar_resnet20", compile_mode="fast")
    assert str(info.value) == (
        "model.compile_mode must be one of default, max-autotune-no-cudagraphs, "
        "reduce-overhead, got 'fast'"
    )
    # the whole step's scope: the module compiles it, the blocks stay eager
    step = build_net("cifar_resnet20", compile=True, compile_scope="step")
    assert step.config["compile_scope"] == "step"
    assert all(m._compiled_call_impl is None for m in step.modules())
    with pytest.raises(UserError) as info:
        build_net("cifar_resnet20", compile=True, compile_scope="net")
    assert str(info.value) == "model.compile_scope must be one of blocks, step, got 'net'"


@pytest.mark.parametrize(
    ("arch", "image_size", "batch_size", "refused"),
    [
        ("cifar_resnet20", 8, 2, None),
        ("resnet18", 32, 2, None),
        ("cifar_vgg11", 32, 2, None),
        ("cifar_vgg11", 2, 2, "Output size is too small"),  # its poolings shrink 2x2 to 0x0
        ("resnet18", 32, 1, "Expected more than 1 value per channel when training"),  # 1x1
    ],
)
def test_check_input_refuses_what_the_net_cannot_train_on(arch, image_size, batch_size, refused):
    """``check_input`` runs the full-net on the meta device: a batch it can train on passes,
    one its stages shrink to nothing or whose 1x1 maps give BatchNorm a single value per
    channel is one line; either way weights, statistics and mode are as before."""
    net = build_net(arch, subnets=[[1] * len(ARCHS[arch].blocks)], image_size=image_size)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    if refused is None:
        net.check_input(batch_size)
    else:
        with pytest.raises(UserError) as info:
            net.check_input(batch_size)
        message = str(info.value)
        assert message.startswith(
            f"{net.name_of(net.full_depth)} cannot train on batches of {batch_size} images of "
            f"{image_size}x{image_size}: "
        )
        assert refused in message and "\n" not in message
        assert message.endswith("; use larger images or batches (data.image_size, data.batch_size)")
    assert not net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_check_input_leaves_other_errors_to_the_net():
    """Only torch's refusals of an input too small for a layer become the one-line error: a
    failure on the meta device that the batch or image size cannot change (an op without a
    meta kernel) skips the check, so a net that trains is never refused by it."""
    net = build_net("cifar_resnet20", subnets=[[1, 1, 1]], image_size=8)

    def no_meta_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::some_op' with arguments from 'Meta'")

    net.forward_depths = no_meta_kernel
    net.check_input(2)
    assert net.training
