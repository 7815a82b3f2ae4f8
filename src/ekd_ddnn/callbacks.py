"""Lightning callbacks of our own."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from ekd_ddnn.errors import find_user_error


class InterruptCheckpoint(OnExceptionCheckpoint):
    """Save the exact training state when training stops on SIGTERM or an error.

    Lightning's ``OnExceptionCheckpoint``, except where there is nothing to save: before the
    first optimizer step, or when the user's input was wrong (a missing dataset found while
    fitting starts), no checkpoint is written, so the run directory stays free of output.
    """

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.global_step == 0 or find_user_error(exception) is not None:
            return
        super().on_exception(trainer, pl_module, exception)
