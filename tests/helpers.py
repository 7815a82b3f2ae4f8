"""Callbacks the tests inject through Hydra (``+callbacks.<name>._target_=tests.helpers...``)."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtEpochStart(Callback):
    """SIGKILL this process when epoch ``epoch`` starts (the previous epoch's checkpoint is
    on disk by then): a crash nothing can intercept."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
