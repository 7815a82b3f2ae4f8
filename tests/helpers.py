"""Callbacks the tests inject through Hydra (``+callbacks.<name>._target_=tests.helpers...``)."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAtEpochStart(Callback):
    """Send this process ``signum`` (default SIGKILL, a crash nothing can intercept) when
    epoch ``epoch`` starts; the previous epoch's checkpoint is on disk by then."""

    def __init__(self, epoch: int, signum: int = signal.SIGKILL) -> None:
        self.epoch = epoch
        self.signum = signum

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), self.signum)


class KillDuringSave(Callback):
    """SIGKILL this process half-way through writing the first checkpoint of epoch
    ``epoch``: the checkpoint file's bytes are half on disk when the process dies."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch:
            return
        import io

        import torch

        real_save = torch.save

        def save_half_then_die(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_half_then_die


class FillDiskAtEpochStart(Callback):
    """Fill the filesystem of the run directory at the start of epoch ``epoch``, leaving
    ``leave_kib`` KiB: enough for log lines, too little for a checkpoint."""

    def __init__(self, epoch: int, leave_kib: int = 256) -> None:
        self.epoch = epoch
        self.leave_kib = leave_kib

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch:
            return
        stats = os.statvfs(trainer.default_root_dir)
        free = stats.f_bavail * stats.f_frsize - self.leave_kib * 1024
        with open(os.path.join(trainer.default_root_dir, "filler.bin"), "wb") as f:
            while free > 0:
                chunk = min(free, 1 << 20)
                f.write(b"\0" * chunk)
                free -= chunk


class PoisonWeightsAtEpochStart(Callback):
    """Set one weight to NaN when epoch ``epoch`` starts: the next loss is NaN (a stand-in
    for a run that diverges after its first checkpoints)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            import torch

            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


class RefuseAtEpochStart(Callback):
    """Raise a UserError when epoch ``epoch`` starts: a refusal that comes after a run (or a
    resumption) may already have written checkpoints."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            from ekd_ddnn.errors import UserError

            raise UserError(f"refused at epoch {self.epoch}")


class RecordTrainLoader(Callback):
    """Write ``<run dir>/train_loader.txt``: the training loader's type and the device and
    dtype of the first training batch (what a subprocess run fed its steps with)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0 and trainer.current_epoch == 0:
            images, _ = batch
            line = f"{type(trainer.train_dataloader).__name__} {images.device} {images.dtype}\n"
            with open(os.path.join(trainer.default_root_dir, "train_loader.txt"), "w") as f:
                f.write(line)


class RecordShard(Callback):
    """Write ``<run dir>/shard_rank<r>.txt`` at each training epoch's start: the image indices
    the on-device loader of rank ``r`` takes that epoch, one line per epoch."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        index, _, _ = trainer.train_dataloader.sampler.draw()
        path = os.path.join(trainer.default_root_dir, f"shard_rank{trainer.global_rank}.txt")
        with open(path, "a") as f:
            f.write(" ".join(map(str, index.tolist())) + "\n")
