"""Process settings every bench runs under."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def bench_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` CPU threads (0: torch's default) and denormals flushed (a net
    stepped many times on one batch drifts into denormals, which distort CPU timings); both
    are restored afterwards, since the tests call the benches in-process."""
    before = torch.get_num_threads()
    torch.set_flush_denormal(True)
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.set_flush_denormal(False)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads``, the CPU thread count :func:`bench_threads` applies."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: on a shared machine OpenMP's spinning barriers make "
        "multi-threaded step times swing up to 10x; 0 keeps torch's default)",
    )
