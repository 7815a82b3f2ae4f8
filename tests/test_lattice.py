"""Any depth from one run: the lattice, its sampler, training steps over changing depth sets,
evaluation of any set of depths, the accuracy-cost front and the depth for a budget."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from torch import nn

from ekd_ddnn.errors import UserError
from ekd_ddnn.front import check_budget, choose_depths, pareto_flags, pick_for_budget
from ekd_ddnn.losses import EKDLoss
from ekd_ddnn.models import build_net
from ekd_ddnn.module import EKDModule
from ekd_ddnn.results import read_reference
from ekd_ddnn.sampling import sample_depths
from tests.conftest import run_cli


def small_net(**kwargs):
    return build_net(
        "cifar_resnet20", subnets=[[2, 2, 2]], num_classes=10, image_size=8, **kwargs
    ).double()


@pytest.mark.parametrize(
    ("arch", "count"),
    [("cifar_resnet20", 27), ("cifar_resnet56", 729), ("resnet50", 216), ("cifar_vgg16", 108)],
)
def test_lattice_sizes(arch, count):
    """Every per-stage count 1..N_i: 3^3, 9^3, 3*4*6*3 and 2*2*3*3*3 depths; full first."""
    net = build_net(arch)
    lattice = net.lattice()
    assert len(lattice) == len(set(lattice)) == count
    assert lattice[0] == net.full_depth and lattice[-1] == (1,) * len(net.full_depth)


def test_min_blocks_shrinks_the_lattice():
    net = build_net("cifar_resnet56", min_blocks=3)
    assert len(net.lattice()) == 7**3 and net.smallest_depth == (3, 3, 3)
    with pytest.raises(UserError, match="model.min_blocks must be between 1 and"):
        build_net("cifar_resnet20", min_blocks=4)


def test_sampler_draws():
    """Only lattice depths, always the full-net and the smallest first, no duplicate, a pure
    function of (seed, step) (the same on every rank and after a resume), different across
    steps, and uniform over the rest."""
    lattice = build_net("cifar_resnet20").lattice()
    draws = [sample_depths(lattice, 3, seed=7, step=s) for s in range(400)]
    for depths in draws:
        assert depths[:2] == [(3, 3, 3), (1, 1, 1)]
        assert len(set(depths)) == 5 and set(depths) <= set(lattice)
    assert draws[5] == sample_depths(lattice, 3, seed=7, step=5)  # another rank, a resume
    assert sample_depths(lattice, 3, seed=8, step=5) != draws[5]
    assert len({tuple(d) for d in draws}) > 300
    counts = torch.zeros(len(lattice))
    for depths in draws:
        for d in depths[2:]:
            counts[lattice.index(d)] += 1
    rest = counts[1:-1]
    assert counts[0] == counts[-1] == 0 and rest.sum() == 1200
    assert rest.min() > 0.5 * rest.mean() and rest.max() < 1.5 * rest.mean()  # 48 each


def test_sampler_refuses_more_than_the_lattice():
    lattice = build_net("cifar_resnet20").lattice()
    assert len(sample_depths(lattice, 25, seed=0, step=0)) == 27
    with pytest.raises(UserError) as info:
        sample_depths(lattice, 26, seed=0, step=0)
    assert str(info.value) == (
        "ekd.num_sampled=26 but the depth lattice holds only 25 depths besides the full-net "
        "and the smallest; use at most 25"
    )


def test_cuda_graphs_refused_with_lattice_sampling():
    """reduce-overhead records CUDA graphs for one set of depths; lattice sampling changes the
    set every step: refused in one line, the other compile modes accepted."""
    lattice = EKDLoss(sampling="lattice")
    for mode in ("default", "max-autotune-no-cudagraphs"):
        EKDModule(build_net("cifar_resnet20", compile=True, compile_mode=mode), lattice)
    net = build_net("cifar_resnet20", compile=True, compile_mode="reduce-overhead")
    EKDModule(net, EKDLoss())  # a fixed set of depths: allowed
    with pytest.raises(UserError) as info:
        EKDModule(net, lattice)
    assert str(info.value) == (
        "model.compile_mode=reduce-overhead records CUDA graphs for one set of depths and "
        "ekd.sampling=lattice draws a new set every step; use model.compile_mode=default or "
        "max-autotune-no-cudagraphs"
    )


def _train_one_epoch(net, loss: EKDLoss) -> None:
    """Fit ``net`` under ``loss`` for one epoch of 3 synthetic batches of 8 (8x8 px) with a
    real Trainer on the CPU, SGD, nothing written."""
    import lightning as L
    from torch.utils.data import DataLoader

    from ekd_ddnn.data.synthetic import make_synthetic

    loader = DataLoader(make_synthetic(24, 10, 3, 8, seed=0), batch_size=8)
    module = EKDModule(net, loss, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)


def test_compiled_step_refused_with_lattice_sampling():
    """model.compile_scope=step compiles the step for one set of depths: refused in one line
    with lattice sampling, which draws a new set every step; with CUDA graphs as well, one
    line names both and both fixes."""
    net = build_net("cifar_resnet20", compile=True, compile_scope="step")
    EKDModule(net, EKDLoss())
    with pytest.raises(UserError) as info:
        EKDModule(net, EKDLoss(sampling="lattice"))
    assert str(info.value) == (
        "model.compile_scope=step compiles the step for one set of depths and "
        "ekd.sampling=lattice draws a new set every step; use model.compile_scope=blocks"
    )
    both = build_net(
        "cifar_resnet20", compile=True, compile_mode="reduce-overhead", compile_scope="step"
    )
    with pytest.raises(UserError) as info:
        EKDModule(both, EKDLoss(sampling="lattice"))
    assert str(info.value) == (
        "model.compile_mode=reduce-overhead records CUDA graphs and model.compile_scope=step "
        "compiles the step for one set of depths and ekd.sampling=lattice draws a new set "
        "every step; use model.compile_mode=default or max-autotune-no-cudagraphs and "
        "model.compile_scope=blocks"
    )


@pytest.mark.parametrize("bn_stats", ["shared", "private"])
def test_compiled_step_trains_as_eager_in_one_graph(monkeypatch, bn_stats):
    """model.compile_scope=step: a real Trainer's 3 steps run the network and the loss as
    one graph (made by the first step, under the step function's own recompile limit of 64;
    AOTAutograd's backward, as inductor gets it) and reach the eager run's weights; the
    loss is not compiled apart, the blocks not at all. ``torch.compile`` is swapped for a
    counting ``aot_eager`` compile inside the module's own ``_compiled_terms``."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from ekd_ddnn import module as module_lib

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    limits, modes = [], []
    real_compile = torch.compile

    def counting_backend(gm, inputs):
        limits.append(torch._dynamo.config.recompile_limit)
        return counter(gm, inputs)

    def compile_(fn, *, mode, dynamic):
        modes.append(mode)
        return real_compile(fn, backend=counting_backend, dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", compile_)
    module_lib._compiled_terms.cache_clear()
    nets = []
    for scope in ("blocks", "step"):
        torch.manual_seed(0)
        compiled = scope == "step"
        nets.append(
            build_net(
                "cifar_resnet20",
                subnets=[[1, 1, 1]],
                image_size=8,
                bn_stats=bn_stats,
                compile=compiled,
                compile_scope=scope,
            )
        )
    for net in nets:
        loss = EKDLoss()
        _train_one_epoch(net, loss)
        assert "_compile_options" not in vars(loss)
    assert (counter.frame_count, limits, modes) == (1, [64], ["default"])
    assert all(m._compiled_call_impl is None for m in nets[1].modules())
    for key, value in nets[0].state_dict().items():
        torch.testing.assert_close(nets[1].state_dict()[key], value, rtol=1e-5, atol=1e-6)
    module_lib._compiled_terms.cache_clear()
    torch._dynamo.reset()


def test_model_compile_compiles_the_loss_too(monkeypatch):
    """model.compile=true: the module compiles its loss as well, in the blocks' mode (CUDA
    graphs, reduce-overhead, are recorded for the blocks alone: the loss gets default);
    without it the loss stays eager."""
    modes = []
    monkeypatch.setattr(EKDLoss, "compile", lambda self, **options: modes.append(options))
    for mode in ("default", "max-autotune-no-cudagraphs", "reduce-overhead"):
        EKDModule(build_net("cifar_resnet20", compile=True, compile_mode=mode), EKDLoss())
    EKDModule(build_net("cifar_resnet20"), EKDLoss())
    assert modes == [
        {"mode": "default"},
        {"mode": "max-autotune-no-cudagraphs"},
        {"mode": "default"},
    ]


@pytest.mark.parametrize("mode", ["reduce-overhead", "default"])
def test_evaluation_runs_eager_under_cuda_graphs(mode):
    """Under model.compile_mode=reduce-overhead evaluation runs eager: with no backward
    pending, each compiled block would start a new CUDA-graph generation and overwrite the
    previous block's output, its input (pytorch/pytorch#152887). A validation pass under a
    real Trainer then compiles nothing (counting backend) and gives the eager net's
    metrics; in the other modes it runs the compiled blocks."""
    import lightning as L
    from torch._dynamo.testing import CompileCounter
    from torch.utils.data import DataLoader

    from ekd_ddnn.data.synthetic import make_synthetic

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_net("cifar_resnet20", subnets=[[1, 1, 1]], image_size=8)
    compiled = copy.deepcopy(eager)
    counter = CompileCounter()
    compiled.compile_blocks(backend=counter)
    compiled.config.update(compile=True, compile_mode=mode)  # as build_net records it
    loader = DataLoader(make_synthetic(16, 10, 3, 8, seed=0), batch_size=8)
    results = []
    for net in (eager, compiled):
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        results.append(trainer.validate(EKDModule(net, EKDLoss()), loader, verbose=False)[0])
    assert results[1] == pytest.approx(results[0])
    # default: the stem, the head and 5 block configurations, as in test_models
    assert counter.frame_count == (0 if mode == "reduce-overhead" else 7)
    torch._dynamo.reset()


@pytest.mark.parametrize(("mode", "marks"), [("reduce-overhead", 3), ("default", 0)])
def test_training_marks_one_cuda_graph_step_per_batch(monkeypatch, mode, marks):
    """Under CUDA graphs each training step begins a new CUDA-graph generation (3 batches: 3
    marks), so the blocks' shared compiled functions run as one path per step; in the
    other modes training leaves CUDA-graph state alone. A real Trainer fit, the marks
    counted on their way to torch's own."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    net = build_net("cifar_resnet20", subnets=[[1, 1, 1]], image_size=8)
    net.compile_blocks(backend=CompileCounter())
    net.config.update(compile=True, compile_mode=mode)  # as build_net records it
    calls = []
    mark = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(mark()))
    _train_one_epoch(net, EKDLoss())
    assert len(calls) == marks
    torch._dynamo.reset()


@pytest.mark.parametrize("bn_stats", ["shared", "private"])
def test_lattice_step_equals_depths_one_at_a_time(bn_stats):
    """The EKD loss and every gradient of a step over sampled depths (one prefix-tree
    forward) equal those computed from each depth run alone (float64)."""
    torch.manual_seed(0)
    net = small_net(bn_stats=bn_stats)
    loss = EKDLoss(sampling="lattice", num_sampled=3)
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    for step in (0, 1):
        depths = sample_depths(net.lattice(), 3, seed=1, step=step)
        net.zero_grad()
        together = net.forward_depths(x, depths)
        total = loss(together, y).total
        total.backward()
        grads = {k: p.grad.clone() for k, p in net.named_parameters()}

        alone = copy_net(net)
        outputs = [alone(x, d) for d in depths]
        ref = loss(outputs, y).total
        ref.backward()
        torch.testing.assert_close(total, ref, rtol=0, atol=1e-12)
        for k, p in alone.named_parameters():
            torch.testing.assert_close(grads[k], p.grad, rtol=0, atol=1e-10, msg=k)


def copy_net(net: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(net)
    clone.zero_grad()
    return clone


def test_module_steps_draw_from_seed_and_step():
    """EKDModule's depths of a step: the sampler's for (run seed, global step)."""
    net = small_net()
    module = EKDModule(net, EKDLoss(sampling="lattice", num_sampled=2), seed=3)
    depths, names = module.step_depths()
    assert depths == sample_depths(net.lattice(), 2, seed=3, step=0)
    assert names == ["resnet20", "resnet8", "sampled", "sampled"]
    assert "train/ce/sampled_mean" in module.metric_keys()
    with pytest.raises(UserError, match="ekd.num_sampled=30 but the depth lattice holds only 25"):
        EKDModule(net, EKDLoss(sampling="lattice", num_sampled=30))


def test_choose_depths():
    net = small_net()
    trained = net.depths
    assert choose_depths(net, trained, "trained") == [(3, 3, 3), (2, 2, 2)]
    assert choose_depths(net, trained, "lattice") == net.lattice()
    some = choose_depths(net, trained, "lattice", max_depths=4, seed=0)
    assert some[:2] == trained and len(set(some)) == 6 and set(some) <= set(net.lattice())
    assert some == choose_depths(net, trained, "lattice", max_depths=4, seed=0)
    assert choose_depths(net, trained, [[1, 2, 1], [3, 3, 3], [1, 2, 1]]) == [(3, 3, 3), (1, 2, 1)]


def test_recalibration_through_the_prefix_tree_equals_each_depth_alone():
    """Re-estimating the statistics of many depths in one prefix-tree pass per batch equals
    re-estimating each depth's standalone copy with plain torch."""
    torch.manual_seed(0)
    net = small_net(bn_stats="private")
    depths = net.lattice()[::5]
    view = net.with_depths(depths)
    batches = [torch.randn(5, 3, 8, 8, dtype=torch.float64) for _ in range(3)]
    view.recalibrate_bn_stats(batches)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    view.eval()
    for depth, (logits, _) in zip(view.depths, view.forward_depths(x, view.depths), strict=True):
        alone = net.shared_stats_copy().extract(depth)
        for bn in alone.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.reset_running_stats()
                bn.momentum = None
        alone.train()
        with torch.no_grad():
            for b in batches:
                alone(b)
        torch.testing.assert_close(logits, alone.eval()(x)[0], rtol=0, atol=1e-10)


ROWS = [  # hand-made: name, MACs, params, top-1 error
    {"name": "a", "blocks": [3], "macs": 100, "params": 50, "top1_err": 5.0},
    {"name": "b", "blocks": [2], "macs": 80, "params": 40, "top1_err": 6.0},
    {"name": "c", "blocks": [2], "macs": 80, "params": 30, "top1_err": 7.0},
    {"name": "d", "blocks": [1], "macs": 60, "params": 20, "top1_err": 6.0},
    {"name": "e", "blocks": [1], "macs": 60, "params": 25, "top1_err": 6.0},
    {"name": "f", "blocks": [1], "macs": 40, "params": 10, "top1_err": None},
]


def test_pareto_flags_on_a_hand_made_table():
    """a: lowest error; d and e tie (neither strictly better) and dominate b and c; f has no
    error."""
    rows = pareto_flags([dict(r) for r in ROWS])
    assert {r["name"]: r["pareto"] for r in rows} == {
        "a": True, "b": False, "c": False, "d": True, "e": True, "f": False,
    }  # fmt: skip


def test_pick_for_budget_on_a_hand_made_table():
    rows = [dict(r) for r in ROWS]
    assert pick_for_budget(rows, {"macs": 100})["name"] == "a"
    assert pick_for_budget(rows, {"macs": 90})["name"] == "d"  # tie b/d/e at 6.0: cheapest
    assert pick_for_budget(rows, {"macs": 90, "params": 22})["name"] == "d"
    assert pick_for_budget(rows, {"params": 35})["name"] == "d"
    rows[4]["latency_ms"], rows[3]["latency_ms"] = 1.0, 3.0
    assert pick_for_budget(rows, {"macs": 90, "latency_ms": 2})["name"] == "e"
    with pytest.raises(UserError) as info:
        pick_for_budget(rows, {"macs": 70, "params": 15})
    assert str(info.value) == (
        "no depth fits the budget (macs <= 7e-05M, params <= 1.5e-05M): the cheapest is d [1] "
        "with macs 6e-05M, params 2e-05M, latency_ms 3 ms; raise the budget"
    )


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({"macs": float("inf")}, "budget.macs must be a positive finite number, got inf"),
        ({"params": float("nan")}, "budget.params must be a positive finite number, got nan"),
        ({"latency_ms": -0.0}, "budget.latency_ms must be a positive finite number, got -0.0"),
        ({"macs": True}, "budget.macs must be a positive finite number, got True"),
        (
            {"flops": 5},
            "unknown budget flops; give budget.macs, budget.params or budget.latency_ms",
        ),
    ],
)
def test_budget_values_refused(budget, message):
    with pytest.raises(UserError) as info:
        check_budget(budget)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- {name: a, macs: .nan, top1_err: 3}", "item 1 has macs: nan"),
        (
            "- {name: a, macs: 1, top1_err: 3}\n- {name: b, macs: 1, top1_err: .inf}",
            "item 2 has top1_err: inf",
        ),  # fmt: skip
        (f"- {{name: a, macs: {10**400}, top1_err: 3}}", f"item 1 has macs: {10**400}"),
        ("- {name: a, macs: true, top1_err: 3}", "item 1 has macs: True"),
        (
            "- {name: a, macs: 1e6, top1_err: 3}",
            "item 1 has macs: '1e6' (YAML reads 1e6 as text: write 1.0e+6)",
        ),  # fmt: skip
        ("- {macs: 1, top1_err: 3}", "item 1 has no name"),
        ("{name: a, macs: 1, top1_err: 3}", "it holds an object"),
        ("", None),  # a directory
        (b"\xff\xfe\x00", None),  # not UTF-8 text
    ],
)
def test_reference_refused_in_one_line(tmp_path, text, problem):
    """A reference file that is not a list of named finite points (NaN, inf, an integer
    past float's range, a bool, YAML's text 1e6, no name, not a list) names the item and
    the key; a directory or a binary file cannot be read: one line each."""
    path = tmp_path / "ref.yaml"
    if text == "":
        path.mkdir()
    elif isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(UserError) as info:
        read_reference(path)
    message = str(info.value)
    assert "\n" not in message
    if problem is None:
        assert message.startswith(f"cannot read reference={path}: ")
    else:
        assert message == (
            f"reference={path} must be a YAML list of {{name: <str>, macs: <number>, "
            f"top1_err: <number>}} with finite numbers; {problem}"
        )


