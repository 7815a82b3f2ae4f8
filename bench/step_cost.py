"""What one EKD training step costs, against training every depth alone (issue 7).

In one process, on one fixed batch, interleaved within every repeat (in balanced orders: over
a cycle every mode runs in every position and after every other mode equally often), it
times:

- ``ekd``: one EKD step: ``net.forward_depths`` over every depth (block-level prefix tree),
  the full EKD loss, backward, SGD step;
- ``individual``: the K+1 depths as standalone networks (``net.extract``), each with its own
  SGD optimiser and plain cross-entropy, stepped one after the other;
- ``unshared``: the EKD step with each depth run on its own (``net(x, depth)``);
- ``ddnn``: the shared step with cross-entropy only (``EKDLoss(mode="ddnn")``);
- ``eval_shared`` / ``eval_separate``: evaluating every depth under ``torch.no_grad`` with one
  ``forward_depths`` against one ``net(x, depth)`` pass per depth.

Separately, the EKD and the CE-only loss alone (forward and backward on one step's outputs) give
``distill_overhead_loss_only``, a low-noise estimate of what the distillation terms cost.
The ideal ratio comes from ``torch.utils.flop_counter``: the FLOPs of one ``forward_depths``
over every depth (each prefix-tree node once) over the sum of the standalone nets' FLOPs.
The last line printed is one JSON object with the ratios.

    python bench/step_cost.py                                   # CIFAR ResNet-56 ⊃ {44, 32}
    python bench/step_cost.py --experiment imagenet_r50 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Collection, Sequence

import torch
import torch.nn.functional as F
from settings import (
    add_device_argument,
    add_threads_argument,
    at_least,
    bench_threads,
    check_device,
    subnets,
)
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ekd_ddnn.errors import UserError
from ekd_ddnn.losses import EKDLoss, EKDTerms, sharing_pattern
from ekd_ddnn.models import ARCHS, DepthDynamicNet, build_net
from ekd_ddnn.models.base import COMPILE_MODES, COMPILE_SCOPES
from ekd_ddnn.run.cli import report_user_errors
from ekd_ddnn.sampling import sample_depths
from ekd_ddnn.timing import synchronize

Step = Callable[[Tensor, Tensor], Tensor]
TRAIN_MODES = ("ekd", "individual", "unshared", "ddnn")
EVAL_MODES = ("eval_shared", "eval_separate")
# calls of each loss-only mode (after LOSS_WARMUP): a loss takes a millisecond or less at the
# small sizes and 18 ms at the default one, so this many steady their medians for seconds
LOSS_CALLS, LOSS_WARMUP = 200, 10


# --------------------------------------------------------------------------- step functions
def make_sgd(params) -> torch.optim.SGD:
    """SGD as in ``conf/optimizer/sgd.yaml`` but lr 0.01: the benches step many times on one
    batch and must stay finite (NaNs and denormals would distort the timings)."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def logits_of(output: Tensor | tuple[Tensor, list[Tensor]]) -> Tensor:
    """Logits of a DDNN (``(logits, features)``) or of a plain network (a torchvision ResNet)."""
    return output[0] if isinstance(output, tuple) else output


def ekd_step(
    net: DepthDynamicNet,
    loss_fn: EKDLoss,
    optimizer: torch.optim.Optimizer,
    *,
    shared: bool = True,
    compile_mode: str | None = None,
) -> Step:
    """One training step of every depth of ``net`` under ``loss_fn``; returns the loss.

    ``shared``: run the depths as one prefix tree (``forward_depths``), else one
    ``net(x, depth)`` pass per depth (the unshared reference). ``compile_mode``: the
    forward and the loss compiled as one graph in that mode (``model.compile_scope=step``).
    """
    depths = net.depths

    def terms(x: Tensor, y: Tensor) -> EKDTerms:
        outputs = net.forward_depths(x, depths) if shared else [net(x, d) for d in depths]
        return loss_fn(outputs, y)

    if compile_mode is not None:  # all the terms out, as EKDModule's compiled step has them
        terms = torch.compile(terms, mode=compile_mode, dynamic=False)

    def step(x: Tensor, y: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        total = terms(x, y).total
        total.backward()
        optimizer.step()
        return total.detach()

    return step


def individual_step(nets: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]) -> Step:
    """One plain cross-entropy step of each standalone net in turn; returns the summed loss."""

    def step(x: Tensor, y: Tensor) -> Tensor:
        total = torch.zeros((), device=x.device)
        for net, optimizer in zip(nets, optimizers, strict=True):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(logits_of(net(x)), y)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        return total

    return step


