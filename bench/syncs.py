"""Host-device synchronisations per training step of a real Lightning run (issue 15).

On a GPU a step that waits for the device stalls the queue of kernels behind it. This trains
``EKDModule`` under a ``lightning.Trainer`` as ``train`` does (the configs' progress bar,
on-device synthetic batches, bf16-mixed and channels_last on CUDA) and counts per global
step the synchronizing CUDA calls (``torch.cuda.set_sync_debug_mode("warn")``); on the CPU,
where nothing waits, it counts the Python reads of a tensor (``item``, ``bool``, ...) instead,
as ``tests/test_train.py`` does. The steps that log (every ``--log-every``) read twice (the
divergence check and the progress bar's loss); the target for the others is none. CUDA's
count is what PyTorch's sync debug mode instruments (not the caching allocator's own
``cudaMalloc`` / ``cudaFree``).

``--reduce-overhead`` then compiles the blocks with CUDA graphs (``model.compile_mode``) and
evaluates twice: through the module, which evaluates eager under that mode, and through the
compiled net itself under ``torch.no_grad``; each is reported as ok or by its error's first
line. The last line printed is one JSON object.

    python bench/syncs.py --device cuda --reduce-overhead
"""

from __future__ import annotations

import argparse
import functools
import json
import warnings
from collections import Counter
from collections.abc import Sequence

import lightning as L
import torch
from settings import add_device_argument, at_least, check_device, subnets
from torch import Tensor

from ekd_ddnn.callbacks import LossProgressBar
from ekd_ddnn.data.synthetic import SyntheticDataModule
from ekd_ddnn.losses import EKDLoss
from ekd_ddnn.models import build_net
from ekd_ddnn.module import EKDModule
from ekd_ddnn.run.cli import report_user_errors

READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class SyncCounter(L.Callback):
    """Counts, per global step, the synchronizing CUDA calls (CUDA) or the tensor reads (CPU)
    from a training batch's start to the next one's or the epoch's end: the hooks after a
    batch (the progress bar's, Lightning's logger connector's) belong to its step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.per_step: Counter[int] = Counter()
        self.step: int | None = None
        self._caught: warnings.catch_warnings | None = None
        self._records: list[warnings.WarningMessage] = []
        self._originals = {name: getattr(Tensor, name) for name in READS}

    def on_train_start(self, trainer: L.Trainer, *args: object) -> None:
        if self.device.type == "cuda":
            return
        for name, original in self._originals.items():

            def counted(tensor: Tensor, *a: object, _original=original, **k: object) -> object:
                if self.step is not None:
                    self.per_step[self.step] += 1
                return _original(tensor, *a, **k)

            setattr(Tensor, name, counted)

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self._close()
        self.step = trainer.global_step
        if self.device.type == "cuda":
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_epoch_end(self, trainer: L.Trainer, *args: object) -> None:
        self._close()  # the epoch's end (a divergence check) is no step's

    def on_train_end(self, trainer: L.Trainer, *args: object) -> None:
        self._close()
        for name, original in self._originals.items():
            setattr(Tensor, name, original)

    def on_exception(self, trainer: L.Trainer, *args: object) -> None:
        self.on_train_end(trainer)  # no patched method or debug mode left behind

    def _close(self) -> None:
        """End the current step's count."""
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            syncs = [r for r in self._records if "synchroniz" in str(r.message)]
            self.per_step[self.step] += len(syncs)
            self._caught.__exit__(None, None, None)
            self._caught = None
        self.step = None


def count_syncs(args: argparse.Namespace, device: torch.device) -> dict:
    """Train ``args.steps`` steps; the syncs per step, split into logging and other steps."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    net = build_net(args.arch, subnets=args.subnets, image_size=args.image_size, channels_last=cuda)
    net.check_input(args.batch_size)
    data = SyntheticDataModule(
        image_size=args.image_size,
        num_train=args.batch_size * args.steps,
        batch_size=args.batch_size,
        on_device=True,
    )
    module = EKDModule(net, EKDLoss(), optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    counter = SyncCounter(device)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=args.steps,
        log_every_n_steps=args.log_every,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[counter, LossProgressBar()],
    )
    trainer.fit(module, datamodule=data)
    steps = range(1, args.steps)  # the first step: cuDNN's and the allocator's first calls
    logging = [s for s in steps if (s + 1) % args.log_every == 0]
    return {
        "what": "synchronizing CUDA calls" if cuda else "tensor reads (CPU)",
        "per_step": {str(s): counter.per_step[s] for s in steps},
        "logging_steps": sum(counter.per_step[s] for s in logging),
        "other_steps": sum(counter.per_step[s] for s in steps if s not in logging),
    }


def first_line(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def evaluate_reduce_overhead(args: argparse.Namespace, device: torch.device) -> dict:
    """One evaluation of blocks compiled with ``reduce-overhead``: through the module (eager
    under that mode) and through the compiled net itself; logits against the eager net's."""
    torch.manual_seed(0)
    eager = build_net(args.arch, subnets=args.subnets, image_size=args.image_size).to(device)
    compiled = build_net(
        args.arch,
        subnets=args.subnets,
        image_size=args.image_size,
        compile=True,
        compile_mode="reduce-overhead",
    ).to(device)
    compiled.load_state_dict(eager.state_dict())
    module = EKDModule(compiled, EKDLoss()).to(device).eval()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with torch.no_grad():
        want = [logits for logits, _ in eager.eval().forward_depths(x, eager.depths)]
        result = {}
        for name, run in (
            ("module", lambda: module.eval_logits(x)),
            ("compiled_net", lambda: [lg for lg, _ in compiled.forward_depths(x, eager.depths)]),
        ):
            try:
                run()  # recorded; the second call replays (and frees the first's outputs)
                got = run()
                diff = max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
                result[name] = f"ok, max logit difference {diff:.2e}"
            except Exception as error:  # reported, not raised: this is what the bench measures
                result[name] = first_line(error)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(parser, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="cifar_resnet20")
    parser.add_argument("--subnets", type=subnets, default=[[2, 2, 2], [1, 1, 1]])
    parser.add_argument("--batch-size", type=at_least(1), default=128)
    parser.add_argument("--image-size", type=at_least(1), default=32)
    parser.add_argument("--steps", type=at_least(2), default=25, help="steps (2 onwards counted)")
    parser.add_argument("--log-every", type=at_least(1), default=10)
    parser.add_argument("--reduce-overhead", action="store_true")
    args = parser.parse_args(argv)
    check_device(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run, print the per-step counts and return the result (the JSON line)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    result = {"syncs": count_syncs(args, device)}
    syncs = result["syncs"]
    print(f"{syncs['what']} per step (steps 2-{args.steps}): {syncs['per_step']}")
    print(f"logging steps {syncs['logging_steps']}, other steps {syncs['other_steps']}")
    if args.reduce_overhead:
        result["reduce_overhead_eval"] = evaluate_reduce_overhead(args, device)
        for name, outcome in result["reduce_overhead_eval"].items():
            print(f"reduce-overhead evaluation through {name}: {outcome}")
    result["config"] = vars(args) | {"torch": torch.__version__}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    report_user_errors(main)()  # the library's refusals: one line, as the commands
