"""Building the Lightning Trainer the commands run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, open_dict

from ekd_ddnn.errors import UserError
from ekd_ddnn.run.checkpoint_io import SafeCheckpointIO


@contextlib.contextmanager
def trainer_settings_errors(
    what: str, *, value_errors: bool = False, hint: str = ""
) -> Iterator[None]:
    """Lightning's refusals of a setting (``MisconfigurationException``, and with
    ``value_errors`` its ``ValueError``s) as one-line user errors ``<what>: <reason><hint>``:
    a setting that does not fit the machine or the data (``limit_train_batches`` below one
    batch, ...)."""
    try:
        yield
    except Exception as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, MisconfigurationException) or (
            value_errors and isinstance(cause, ValueError)
        ):
            reason = str(cause).strip().splitlines()[0]
            raise UserError(f"{what}: {reason}{hint}") from None
        raise


def build_trainer(trainer_cfg: DictConfig, **kwargs: Any) -> L.Trainer:
    """Instantiate the Trainer; a setting the machine cannot satisfy is a user error."""
    trainer_cfg = trainer_cfg.copy()
    with open_dict(trainer_cfg):
        precision = trainer_cfg.pop("float32_matmul_precision", None)
    if precision is not None:  # TF32 on Ampere and later GPUs (`high`); no effect on a CPU
        torch.set_float32_matmul_precision(precision)
    setup = trainer_settings_errors(
        "cannot set up the trainer", value_errors=True, hint="; check trainer.*"
    )
    with setup:
        return instantiate(trainer_cfg, plugins=[SafeCheckpointIO()], **kwargs)