def eval_all_depths(net: DepthDynamicNet, *, shared: bool) -> Callable[[Tensor], list[Tensor]]:
    """Logits of every depth of ``net`` (put it in eval mode first), without autograd."""
    depths = net.depths

    @torch.no_grad()
    def run(x: Tensor) -> list[Tensor]:
        if shared:
            return [logits for logits, _ in net.forward_depths(x, depths)]
        return [net(x, depth)[0] for depth in depths]

    return run


def build_modes(
    net: DepthDynamicNet, x: Tensor, y: Tensor
) -> dict[str, Callable[[], Tensor | list[Tensor]]]:
    """Every timed mode as a no-argument callable, each on its own copy of ``net``'s weights
    (so every mode starts from the same initialisation and owns its optimiser state)."""

    def own_copy(mode: str) -> DepthDynamicNet:
        return copy.deepcopy(net).train(mode != "eval")

    modes: dict[str, Callable[[], Tensor | list[Tensor]]] = {}
    for name, loss, shared in (
        ("ekd", EKDLoss(), True),
        ("unshared", EKDLoss(), False),
        ("ddnn", EKDLoss(mode="ddnn"), True),
    ):
        copy_ = own_copy("train")
        modes[name] = _bind(
            ekd_step(copy_, loss, make_sgd(copy_.parameters()), shared=shared), x, y
        )
    standalone = [net.extract(depth).to(x.device).train() for depth in net.depths]
    for alone in standalone:
        if net.config.get("channels_last"):
            alone.to(memory_format=torch.channels_last)
    optimizers = [make_sgd(n.parameters()) for n in standalone]
    modes["individual"] = _bind(individual_step(standalone, optimizers), x, y)
    for name, shared in (("eval_shared", True), ("eval_separate", False)):
        run = eval_all_depths(own_copy("eval"), shared=shared)
        modes[name] = lambda run=run: run(x)
    return modes


def lattice_step(
    net: DepthDynamicNet, optimizer: torch.optim.Optimizer, loss_fn: EKDLoss, calls: list
) -> Step:
    """The EKD step of ``ekd.sampling=lattice``: a new set of depths every call (the
    full-net, the smallest and ``loss_fn.num_sampled`` drawn, as in training). ``calls``
    gets, per call, its stage-sharing pattern (one entry per depth; a compiled loss makes one
    graph per pattern) and whether the call made graphs (Dynamo's count), so timings can
    leave those out."""
    lattice, step_index = net.lattice(), itertools.count()
    graphs = torch._dynamo.utils.counters["stats"]

    def step(x: Tensor, y: Tensor) -> Tensor:
        drawn = min(loss_fn.num_sampled, len(lattice) - 2)
        depths = sample_depths(lattice, drawn, seed=0, step=next(step_index))
        before = graphs["unique_graphs"]
        optimizer.zero_grad(set_to_none=True)
        outputs = net.forward_depths(x, depths)
        total = loss_fn(outputs, y).total
        total.backward()
        optimizer.step()
        pattern = sharing_pattern([features for _, features in outputs])
        calls.append((pattern, graphs["unique_graphs"] > before))
        return total.detach()

    return step


def compiled_modes(
    net: DepthDynamicNet,
    x: Tensor,
    y: Tensor,
    mode: str = "default",
    scope: str = "blocks",
    *,
    only: Collection[str] | None = None,
) -> tuple[dict[str, Callable[[], Tensor | list[Tensor]]], list]:
    """What ``--compile`` compares: the eager EKD step against the same step compiled as
    ``model.compile=true model.compile_mode=<mode> model.compile_scope=<scope>`` compiles it
    (``blocks``: every block on its own, ``compile_blocks``, and the loss,
    ``EKDLoss.compile``; ``step``: the forward and the loss as one graph), the compiled
    CE-only step, and (but under CUDA graphs or the step's scope, which train one set of
    depths) the compiled step of lattice sampling (a new set of depths every call: the
    blocks reuse their graphs, the loss makes one per new stage-sharing pattern); and the
    list the lattice step records its calls in. ``only``: build just these modes (each is a
    copy of the net)."""
    cuda_graphs = mode == "reduce-overhead"
    loss_mode = "default" if cuda_graphs else mode  # as the LightningModule compiles it
    modes = {}
    for name, loss, compiled in (
        ("ekd", EKDLoss(), False),
        ("ekd_compiled", EKDLoss(), True),
        ("ddnn_compiled", EKDLoss(mode="ddnn"), True),
    ):
        if only is not None and name not in only:
            continue
        copy_ = copy.deepcopy(net).train()
        whole = mode if compiled and scope == "step" else None
        step = ekd_step(copy_, loss, make_sgd(copy_.parameters()), compile_mode=whole)
        if compiled:
            if scope == "blocks":
                copy_.compile_blocks(mode)
                loss.compile(mode=loss_mode)
            if cuda_graphs:  # as training_step marks each step
                step = _marking_steps(step)
        modes[name] = _bind(step, x, y)
    calls: list = []
    if cuda_graphs or scope == "step" or (only is not None and "lattice_compiled" not in only):
        return modes, calls
    copy_ = copy.deepcopy(net).train()
    copy_.compile_blocks(mode)
    lattice_loss = EKDLoss(sampling="lattice")
    lattice_loss.compile(mode=loss_mode)
    lattice = lattice_step(copy_, make_sgd(copy_.parameters()), lattice_loss, calls)
    modes["lattice_compiled"] = _bind(lattice, x, y)
    return modes, calls


