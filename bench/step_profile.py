"""Where one EKD training step's time goes: the host's time to issue it against the device's
busy time, eager against compiled (``model.compile=true``, ``--compile-mode``).

A step whose host time exceeds its device time is bound by Python and kernel launches, not
arithmetic: compiling its blocks then helps only if it issues fewer, cheaper launches (on an
H200 the regionally compiled ResNet-56 step issued as many kernels as eager, each launch
costlier, and ran at 0.67x eager's speed; CUDA graphs, ``reduce-overhead``, replay a block's
kernels in one launch). Per mode it reports the synchronised wall time per step, the host time to
issue one step (its call returning, before the device finishes), and from
``torch.profiler`` the device's busy time and the kernels per step, then the operations
with the most host time. It takes ``step_cost.py``'s flags (net, batch, ``--bf16``,
``--channels-last``, ``--compile-mode``, ``--compile-scope``); the last line printed is one
JSON object.

    python bench/step_profile.py --device cuda --bf16 --channels-last --experiment cifar100_r56
    python bench/step_profile.py --device cuda --bf16 --experiment imagenet_r50 \
        --compile-mode reduce-overhead
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from settings import bench_threads
from step_cost import compiled_modes, net_and_batch, parse_args, with_autocast
from torch.profiler import ProfilerActivity, profile

from ekd_ddnn.run.cli import report_user_errors
from ekd_ddnn.timing import synchronize

MODES = ("ekd", "ekd_compiled")


def profile_mode(
    fn: Callable[[], object], device: torch.device, *, steps: int, warmup: int, top: int
) -> dict:
    """``fn``'s wall, host and device time per step (ms), its kernels per step, and a table
    of the ``top`` operations by host time."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    walls, hosts = [], []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        issued = time.perf_counter()
        synchronize(device)
        walls.append(time.perf_counter() - start)
        hosts.append(issued - start)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    events = prof.key_averages()
    result = {
        "wall_ms": round(1e3 * statistics.median(walls), 2),
        "host_ms": round(1e3 * statistics.median(hosts), 2),
        "device_busy_ms": None,
        "kernels_per_step": None,
    }
    if device.type == "cuda":
        on_device = [e for e in events if e.self_device_time_total > 0]
        busy = sum(e.self_device_time_total for e in on_device)  # microseconds
        result["device_busy_ms"] = round(busy / 1e3 / steps, 2)
        result["kernels_per_step"] = round(sum(e.count for e in on_device) / steps)
    table = events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)
    return result | {"table": table}


def main(argv: Sequence[str] | None = None) -> dict:
    """Profile the eager and the compiled EKD step; print the report, return the figures."""
    args = parse_args(argv)
    with bench_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    net, x, y = net_and_batch(args)
    modes, _ = compiled_modes(net, x, y, args.compile_mode, args.compile_scope, only=MODES)
    if args.bf16:
        modes = with_autocast(modes, device)
    results = {}
    for name, fn in modes.items():
        start = time.perf_counter()
        fn()  # the compiled mode compiles here
        synchronize(device)
        first = time.perf_counter() - start
        result = profile_mode(fn, device, steps=args.repeats, warmup=args.warmup, top=15)
        print(result.pop("table"))
        results[name] = result | {"first_call_s": round(first, 1)}
        print(f"{name}: {json.dumps(results[name])}")
        sys.stdout.flush()
    results["config"] = {
        "arch": args.settings["arch"],
        "depths": [list(d) for d in net.depths],
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "compile_mode": args.compile_mode,
        "compile_scope": args.compile_scope,
        "steps": args.repeats,
    }
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    report_user_errors(main)()
