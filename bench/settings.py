"""Process settings every bench runs under, and the arguments they share."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator

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
        type=at_least(0),
        default=1,
        help="CPU threads (default 1: on a shared machine OpenMP's spinning barriers make "
        "multi-threaded step times swing up to 10x; 0 keeps torch's default)",
    )


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum`` (a count of steps, repeats,
    images...), so that a 0 or a negative is refused in one line instead of failing later."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def subnets(text: str) -> list[list[int]]:
    """An argparse ``type``: the sub-nets as JSON, a non-empty list of block lists (the
    network checks the counts against its stages)."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not (isinstance(value, list) and value and all(isinstance(d, list) for d in value)):
        raise argparse.ArgumentTypeError(
            "must be a JSON list of one or more block lists, e.g. '[[2,2,2],[1,1,1]]', "
            f"got {text!r}"
        )
    return value


def add_device_argument(parser: argparse.ArgumentParser, *, default: str = "cpu") -> None:
    """``--device`` (cpu or cuda); :func:`check_device` refuses cuda where there is none."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default)


def check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse ``--device cuda`` without a CUDA device, in argparse's one line."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