def _marking_steps(step: Step) -> Step:
    """``step`` that first begins a new CUDA-graph generation (``EKDModule.training_step``
    under ``model.compile_mode=reduce-overhead``)."""

    def marked(x: Tensor, y: Tensor) -> Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return step(x, y)

    return marked


def compile_seconds(
    fns: dict[str, Callable[[], object]], device: torch.device, *, every: bool = False
) -> dict[str, float]:
    """Seconds of each compiled function's first call (those named ``*_compiled``, or
    ``every`` one): Dynamo's tracing and the backend's code generation (inductor: kernels
    for ``device``), then one run."""
    seconds = {}
    for name, fn in fns.items():
        if every or name.endswith("_compiled"):
            start = time.perf_counter()
            fn()
            synchronize(device)
            seconds[name] = round(time.perf_counter() - start, 1)
    return seconds


def with_autocast(
    fns: dict[str, Callable[[], object]], device: torch.device
) -> dict[str, Callable[[], object]]:
    """Each function run under bf16 autocast (``trainer.precision=bf16-mixed``)."""

    def wrap(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fn()

        return run

    return {name: wrap(fn) for name, fn in fns.items()}


def _bind(step: Step, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    return lambda: step(x, y)


def fixed_outputs(net: DepthDynamicNet, x: Tensor, *, bf16: bool) -> list:
    """One step's outputs of every depth (``forward_depths`` without autograd, under bf16
    autocast where the steps run in it): what the loss-only figures evaluate the loss on."""
    with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        return copy.deepcopy(net).train().forward_depths(x, net.depths)


def leaves(outputs: list) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Fresh leaf copies of ``outputs``' logits and stage outputs; a stage output the prefix
    tree shares between depths stays one tensor (the loss skips or sums it once)."""
    copies: dict[int, Tensor] = {}

    def leaf(t: Tensor) -> Tensor:
        if id(t) not in copies:
            copies[id(t)] = t.detach().clone().requires_grad_()
        return copies[id(t)]

    return [leaf(o[0]) for o in outputs], [[leaf(f) for f in o[1]] for o in outputs]


def loss_only_modes(outputs: list, y: Tensor, *, compiled: bool = False) -> dict[str, Callable]:
    """The EKD and the CE-only loss, forward and backward, on one step's ``outputs`` held
    fixed, and the floor of the attention terms; ``compiled``: the losses
    ``model.compile=true`` trains with (``EKDLoss.compile``, inductor).

    Their time difference is the distillation terms' own cost, measured without the network
    around it, so far less noisy than ``ekd`` against ``ddnn``. Each mode keeps its leaves
    and their ``.grad`` from call to call, so a gradient is added into an existing one, as
    in a step, where the attention maps' gradient is added into the gradient the stage
    output gets from the layers after it (a fresh ``.grad`` would instead be a copy made by
    a node a step does not have).

    ``loss_floor`` is the CE-only loss plus what any implementation of the attention terms
    pays before its arithmetic: one channel sum over every stage output, and a gradient
    added into each in the backward.
    """
    ekd, ddnn = EKDLoss(), EKDLoss(mode="ddnn")
    if compiled:
        ekd.compile()
        ddnn.compile()

    def run(loss_fn: EKDLoss, logits: list[Tensor], features: list[list[Tensor]]) -> None:
        loss_fn.terms(logits, features, y).total.backward()

    def floor(logits: list[Tensor], features: list[list[Tensor]]) -> None:
        total = ddnn.terms(logits, features, y).total
        stage_outputs = {id(f): f for fs in features for f in fs}.values()
        sums = torch.stack([f.sum(dim=1).sum() for f in stage_outputs])
        (total + sums.sum()).backward()

    ekd_leaves, ddnn_leaves, floor_leaves = leaves(outputs), leaves(outputs), leaves(outputs)
    modes = {
        "loss_ekd": lambda: run(ekd, *ekd_leaves),
        "loss_ddnn": lambda: run(ddnn, *ddnn_leaves),
    }
    if not compiled:
        modes["loss_floor"] = lambda: floor(*floor_leaves)
    return modes


# aten calls that make no kernel of their own (views, metadata, allocation, a dtype no-op);
# a kernel called inside one still counts
_NO_KERNEL = frozenset(
    "aten::" + name
    for name in [
        *("alias", "as_strided", "detach", "empty", "empty_strided", "expand", "expand_as"),
        *("flatten", "lift_fresh", "narrow", "permute", "reshape", "_reshape_alias", "to"),
        *("promote_types", "resolve_conj", "resolve_neg", "result_type", "select", "slice"),
        *("split", "split_with_sizes"),
        *("squeeze", "t", "transpose", "unbind", "unsqueeze", "_unsafe_view", "view", "view_as"),
    ]
)


def loss_operations(outputs: list, y: Tensor) -> dict[str, dict[str, int]]:
    """Operations of one eager EKD and CE-only loss, forward and backward: the aten calls
    that make a kernel (no views), counted where the loss or autograd makes them, not inside
    another aten call (``torch.profiler``, CPU activity; those of a custom autograd
    Function's forward and backward count), after a first call made the loss's cached
    constants. On a GPU each is a kernel launch or more; a compiled loss fuses them. Each
    backward accumulates into existing gradients, as in a step."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(events) -> int:
        def nested(event) -> bool:
            parent = event.cpu_parent
            while parent is not None and (
                not parent.name.startswith("aten::") or parent.name in _NO_KERNEL
            ):
                parent = parent.cpu_parent
            return parent is not None

        calls = [e for e in events if e.name.startswith("aten::") and e.name not in _NO_KERNEL]
        return sum(not nested(e) for e in calls)

    counts = {}
    for mode in ("ekd", "ddnn"):
        loss_fn = EKDLoss(mode=mode)
        logits, features = leaves(outputs)
        loss_fn.terms(logits, features, y).total.backward()  # constants and .grad, uncounted
        with profile(activities=[ProfilerActivity.CPU]) as forward:
            total = loss_fn.terms(logits, features, y).total
        with profile(activities=[ProfilerActivity.CPU]) as backward:
            total.backward()
        counts[mode] = {
            "forward_ops": kernels(forward.events()),
            "backward_ops": kernels(backward.events()),
        }
    return counts


# --------------------------------------------------------------------------- FLOPs
def forward_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` (convolutions and matrix products) under ``FlopCounterMode``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def ideal_flops(net: DepthDynamicNet, x: Tensor) -> dict[str, int]:
    """Forward FLOPs per image: the prefix tree over every depth, and the standalone nets."""
    one = x[:1]
    probe = copy.deepcopy(net).eval()
    shared = forward_flops(lambda: probe.forward_depths(one, probe.depths))
    nets = [probe.extract(d).to(one.device).eval() for d in probe.depths]
    standalone = [forward_flops(lambda n=n: n(one)) for n in nets]
    return {"shared": shared, "standalone_sum": sum(standalone), "full": standalone[0]}


# --------------------------------------------------------------------------- timing
def saved_mib(fn: Callable[[], object], params: Sequence[Tensor]) -> float:
    """MiB of the distinct tensors autograd saves for backward while ``fn`` runs, weights
    excluded: the activations a training step holds at its peak, measured on any device."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def activation_memory(net: DepthDynamicNet, x: Tensor, y: Tensor) -> dict[str, float]:
    """Activations (MiB) an EKD step keeps for backward, against each standalone net's."""
    net = copy.deepcopy(net).train()
    params = list(net.parameters())

    def ekd_forward() -> None:
        outputs = net.forward_depths(x, net.depths)
        EKDLoss()(outputs, y)

    memory = {"ekd": saved_mib(ekd_forward, params)}
    for depth, name in zip(net.depths, net.names, strict=True):
        alone = net.extract(depth).train()
        memory[name] = saved_mib(
            lambda alone=alone: F.cross_entropy(logits_of(alone(x)), y), list(alone.parameters())
        )
    return memory


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` items, one per repeat, cycled (Williams' design): over a cycle each
    item runs in every position equally often and directly after every other item equally
    often (``n`` orders for even ``n``, ``2n`` for odd), so that what one call leaves behind
    (caches, allocator, clock) favours no item over another."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(i + shift) % n for i in first] for shift in range(n)]
    return orders if n % 2 == 0 else orders + [order[::-1] for order in orders]


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    timed_calls: dict[str, list[int]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of every function, interleaved: each repeat runs every function once,
    in the :func:`balanced_orders` of the repeat, after one untimed call of its first
    function (so every repeat's first call follows a call of itself, and no function's
    first call follows one particular other, as it would after the previous repeat's last
    call). Returns the post-warm-up times and, on CUDA, each function's peak memory over its
    post-warm-up calls, above what was allocated before the call (MiB). ``timed_calls``, if
    given, gets per function the number of each timed call among all its calls here (from 0;
    the untimed first calls of a repeat make these differ from the repeats' numbers)."""
    names = list(fns)
    made = dict.fromkeys(names, 0)
    orders = balanced_orders(len(names))
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, float] = {}
    for r in range(warmup + repeats):
        order = [names[i] for i in orders[r % len(orders)]]
        fns[order[0]]()
        made[order[0]] += 1
        for name in order:
            if device.type == "cuda":
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            elapsed = time.perf_counter() - start
            made[name] += 1
            if r < warmup:  # first calls: cuDNN's autotuning workspaces, allocator growth
                continue
            times[name].append(elapsed)
            if timed_calls is not None:
                timed_calls.setdefault(name, []).append(made[name] - 1)
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                peaks[name] = max(peaks.get(name, 0.0), peak)
    return times, peaks


def paired_ratios(times: dict[str, list[float]], num: str, den: str) -> list[float]:
    """``num``'s time over ``den``'s time in the same repeat, for every repeat; their median
    is the reported ratio and their spread shows the measurement noise."""
    return [a / b for a, b in zip(times[num], times[den], strict=True)]


# --------------------------------------------------------------------------- configuration
def experiment_settings(name: str) -> dict:
    """Model and input settings of ``conf/experiment/<name>.yaml`` (composed by Hydra)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from ekd_ddnn import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}"])
    GlobalHydra.instance().clear()
    blocks = cfg.model.blocks
    return {
        "arch": cfg.model.arch,
        "blocks": None if blocks is None else list(blocks),
        "subnets": OmegaConf.to_container(cfg.model.subnets),
        "bn_stats": cfg.model.bn_stats,
        "image_size": int(cfg.data.image_size),
        "num_classes": int(cfg.data.num_classes),
        "in_channels": int(cfg.data.in_channels),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", help="take the model and input from this experiment")
    parser.add_argument("--arch", help="full-net architecture (default cifar_resnet56)")
    parser.add_argument(
        "--subnets", type=subnets, help='sub-net depths as JSON (default "[[7,7,7],[5,5,5]]")'
    )
    parser.add_argument("--batch-size", type=at_least(1), default=128)
    parser.add_argument("--image-size", type=at_least(1), help="default: the architecture's")
    parser.add_argument("--num-classes", type=at_least(2), help="default: the architecture's")
    parser.add_argument("--repeats", type=at_least(1), default=7, help="timed repeats of each mode")
    parser.add_argument("--warmup", type=at_least(0), default=1, help="untimed repeats first")
    add_device_argument(parser)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (bf16-mixed)")
    parser.add_argument(
        "--channels-last", action="store_true", help="NHWC weights and inputs (channels_last)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="eager against compiled (model.compile=true) EKD steps only; compile seconds",
    )
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="with --compile: model.compile_mode (reduce-overhead: no lattice step)",
    )
    parser.add_argument(
        "--compile-scope",
        choices=COMPILE_SCOPES,
        default="blocks",
        help="with --compile: model.compile_scope (step: no lattice step)",
    )
    parser.add_argument(
        "--compile-loss",
        action="store_true",
        help="also the loss-only figures with the losses compiled as model.compile=true does",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only the activation memory of an EKD step vs each standalone net (no timing)",
    )
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # explicit flags > the experiment's settings > the defaults
    settings = {"arch": "cifar_resnet56", "subnets": [[7, 7, 7], [5, 5, 5]], "blocks": None}
    settings |= {"bn_stats": "shared", "in_channels": 3, "image_size": None, "num_classes": None}
    if args.experiment:
        try:
            settings |= experiment_settings(args.experiment)
        except Exception as exc:  # Hydra's missing-config error names the available options
            reason = str(exc).strip().splitlines()[0]
            parser.error(f"cannot compose experiment={args.experiment}: {reason}")
    for key in ("arch", "subnets", "image_size", "num_classes"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["arch"] not in ARCHS:
        parser.error(f"unknown --arch {settings['arch']!r}; choose one of {sorted(ARCHS)}")
    spec = ARCHS[settings["arch"]]
    for key in ("image_size", "num_classes"):
        if settings[key] is None:
            settings[key] = getattr(spec, key)
    check_device(parser, args)
    args.settings = settings
    return args


def run_config(args: argparse.Namespace, net: DepthDynamicNet) -> dict:
    """What a run measured, for its JSON line: the model, input, device and options."""
    s, device = args.settings, torch.device(args.device)
    config = {
        "arch": s["arch"],
        "depths": [list(d) for d in net.depths],
        "names": net.names,
        "batch_size": args.batch_size,
        "image_size": s["image_size"],
        "num_classes": s["num_classes"],
        "in_channels": s["in_channels"],
        "bn_stats": s["bn_stats"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "compile_scope": args.compile_scope,
        "compile_loss": args.compile_loss,
    }
    if args.experiment:
        config["experiment"] = args.experiment
    return config


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the bench, print its report and return the ratios (the last line's JSON)."""
    args = parse_args(argv)
    if not args.compile and (args.compile_mode, args.compile_scope) != ("default", "blocks"):
        raise UserError(
            "--compile-mode and --compile-scope choose what --compile compiles; add --compile"
        )
    with bench_threads(args.threads):
        return _run(args)


def net_and_batch(args: argparse.Namespace) -> tuple[DepthDynamicNet, Tensor, Tensor]:
    """The net, one batch and its targets the run's arguments describe, on its device."""
    s = args.settings
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    net = build_net(
        s["arch"],
        blocks=s["blocks"],
        subnets=s["subnets"],
        num_classes=s["num_classes"],
        in_channels=s["in_channels"],
        image_size=s["image_size"],
        bn_stats=s["bn_stats"],
        channels_last=args.channels_last,
    ).to(device)
    net.check_input(args.batch_size)  # an image size or batch the net cannot train on: one line
    shape = (args.batch_size, s["in_channels"], s["image_size"], s["image_size"])
    x = torch.randn(shape, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(s["num_classes"], (args.batch_size,), device=device)
    return net, x, y


def _run(args: argparse.Namespace) -> dict:
    s = args.settings
    device = torch.device(args.device)
    net, x, y = net_and_batch(args)

    if args.memory_only:
        memory = {k: round(v, 1) for k, v in activation_memory(net, x, y).items()}
        largest = max(memory[name] for name in net.names)
        print(f"{s['arch']} {net.names} batch {args.batch_size} at {s['image_size']}px")
        print(
            json.dumps(
                {"activation_mib": memory, "ekd_over_largest": round(memory["ekd"] / largest, 4)}
            )
        )
        return memory
    if args.compile:
        return _run_compiled(args, net, x, y)
    flops = ideal_flops(net, x)
    ideal = flops["shared"] / flops["standalone_sum"]
    modes = build_modes(net, x, y)
    if args.bf16:
        modes = with_autocast(modes, device)
    start = time.perf_counter()
    times, peaks = time_interleaved(modes, repeats=args.repeats, warmup=args.warmup, device=device)
    wall = time.perf_counter() - start
    outputs = fixed_outputs(net, x, bf16=args.bf16)
    loss_modes = loss_only_modes(outputs, y)
    if args.bf16:
        loss_modes = with_autocast(loss_modes, device)
    loss_times, _ = time_interleaved(
        loss_modes, repeats=max(LOSS_CALLS, args.repeats), warmup=LOSS_WARMUP, device=device
    )
    loss_median = {name: statistics.median(t) for name, t in loss_times.items()}
    loss_compile_seconds = {}
    if args.compile_loss:
        compiled_losses = loss_only_modes(outputs, y, compiled=True)
        if args.bf16:
            compiled_losses = with_autocast(compiled_losses, device)
        loss_compile_seconds = compile_seconds(compiled_losses, device, every=True)
        compiled_times, _ = time_interleaved(
            compiled_losses,
            repeats=max(LOSS_CALLS, args.repeats),
            warmup=LOSS_WARMUP,
            device=device,
        )
        loss_median |= {f"{k}_compiled": statistics.median(t) for k, t in compiled_times.items()}

    config = run_config(args, net)
    pairs = {
        "ekd_over_individual": ("ekd", "individual"),
        "shared_over_unshared": ("ekd", "unshared"),
        "distill_overhead": ("ekd", "ddnn"),
        "eval_shared_over_separate": ("eval_shared", "eval_separate"),
    }
    ranges = {key: paired_ratios(times, *pair) for key, pair in pairs.items()}
    result = {key: statistics.median(r) for key, r in ranges.items()}
    result["distill_overhead"] -= 1.0
    for key, mode, base in (
        ("loss_only", "loss_ekd", "loss_ddnn"),
        ("loss_floor", "loss_floor", "loss_ddnn"),
        ("loss_only_compiled", "loss_ekd_compiled", "loss_ddnn_compiled"),
    ):
        if mode in loss_median:
            extra = loss_median[mode] - loss_median[base]
            result[f"distill_overhead_{key}"] = extra / statistics.median(times["ddnn"])
    result["ideal_flops_ratio"] = ideal
    result["ekd_over_ideal"] = result["ekd_over_individual"] / ideal - 1.0
    result = {k: round(v, 4) for k, v in result.items()}

    print(f"{s['arch']} depths {config['names']} {[list(d) for d in net.depths]}")
    print(
        f"batch {args.batch_size} x {s['in_channels']}x{s['image_size']}x{s['image_size']}, "
        f"{config['device']} ({platform.processor() or platform.machine()}, "
        f"{config['threads']} threads), torch {torch.__version__}; "
        f"{args.repeats} repeats after {args.warmup} warm-up, interleaved ({wall:.0f} s)"
    )
    print(
        f"forward GFLOPs/image: full-net {flops['full'] / 1e9:.4f}, prefix tree "
        f"{flops['shared'] / 1e9:.4f}, standalone sum {flops['standalone_sum'] / 1e9:.4f}"
    )
    full = flops["full"]
    ideal_of = {
        "ekd": flops["shared"],
        "individual": flops["standalone_sum"],
        "unshared": flops["standalone_sum"],
        "ddnn": flops["shared"],
        "eval_shared": flops["shared"],
        "eval_separate": flops["standalone_sum"],
    }
    ideal_of_ratio = dict.fromkeys(pairs, ideal) | {"distill_overhead": 1.0}
    print()
    print(f"| {'mode':<14}| median ms | min ms    | FLOPs / full-net | peak extra MiB |")
    print("|---------------|-----------|-----------|------------------|----------------|")
    for name in (*TRAIN_MODES, *EVAL_MODES):
        med, low = statistics.median(times[name]) * 1e3, min(times[name]) * 1e3
        peak = f"{peaks[name]:.0f}" if name in peaks else "n/a on CPU"
        print(
            f"| {name:<14}| {med:9.1f} | {low:9.1f} | {ideal_of[name] / full:16.3f} | {peak:>14} |"
        )
    print()
    spread = {k: f"[{min(r):.3f}, {max(r):.3f}]" for k, r in ranges.items()}
    gap = f"{100 * result['ekd_over_ideal']:+.1f}% vs"
    for label, key, note in (
        ("ekd / sum(individual)", "ekd_over_individual", gap),
        ("shared / unshared (EKD)", "shared_over_unshared", "FLOPs"),
        ("eval shared / separate", "eval_shared_over_separate", "FLOPs"),
        ("ekd / ddnn", "distill_overhead", "FLOPs"),
    ):
        value = result[key] + (key == "distill_overhead")
        print(
            f"{label:<24} {value:.4f} {spread[key]:<16}  ({note} ideal {ideal_of_ratio[key]:.4f})"
        )
    print(f"distill_overhead = ekd / ddnn - 1 = {100 * result['distill_overhead']:+.2f}%")
    print(
        f"distill_overhead_loss_only = {100 * result['distill_overhead_loss_only']:+.2f}% of the "
        f"ddnn step: EKD loss fwd+bwd {1e3 * loss_median['loss_ekd']:.2f} ms, "
        f"CE-only {1e3 * loss_median['loss_ddnn']:.2f} ms"
    )
    print(
        f"distill_overhead_loss_floor = {100 * result['distill_overhead_loss_floor']:+.2f}%: "
        "CE-only plus a channel sum of every stage output and a gradient added into each "
        f"({1e3 * loss_median['loss_floor']:.2f} ms), what any attention term pays"
    )
    if args.compile_loss:
        print(
            "distill_overhead_loss_only_compiled = "
            f"{100 * result['distill_overhead_loss_only_compiled']:+.2f}% of the eager ddnn step: "
            f"the losses compiled (EKDLoss.compile), EKD "
            f"{1e3 * loss_median['loss_ekd_compiled']:.2f} ms, CE-only "
            f"{1e3 * loss_median['loss_ddnn_compiled']:.2f} ms; first calls (compile) "
            + ", ".join(f"{k} {v} s" for k, v in loss_compile_seconds.items())
        )
    operations = loss_operations(outputs, y)
    print(
        "loss operations (aten calls that make a kernel, forward / backward): "
        + ", ".join(f"{m} {c['forward_ops']} / {c['backward_ops']}" for m, c in operations.items())
    )
    memory = activation_memory(net, x, y)
    largest = max(memory[name] for name in net.names)
    result["ekd_over_largest_individual_activations"] = round(memory["ekd"] / largest, 4)
    print(
        "activations saved for backward (MiB): ekd "
        + f"{memory['ekd']:.0f}; alone: "
        + ", ".join(f"{name} {memory[name]:.0f}" for name in net.names)
        + f"; ekd / largest individual = {memory['ekd'] / largest:.3f}"
    )
    print("targets: ekd / sum(individual) within +5% of its ideal; distill_overhead <= +3%")
    print("ratios: median [min, max] over the repeats of the two modes' times in one repeat")
    sys.stdout.flush()
    result["loss_operations"] = operations
    result["config"] = config | {"activation_mib": {k: round(v, 1) for k, v in memory.items()}}
    print(json.dumps(result))
    return result


def _run_compiled(args: argparse.Namespace, net: DepthDynamicNet, x: Tensor, y: Tensor) -> dict:
    """``--compile``: compile seconds on their own line, then eager against compiled."""
    device = x.device
    modes, calls = compiled_modes(net, x, y, args.compile_mode, args.compile_scope)
    if args.bf16:
        modes = with_autocast(modes, device)
    graphs = torch._dynamo.utils.counters["stats"]
    seconds = compile_seconds(modes, device)
    print(f"compile seconds (first call): {json.dumps(seconds)}")
    before, calls_before = graphs["unique_graphs"], len(calls)
    numbers: dict[str, list[int]] = {}
    times, _ = time_interleaved(
        modes, repeats=args.repeats, warmup=args.warmup, device=device, timed_calls=numbers
    )
    timed_calls = [calls[calls_before + n] for n in numbers.get("lattice_compiled", [])]
    new_patterns = {p for p, _ in calls[calls_before:]} - {p for p, _ in calls[:calls_before]}
    # a lattice call that met a new pattern compiled the loss: left out of its ratio
    steady = [not made for _, made in timed_calls]
    lattice, fixed = [], []
    if "lattice_compiled" in times:  # not under CUDA graphs or the step's scope
        lattice = [t for t, keep in zip(times["lattice_compiled"], steady, strict=True) if keep]
        fixed = [t for t, keep in zip(times["ekd_compiled"], steady, strict=True) if keep]
    result = {
        "compiled_speedup": statistics.median(paired_ratios(times, "ekd", "ekd_compiled")),
        "compiled_distill_overhead": statistics.median(
            paired_ratios(times, "ekd_compiled", "ddnn_compiled")
        )
        - 1.0,
    }
    if lattice:
        result["lattice_over_fixed_compiled"] = statistics.median(
            a / b for a, b in zip(lattice, fixed, strict=True)
        )
    result = {k: round(v, 4) for k, v in result.items()}
    result["lattice_calls_that_compiled"] = len(timed_calls) - len(lattice)
    result["graphs_made_during_timing"] = graphs["unique_graphs"] - before
    result["new_sharing_patterns"] = len(new_patterns)
    result["compile_seconds"] = seconds
    print(
        f"{net.config['arch']} {net.names}, batch {args.batch_size}, {device}, bf16 {args.bf16}, "
        f"channels_last {args.channels_last}"
    )
    for name, values in times.items():
        print(f"{name:<18} median {1e3 * statistics.median(values):8.1f} ms")
    print(f"eager / compiled EKD step        {result['compiled_speedup']:.3f}")
    print(f"compiled ekd / ddnn - 1          {100 * result['compiled_distill_overhead']:+.2f}%")
    if lattice:
        print(
            f"lattice / fixed compiled step      {result['lattice_over_fixed_compiled']:.3f} "
            f"({len(lattice)} timed lattice calls that made no graph; "
            f"{len(timed_calls[-1][0])} depths against "
            f"{len(net.depths)})"
        )
    if "lattice_compiled" not in times:  # one set of depths: no new one to compile for
        print(f"graphs made during the timed calls: {result['graphs_made_during_timing']}")
    else:
        print(
            f"graphs made during the timed calls ({args.warmup + args.repeats} new depth "
            f"sets): {result['graphs_made_during_timing']}; new stage-sharing patterns (the "
            f"loss makes a graph for each): {result['new_sharing_patterns']}"
        )
    sys.stdout.flush()
    result["config"] = run_config(args, net)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    report_user_errors(main)()  # the library's refusals: one line, as the commands
