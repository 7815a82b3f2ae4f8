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