@pytest.mark.slow
def test_lattice_training_evaluation_and_selection_through_the_cli(tmp_path):
    """`train ekd.sampling=lattice` on digits, then every lattice depth is evaluated (equal
    to evaluating depth by depth), then `select` picks within a MACs budget and exports it."""
    train_dir = tmp_path / "train"
    result = run_cli(
        "train", "ekd.sampling=lattice", "trainer.max_epochs=2", f"hydra.run.dir={train_dir}"
    )
    assert result.returncode == 0, result.stderr
    ckpt = train_dir / "checkpoints" / "last.ckpt"
    rows = {}
    for per_pass in (32, 1):
        out = tmp_path / f"eval{per_pass}"
        result = run_cli(
            "evaluate", f"ckpt_path={ckpt}", "depths=lattice", f"depths_per_pass={per_pass}",
            "speed.enabled=false", f"hydra.run.dir={out}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        rows[per_pass] = json.loads((out / "results.json").read_text())
        assert (out / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert len(rows[32]) == 27 and rows[32] == rows[1]
    trained = {r["name"] for r in rows[32] if r["trained"]}
    assert trained == {"resnet20", "resnet14", "resnet8"}
    assert all(r["bn_images"] == 1408 for r in rows[32])  # lattice: all re-estimated
    assert any(r["pareto"] for r in rows[32])

    out = tmp_path / "select"
    exported = tmp_path / "chosen.pt"
    result = run_cli(
        "select", f"ckpt_path={ckpt}", "budget.macs=5e6",
        f"from_results={tmp_path}/eval32/results.json", "export.format=state_dict",
        f"export.out={exported}", f"hydra.run.dir={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    selection = json.loads((out / "selection.json").read_text())
    fits = [r for r in rows[32] if r["macs"] <= 5e6]
    best = min(fits, key=lambda r: (r["top1_err"], r["macs"], r["params"]))
    assert selection["name"] == best["name"] and selection["blocks"] == best["blocks"]
    assert selection["export"]["path"] == str(exported)
    net = build_net("cifar_resnet20", blocks=best["blocks"], num_classes=10, in_channels=1,
                    image_size=16)  # fmt: skip
    net.load_state_dict(torch.load(exported, weights_only=True))


def test_evaluation_uses_each_depths_own_statistics_at_shared_blocks():
    """Private statistics that differ at shared blocks (a depth updated alone, as lattice
    training does): evaluating the depths together equals evaluating each alone."""
    torch.manual_seed(0)
    net = small_net(bn_stats="private")
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    net.train()
    with torch.no_grad():
        net.forward_depths(x * 3 + 1, [(2, 2, 2)])  # only [2,2,2]'s statistics move
    net.eval()
    together = net.forward_depths(x, net.depths)
    for depth, (logits, features) in zip(net.depths, together, strict=True):
        alone, alone_features = net.forward_depths(x, [depth])[0]
        torch.testing.assert_close(logits, alone, rtol=0, atol=0)
        for a, b in zip(features, alone_features, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    stem = net.forward_depths(x, [(3, 3, 3)])[0][1][0]
    assert not torch.equal(together[1][1][0], stem)  # the stem did run twice


@pytest.mark.parametrize("arch", ["resnet18", "cifar_resnet20", "cifar_vgg11"])
def test_extract_keeps_device_and_dtype(arch):
    """A standalone depth lives where the DDNN lives (here: float64 on the CPU, which stands
    in for CUDA: the ImageNet family used to build a fresh float32 torchvision ResNet)."""
    net = build_net(arch, subnets=[], num_classes=10, image_size=32).double()
    depth = net.lattice()[-1]
    standalone = net.extract(depth)
    assert {p.dtype for p in standalone.parameters()} == {torch.float64}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = standalone.eval()(x)
    logits = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(logits, net.eval()(x, depth)[0], rtol=0, atol=1e-12)
