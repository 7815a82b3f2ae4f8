"""Training steps fed by on-device batches (``data.on_device=true``) against preloaded tensors
and against the DataLoader path (issue 15).

One EKD step of CIFAR ResNet-20 ⊃ ResNet-14 (``experiment=cifar10_r20``: forward of both
depths through the prefix tree, EKD loss, backward, SGD) is fed three ways, each mode with its
own copy of the same seeded net:

- ``preloaded``: batches already on the device, made once (the on-device loader's first
  batches, cloned) and cycled: the step alone, the ceiling;
- ``on_device``: :class:`~ekd_ddnn.data.device.DeviceBatches` of ``CIFARDataModule``: uint8
  split on the device, one gather + normalisation per batch, epoch after epoch;
- ``dataloader``: the module's normal loader (per-image PIL crop, flip, normalise in
  ``--workers`` processes, pinned on CUDA), each batch copied to the device.

The modes run interleaved, ``--steps`` steps per mode per repeat (balanced orders, as in
``step_cost.py``); each ratio is the median over repeats of the two modes' times in
the same repeat. The images are random uint8 pixels written as CIFAR-10 files in a temporary
folder (the data's content does not change the cost). The last line printed is one JSON
object; ``preloaded_over_on_device`` is the target (>= 0.98).

    python bench/data_on_device.py --num-images 5000 --batch-size 64 --steps 4 --workers 0
    python bench/data_on_device.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from settings import (
    add_device_argument,
    add_threads_argument,
    at_least,
    bench_threads,
    check_device,
)
from step_cost import ekd_step, make_sgd, paired_ratios, time_interleaved
from torch import Tensor

from ekd_ddnn.data import CIFARDataModule
from ekd_ddnn.data.device import DeviceBatches, EpochDraws
from ekd_ddnn.losses import EKDLoss
from ekd_ddnn.models import build_net
from ekd_ddnn.run.cli import report_user_errors
from ekd_ddnn.timing import synchronize

Batch = tuple[Tensor, Tensor]
MODES = ("preloaded", "on_device", "dataloader")


def write_cifar10(root: Path, num_images: int, seed: int) -> None:
    """Random CIFAR-10 "python version" files in ``root/cifar-10-batches-py`` (5 training
    batches, meta; no test batch)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for b, rows in enumerate(np.array_split(np.arange(num_images), 5)):
        data = rng.integers(0, 256, (len(rows), 3 * 32 * 32), dtype=np.uint8)
        batch = {"data": data, "labels": [int(i) % 10 for i in rows]}
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class_{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def endless(loader: DeviceBatches | torch.utils.data.DataLoader) -> Iterator[Batch]:
    """Batches of ``loader`` epoch after epoch, telling an on-device loader the epoch as
    Lightning does (starting a new epoch is part of the cost)."""
    epoch = 0
    while True:
        if isinstance(loader, DeviceBatches):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def feeds(args: argparse.Namespace, root: Path, device: torch.device) -> dict[str, Callable]:
    """The three ways of getting the next batch on ``device``, as no-argument callables."""
    kwargs = {"name": "cifar10", "data_dir": str(root), "batch_size": args.batch_size}
    dm = CIFARDataModule(**kwargs, on_device=True)
    dm.setup("fit")
    images, labels, augmentation = dm.device_split()
    draws = EpochDraws(len(labels), augmentation, seed=args.seed)
    on_device = endless(
        DeviceBatches(images, labels, draws, batch_size=args.batch_size, device=device)
    )
    preloaded = itertools.cycle(
        [tuple(t.clone() for t in next(on_device)) for _ in range(args.steps)]
    )

    cuda = device.type == "cuda"
    workers = {"num_workers": args.workers, "persistent_workers": args.workers > 0}
    loader = CIFARDataModule(**kwargs, pin_memory=cuda, **workers)
    loader.setup("fit")
    normal = endless(loader.train_dataloader())

    def from_loader() -> Batch:
        x, y = next(normal)
        return x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda)

    return {
        "preloaded": lambda: next(preloaded),
        "on_device": lambda: next(on_device),
        "dataloader": from_loader,
    }


def fetch_ms(fetch: Callable[[], Batch], count: int, device: torch.device) -> float:
    """Median milliseconds to get one batch on the device (waiting for it), without a step."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fetch()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--num-images", type=at_least(1), default=50_000, help="CIFAR-10 images written"
    )
    parser.add_argument("--batch-size", type=at_least(1), default=128)
    parser.add_argument("--steps", type=at_least(1), default=50, help="steps per mode per repeat")
    parser.add_argument(
        "--repeats", type=at_least(1), default=7, help="timed repeats of every mode"
    )
    parser.add_argument("--warmup", type=at_least(0), default=1, help="untimed repeats first")
    parser.add_argument(
        "--workers", type=at_least(0), default=2, help="DataLoader workers (config: 2)"
    )
    add_device_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_device(parser, args)
    if args.num_images * 0.9 < args.batch_size:
        parser.error("--num-images leaves fewer training images than --batch-size")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the bench, print its report and return the ratios (the last line's JSON)."""
    args = parse_args(argv)
    with bench_threads(args.threads), tempfile.TemporaryDirectory() as root:
        return _run(args, Path(root))


def _run(args: argparse.Namespace, root: Path) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    write_cifar10(root, args.num_images, args.seed)
    # random files differ from the official MD5 sums by design: no warning for that
    logging.getLogger("ekd_ddnn.data.cifar").setLevel(logging.ERROR)
    fetch = feeds(args, root, device)
    torch.manual_seed(args.seed)
    net = build_net("cifar_resnet20", subnets=[[2, 2, 2]]).to(device)
    modes = {}
    for name in MODES:
        copy_ = copy.deepcopy(net).train()
        step = ekd_step(copy_, EKDLoss(), make_sgd(copy_.parameters()))

        def run(step=step, get=fetch[name]) -> None:
            for _ in range(args.steps):
                step(*get())

        modes[name] = run
    start = time.perf_counter()
    times, _ = time_interleaved(modes, repeats=args.repeats, warmup=args.warmup, device=device)
    wall = time.perf_counter() - start
    fetches = {name: fetch_ms(fetch[name], 2 * args.steps, device) for name in MODES}
    ratios = {
        "preloaded_over_on_device": paired_ratios(times, "preloaded", "on_device"),
        "preloaded_over_dataloader": paired_ratios(times, "preloaded", "dataloader"),
    }
    result: dict = {key: round(statistics.median(r), 4) for key, r in ratios.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"cifar_resnet20 ⊃ resnet14 EKD steps, batch {args.batch_size} x 3x32x32, {name} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}; {args.steps} steps "
        f"per mode x {args.repeats} repeats after {args.warmup} warm-up, interleaved "
        f"({wall:.0f} s); {args.num_images} images, DataLoader workers {args.workers}"
    )
    print("\n| mode       | ms / step (median) | ms / fetch alone |")
    print("|------------|--------------------|------------------|")
    for mode in MODES:
        per_step = 1e3 * statistics.median(times[mode]) / args.steps
        print(f"| {mode:<10} | {per_step:18.2f} | {fetches[mode]:16.3f} |")
    print()
    for key, values in ratios.items():
        print(f"{key:<26} {result[key]:.4f} [{min(values):.3f}, {max(values):.3f}]")
    print("target: preloaded_over_on_device >= 0.98 (time ratio: on-device steps as fast)")
    result["config"] = {
        "device": name,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "num_images": args.num_images,
        "workers": args.workers,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    report_user_errors(main)()  # the library's refusals: one line, as the commands
