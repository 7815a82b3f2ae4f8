"""The EKD loss of this tree against the EKD loss at a git revision (or in a file), on one
step's outputs.

Both losses, and the CE-only loss (``ekd=ddnn``), run forward and backward on the same
outputs of one ``forward_depths`` (each on its own leaf copies, whose ``.grad`` is kept from
call to call, as in ``step_cost.py``'s loss-only figures), interleaved in every round, on
the CPU or a GPU, in float32 or as a bf16-mixed step runs them. It first checks that the two
EKD losses agree (total and every gradient to 1e-5, or to one rounding of a bf16
gradient), then reports per round the medians and ``distill_new_over_old``: the
distillation's own cost (EKD minus CE-only) now over at the revision. What a change to
``losses.py`` saves, with far less noise than two runs of ``step_cost.py``. The last line
printed is one JSON object.

    python bench/loss_ab.py --against 3e4b07b
    python bench/loss_ab.py --against 3e4b07b --batch-size 2 --image-size 4   # host time only
    python bench/loss_ab.py --against old_losses.py --device cuda --bf16 --channels-last

``--against`` takes a file where there is no git history (a device machine gets the working
tree alone): ``git show 48a3416:src/ekd_ddnn/losses.py > old_losses.py`` here, carried there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from settings import (
    add_device_argument,
    add_threads_argument,
    at_least,
    bench_threads,
    check_device,
    subnets,
)
from step_cost import fixed_outputs, leaves, time_interleaved
from torch import Tensor

from ekd_ddnn.losses import EKDLoss
from ekd_ddnn.models import build_net
from ekd_ddnn.run.cli import report_user_errors

ROOT = Path(__file__).resolve().parents[1]
LOSSES = "src/ekd_ddnn/losses.py"


def losses_at(revision: str) -> ModuleType:
    """``ekd_ddnn/losses.py`` as it was at ``revision`` of this repository, or the file at
    that path, imported as a module of its own (its imports resolve to today's package)."""
    if Path(revision).is_dir():
        raise SystemExit(f"error: {revision} is a directory; pass a losses.py or a git revision")
    if Path(revision).exists():  # a file (or a device): its bytes; import judges them
        source = Path(revision).read_bytes()
    else:
        shown = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{revision}:{LOSSES}"], capture_output=True
        )
        if shown.returncode != 0:
            raise SystemExit(
                f"error: no {LOSSES} at revision {revision!r} (and no such file): "
                f"{shown.stderr.decode(errors='replace').strip()}"
            )
        source = shown.stdout
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "losses_at_revision.py"
        path.write_bytes(source)
        spec = importlib.util.spec_from_file_location("losses_at_revision", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while defining
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # anything its import raises: not a usable losses.py
            raise SystemExit(
                f"error: {revision} is not a losses.py that imports: "
                f"{type(error).__name__}: {error}"
            ) from None
    if not callable(getattr(getattr(module, "EKDLoss", None), "terms", None)):
        raise SystemExit(
            f"error: {revision} has no EKDLoss with terms(): not an ekd_ddnn losses.py"
        )
    return module


def _tensors(own: tuple[list[Tensor], list[list[Tensor]]]) -> list[Tensor]:
    logits, features = own
    return [*logits, *(f for fs in features for f in fs)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--against", required=True, help="git revision of the other loss, or its losses.py"
    )
    parser.add_argument("--arch", default="cifar_resnet20")
    parser.add_argument("--subnets", type=subnets, default=[[2, 2, 2], [1, 1, 1]])
    parser.add_argument("--batch-size", type=at_least(1), default=16)
    parser.add_argument("--image-size", type=at_least(1), default=16)
    parser.add_argument("--num-classes", type=at_least(2), default=10)
    parser.add_argument("--rounds", type=at_least(1), default=3, help="rounds, each its medians")
    parser.add_argument(
        "--calls", type=at_least(1), default=200, help="timed calls per loss per round"
    )
    parser.add_argument(
        "--warmup", type=at_least(0), default=10, help="untimed calls per round first"
    )
    add_device_argument(parser)
    parser.add_argument(
        "--bf16", action="store_true", help="the outputs and the losses under bf16 autocast"
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="NHWC weights and inputs (channels_last)"
    )
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_device(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the comparison, print a line per round and return the result (the JSON line)."""
    args = parse_args(argv)
    old_losses = losses_at(args.against)
    device = torch.device(args.device)
    with bench_threads(args.threads):
        torch.manual_seed(args.seed)
        net = build_net(
            args.arch,
            subnets=args.subnets,
            num_classes=args.num_classes,
            image_size=args.image_size,
            channels_last=args.channels_last,
        ).to(device)
        net.check_input(args.batch_size)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(args.num_classes, (args.batch_size,), device=device)
        outputs = fixed_outputs(net, x, bf16=args.bf16)
        losses = {
            "now": EKDLoss(),
            "at_revision": old_losses.EKDLoss(),
            "ce_only": EKDLoss(mode="ddnn"),
        }
        own = {name: leaves(outputs) for name in losses}

        def call(name: str) -> Tensor:
            logits, features = own[name]
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                total = losses[name].terms(logits, features, y).total
            total.backward()
            return total

        totals = {name: call(name) for name in ("now", "at_revision")}
        pairs = [(totals["now"], totals["at_revision"])]
        pairs += [
            (a.grad, b.grad)
            for a, b in zip(_tensors(own["now"]), _tensors(own["at_revision"]), strict=True)
        ]
        for now, then in pairs:  # a stage output no term reads has no gradient on either side
            rtol = 1e-5 if now is None else max(1e-5, torch.finfo(now.dtype).eps)
            if (now is None) != (then is None) or (
                now is not None and not torch.allclose(now, then, rtol=rtol, atol=1e-5)
            ):
                raise SystemExit(
                    f"error: the EKD loss at {args.against} and now differ (total or a "
                    "gradient beyond 1e-5 or its dtype's rounding): timing them would compare "
                    "different losses"
                )
        fns = {name: (lambda name=name: call(name)) for name in losses}
        rounds = []
        for _ in range(args.rounds):
            times, _ = time_interleaved(fns, repeats=args.calls, warmup=args.warmup, device=device)
            ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            ratio = (ms["now"] - ms["ce_only"]) / (ms["at_revision"] - ms["ce_only"])
            rounds.append({**{k: round(v, 3) for k, v in ms.items()}, "ratio": round(ratio, 3)})
            print(
                f"EKD loss now {ms['now']:.3f} ms, at {args.against} {ms['at_revision']:.3f} ms, "
                f"CE-only {ms['ce_only']:.3f} ms: distillation now / then = {ratio:.3f}"
            )
    stage_output = outputs[0][1][0]
    result = {
        "distill_new_over_old": [r["ratio"] for r in rounds],
        "ms": rounds,
        "stage_outputs": {  # what the losses were timed on
            "dtype": str(stage_output.dtype).removeprefix("torch."),
            "channels_last": stage_output.is_contiguous(memory_format=torch.channels_last),
        },
        "config": vars(args),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    report_user_errors(main)()  # the library's refusals: one line, as the commands
