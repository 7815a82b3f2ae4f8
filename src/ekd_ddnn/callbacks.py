"""Lightning callbacks of our own."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar, TQDMProgressBar

from ekd_ddnn.errors import find_user_error


class InterruptCheckpoint(Callback):
    """Save the exact training state when training stops on SIGTERM or an error.

    What Lightning's ``OnExceptionCheckpoint`` does, except where there is nothing to save:
    before the first optimizer step, or when the user's input was wrong (a missing dataset
    found while fitting starts, a diverged loss), no checkpoint is written. Not a subclass of
    it: with one of those present, Lightning silently turns ``fit(ckpt_path=None)`` into
    ``ckpt_path="last"`` (resuming whatever checkpoint it finds, with two warnings), and
    deletes the saved file when a later run ends.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted") -> None:
        self.dirpath = dirpath
        self.filename = filename

    @property
    def ckpt_path(self) -> str:
        """Where the checkpoint is written."""
        return os.path.join(self.dirpath, f"{self.filename}.ckpt")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.global_step == 0 or find_user_error(exception) is not None:
            return
        trainer.save_checkpoint(self.ckpt_path)


class _LoggedLossBar:
    """A progress bar's metrics with the training loss of the last logging step.

    The loss is a number the module keeps on the host (``EKDModule.last_logged_loss``, set on
    the logging steps, which read the device anyway), not a progress-bar value logged with
    ``self.log(prog_bar=True)``: Lightning reads such a tensor back with ``.item()`` at the
    end of every step until the epoch ends, and on a GPU each read waits for the device.
    """

    def get_metrics(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        loss = getattr(pl_module, "last_logged_loss", None)
        if loss is not None:
            items["loss"] = loss
        return items


class LossProgressBar(_LoggedLossBar, RichProgressBar):
    """Lightning's rich progress bar, with the loss of the last logging step."""


class LossTQDMProgressBar(_LoggedLossBar, TQDMProgressBar):
    """Lightning's plain-text (tqdm) progress bar, with the loss of the last logging step:
    for logs that are not a terminal (``callbacks.rich_progress_bar._target_=
    ekd_ddnn.callbacks.LossTQDMProgressBar``)."""
