"""Latency and throughput of a network: median of repeats after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously; a CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def median_forward_seconds(
    model: nn.Module, x: torch.Tensor, *, warmup: int = 3, repeats: int = 10
) -> float:
    """Median wall time of ``model(x)`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        model(x)
    synchronize(x.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        synchronize(x.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_speed(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int,
    device: str | torch.device = "cpu",
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, float]:
    """``latency_ms`` at batch 1 and ``throughput`` (images/s) at ``batch_size``."""
    device = torch.device(device)
    model = model.eval().to(device)
    one = torch.randn(1, *input_shape, device=device)
    many = torch.randn(batch_size, *input_shape, device=device)
    latency = median_forward_seconds(model, one, warmup=warmup, repeats=repeats)
    batch_time = median_forward_seconds(model, many, warmup=warmup, repeats=repeats)
    return {"latency_ms": round(1e3 * latency, 4), "throughput": round(batch_size / batch_time, 2)}
