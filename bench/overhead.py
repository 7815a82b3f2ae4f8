"""What our framework layers cost over plain PyTorch (issue 7), in three interleaved parts.

(a) ``lightning``: ``EKDModule`` under a real ``lightning.Trainer`` against a hand-written loop
    doing the same computation (same seeded net, ``EKDLoss``, SGD, in-memory ``DataLoader``):
    steady-state steps/s, lightning / raw (target >= 0.95). The runs alternate; every run
    starts from the same weights, and the final weights of the two are compared.
(b) ``resnet50``: a full-net training step (forward, backward, SGD) of our ImageNet
    ``build_net("resnet50")`` run as ``net(x)`` against ``torchvision.models.resnet50()`` with
    the same weights, interleaved step by step: time ours / torchvision (target <= 1.03).
    A second copy of torchvision's net runs beside them as an A/A control: its ratio to
    torchvision's is this machine's noise floor for the comparison.
(c) ``data``: EKD training steps fed by the real ``DigitsDataModule`` loader (per-sample random
    shift) against the same tensors preloaded (``TensorDataset``, no transform), alternating
    step by step: steps/s real / preloaded (target >= 0.95).

The last line printed is one JSON object with the ratios.

    python bench/overhead.py
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

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
from step_cost import balanced_orders
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ekd_ddnn.data import DigitsDataModule
from ekd_ddnn.data.synthetic import make_synthetic
from ekd_ddnn.losses import EKDLoss
from ekd_ddnn.models import DepthDynamicNet, build_net
from ekd_ddnn.models.imagenet_resnet import to_torchvision_state_dict
from ekd_ddnn.run.cli import report_user_errors

SGD = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


# --------------------------------------------------------------------------- (a) Lightning
def raw_step(
    net: DepthDynamicNet,
    batches: Iterator[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    bf16: bool = False,
) -> Callable[[], None]:
    """One hand-written EKD training step of ``net`` on the next batch of ``batches``, moved
    to ``device`` as Lightning moves it (under bf16 autocast where Lightning's ``bf16-mixed``
    would use it)."""
    loss_fn = EKDLoss()
    # one group of every trainable parameter: what EKDModule.configure_optimizers builds
    optimizer = SGD([{"params": [p for p in net.parameters() if p.requires_grad]}])

    def step() -> None:
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        optimizer.zero_grad(set_to_none=True)
        # as Lightning's bf16-mixed: no cast cache (with one, the weights drift from Lightning's)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            outputs = net.forward_depths(x, net.depths)
            loss = loss_fn(outputs, y).total
        loss.backward()
        optimizer.step()

    return step


def bench_lightning(
    steps: int,
    warmup: int,
    batch_size: int,
    image_size: int = 32,
    *,
    arch: str = "cifar_resnet20",
    subnets: Sequence[Sequence[int]] = ((2, 2, 2),),
    device: str = "cpu",
    bf16: bool = False,
    channels_last: bool = False,
) -> dict:
    """Part (a): ``EKDModule`` under a bare ``lightning.Trainer`` against a raw loop.

    Both train a copy of one seeded net on the same batches in the same order. They alternate
    step by step: a callback runs one raw step at the end of each Lightning step, so each pair
    of steps sees the same machine load. A Lightning step is the time from the end of the
    previous raw step to the end of Lightning's next ``on_train_batch_end``: it covers every
    hook, the batch fetch and transfer, forward, backward, optimiser step and the module's
    logging. On a GPU the callback waits for the device before each clock reading, so each
    step is timed to its last kernel.
    """
    import lightning as L

    from ekd_ddnn.module import EKDModule

    torch.manual_seed(0)
    on = torch.device(device)
    net = build_net(arch, subnets=subnets, image_size=image_size, channels_last=channels_last)
    net.check_input(batch_size)
    classes = net.config["num_classes"]
    data = make_synthetic(steps * batch_size, classes, 3, image_size, seed=0)  # one epoch
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=True)
    raw_net = copy.deepcopy(net).to(on).train()
    step_raw = raw_step(raw_net, iter(loader), on, bf16=bf16)

    def now() -> float:
        if on.type == "cuda":
            torch.cuda.synchronize(on)
        return time.perf_counter()

    class Interleave(L.Callback):
        def __init__(self) -> None:
            self.lightning: list[float] = []
            self.raw: list[float] = []
            self.first_batch = self.resumed = 0.0

        def on_train_batch_start(self, *args, **kwargs) -> None:
            self.first_batch = self.first_batch or time.perf_counter()

        def on_train_batch_end(self, *args, **kwargs) -> None:
            ended = now()
            if self.resumed:
                self.lightning.append(ended - self.resumed)
            with torch.enable_grad():
                step_raw()
            self.resumed = now()
            self.raw.append(self.resumed - ended)

    clock = Interleave()
    module = EKDModule(copy.deepcopy(net), EKDLoss(), optimizer=SGD)
    trainer = L.Trainer(
        accelerator=on.type,
        devices=1,
        precision="bf16-mixed" if bf16 else "32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    end = time.perf_counter()
    # Lightning moves the module back to the CPU when fit ends; the raw net stays on the device
    diff = max(
        (a - b.to(a.device)).abs().max().item()
        for a, b in zip(
            module.net.state_dict().values(), raw_net.state_dict().values(), strict=True
        )
        if a.is_floating_point()
    )
    # Lightning's step i pairs with the raw step just before it (step i-1's callback)
    pairs = list(zip(clock.lightning, clock.raw, strict=False))[warmup:]
    return {
        "ms_per_step": {
            "lightning": 1e3 * statistics.median(p[0] for p in pairs),
            "raw": 1e3 * statistics.median(p[1] for p in pairs),
        },
        "ratio": statistics.median(r / li for li, r in pairs),
        "fixed_s": (clock.first_batch - start) + (end - clock.resumed),
        "max_weight_diff": diff,
        "pairs": len(pairs),
    }


# --------------------------------------------------------------------------- (b) ResNet-50
def classifier_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable:
    """One cross-entropy training step of ``model`` (a DDNN's full depth or a plain net)."""

    def step(x: Tensor, y: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss = F.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def bench_resnet50(repeats: int, warmup: int, batch_size: int, image_size: int) -> dict:
    """Part (b): our ResNet-50 DDNN (full depth) against torchvision's, step by step."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    ours = build_net("resnet50").train()
    theirs = resnet50().train()
    theirs.load_state_dict(to_torchvision_state_dict(ours.state_dict()))
    # A/A control, built like torchvision's: the noise floor of this comparison on this machine
    # (a deepcopy instead ran a steady 3-5% slower here: memory placement alone moves it)
    control = resnet50().train()
    control.load_state_dict(theirs.state_dict())
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(1000, (batch_size,))
    steps = {
        name: classifier_step(model, SGD(model.parameters()))
        for name, model in (("ours", ours), ("torchvision", theirs), ("control", control))
    }
    times, losses = _interleave(steps, lambda: (x, y), repeats, warmup)
    return {
        "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "ratio": statistics.median(_ratios(times["ours"], times["torchvision"])),
        "control_ratio": statistics.median(_ratios(times["control"], times["torchvision"])),
        "first_loss_diff": abs(losses["ours"] - losses["torchvision"]),
    }


def _ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(num, den, strict=True)]


def _interleave(
    steps: dict[str, Callable[[Tensor, Tensor], Tensor]],
    batch: Callable[[], tuple[Tensor, Tensor]] | dict[str, Callable[[], tuple[Tensor, Tensor]]],
    repeats: int,
    warmup: int,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Interleave the steps as ``step_cost.time_interleaved`` does (balanced orders, each
    repeat after an untimed step of its first); time each, batch fetch included.

    Returns the post-warm-up seconds per step and each step's first loss.
    """
    names = list(steps)
    fetch = batch if isinstance(batch, dict) else dict.fromkeys(names, batch)
    times: dict[str, list[float]] = {name: [] for name in names}
    first: dict[str, float] = {}
    orders = balanced_orders(len(names))
    for r in range(warmup + repeats):
        order = [names[i] for i in orders[r % len(orders)]]
        for i, name in enumerate([order[0], *order]):
            start = time.perf_counter()
            loss = steps[name](*fetch[name]())
            elapsed = time.perf_counter() - start
            first.setdefault(name, loss.item())
            if r >= warmup and i > 0:
                times[name].append(elapsed)
    return times, first


# --------------------------------------------------------------------------- (c) data path
def endless(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of ``loader`` epoch after epoch (starting a new epoch is part of the cost)."""
    while True:
        yield from loader


def bench_data(repeats: int, warmup: int, batch_size: int) -> dict:
    """Part (c): EKD steps on the real digits loader against the same tensors preloaded."""
    from step_cost import ekd_step

    dm = DigitsDataModule(batch_size=batch_size, image_size=16)
    dm.setup("fit")
    real = dm.train_dataloader()
    # the same tensors without the augmentation (the real loader shifts batches in collate)
    preloaded = DataLoader(dm.train_set, batch_size=batch_size, shuffle=True, drop_last=True)
    assert isinstance(dm.train_set, TensorDataset)
    torch.manual_seed(0)
    net = build_net(
        "cifar_resnet20",
        subnets=[[2, 2, 2], [1, 1, 1]],
        num_classes=10,
        in_channels=1,
        image_size=16,
        bn_stats="private",  # as conf/experiment/digits.yaml
    )
    steps, batches = {}, {}
    for name, loader in (("real", real), ("preloaded", preloaded)):
        copy_ = copy.deepcopy(net).train()
        steps[name] = ekd_step(copy_, EKDLoss(), SGD(copy_.parameters()))
        batches[name] = endless(loader).__next__
    times, _ = _interleave(steps, batches, repeats, warmup)
    # the loaders alone: what fetching one batch costs
    fetch: dict[str, list[float]] = {"real": [], "preloaded": []}
    for _ in range(2 * len(real)):
        for name in fetch:
            start = time.perf_counter()
            batches[name]()
            fetch[name].append(time.perf_counter() - start)
    return {
        "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "ms_per_fetch": {k: 1e3 * statistics.median(v) for k, v in fetch.items()},
        "ratio": statistics.median(_ratios(times["preloaded"], times["real"])),
    }


# --------------------------------------------------------------------------- main
PARTS = ("lightning", "resnet50", "data")  # (a), (b), (c)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=at_least(2), default=40, help="(a) steps of each")
    parser.add_argument("--lightning-batch", type=at_least(1), default=64, help="(a) batch size")
    parser.add_argument(
        "--lightning-image-size", type=at_least(1), default=32, help="(a) image size"
    )
    parser.add_argument("--lightning-arch", default="cifar_resnet20", help="(a) architecture")
    parser.add_argument(
        "--lightning-subnets", type=subnets, default=[[2, 2, 2]], help="(a) sub-nets, JSON"
    )
    add_device_argument(parser)
    parser.add_argument("--bf16", action="store_true", help="(a) bf16-mixed / bf16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="(a) NHWC layout")
    parser.add_argument(
        "--warmup", type=at_least(0), default=4, help="untimed steps first (a, b, c)"
    )
    parser.add_argument("--repeats", type=at_least(1), default=24, help="(b) timed steps of each")
    parser.add_argument(
        "--data-repeats", type=at_least(1), default=60, help="(c) timed steps of each"
    )
    add_threads_argument(parser)
    parser.add_argument(
        "--parts",
        help="comma-separated subset to run (default: all three; with --device cuda: lightning, "
        "the one part that runs on the device)",
    )
    args = parser.parse_args(argv)
    args.parts = args.parts or ("lightning" if args.device == "cuda" else ",".join(PARTS))
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        parser.error(f"unknown --parts {','.join(unknown)}; choose from {','.join(PARTS)}")
    if "lightning" in args.parts.split(",") and args.steps <= args.warmup + 1:
        parser.error(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}")
    check_device(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the bench, print its report and return the ratios (the last line's JSON)."""
    args = parse_args(argv)
    with bench_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    warnings.filterwarnings("ignore")  # Lightning's num_workers / log-interval advice
    parts = args.parts.split(",")
    result: dict = {}
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")  # as conf/trainer/gpu.yaml

    if "lightning" in parts:
        size = args.lightning_image_size
        a = bench_lightning(
            args.steps,
            args.warmup,
            args.lightning_batch,
            size,
            arch=args.lightning_arch,
            subnets=args.lightning_subnets,
            device=args.device,
            bf16=args.bf16,
            channels_last=args.channels_last,
        )
        ms = a["ms_per_step"]
        result["lightning_over_raw"] = a["ratio"]
        result["lightning_overhead_ms"] = ms["lightning"] - ms["raw"]
        print(
            f"(a) {args.lightning_arch} ⊃ {args.lightning_subnets}, {size}x{size}, batch "
            f"{args.lightning_batch}, EKD, {args.device}, bf16 {args.bf16}, channels_last "
            f"{args.channels_last}; "
            f"{args.steps} steps of each, alternating step by step; medians of {a['pairs']} "
            f"pairs after {args.warmup}"
        )
        print(
            f"    ms/step: lightning {a['ms_per_step']['lightning']:.1f}, raw "
            f"{a['ms_per_step']['raw']:.1f}; Lightning's fixed cost per fit() (setup before the "
            f"first batch + teardown after the last): {a['fixed_s']:.2f} s"
        )
        print(
            f"    steps/s lightning / raw = {a['ratio']:.4f} (target >= 0.95); Lightning adds "
            f"{result['lightning_overhead_ms']:.1f} ms per step"
        )
        print(f"    max |weight difference| after training: {a['max_weight_diff']:.2e}")
        sys.stdout.flush()

    if "resnet50" in parts:
        b = bench_resnet50(args.repeats, args.warmup, batch_size=8, image_size=64)
        result["resnet50_ours_over_torchvision"] = b["ratio"]
        result["resnet50_control_over_torchvision"] = b["control_ratio"]
        print(
            f"(b) resnet50 full-net train step, 64x64, batch 8; {args.repeats} interleaved steps "
            "of ours, torchvision and a copy of torchvision's (control)"
        )
        ms = b["ms_per_step"]
        print(
            f"    ms/step: ours {ms['ours']:.1f}, torchvision {ms['torchvision']:.1f}, control "
            f"{ms['control']:.1f}; |first loss difference| {b['first_loss_diff']:.1e}"
        )
        print(
            f"    time ours / torchvision = {b['ratio']:.4f} (target <= 1.03); "
            f"control / torchvision = {b['control_ratio']:.4f} (the noise floor)"
        )
        sys.stdout.flush()

    if "data" in parts:
        c = bench_data(args.data_repeats, args.warmup, batch_size=64)
        result["data_real_over_preloaded"] = c["ratio"]
        result["data_fetch_ms"] = c["ms_per_fetch"]
        print(
            "(c) digits, cifar_resnet20 ⊃ {[2,2,2],[1,1,1]}, 16x16, batch 64, EKD; "
            f"{args.data_repeats} alternating steps"
        )
        print(
            f"    ms/step: real loader {c['ms_per_step']['real']:.1f}, preloaded "
            f"{c['ms_per_step']['preloaded']:.1f}; ms/batch fetch alone: real "
            f"{c['ms_per_fetch']['real']:.2f}, preloaded {c['ms_per_fetch']['preloaded']:.2f}"
        )
        print(f"    steps/s real / preloaded = {c['ratio']:.4f} (target >= 0.95)")

    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    if "data_fetch_ms" in result:
        result["data_fetch_ms"] = {k: round(v, 3) for k, v in result["data_fetch_ms"].items()}
    result["config"] = {
        # part (a) runs on --device; (b) and (c) always on the CPU
        "device": {part: device if part == "lightning" else "cpu" for part in parts},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    report_user_errors(main)()  # the library's refusals: one line, as the commands
