"""Building the Lightning Trainer the commands run."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from ekd_ddnn.errors import UserError
from ekd_ddnn.run.checkpoint_io import SafeCheckpointIO


def build_trainer(trainer_cfg: DictConfig, **kwargs: Any) -> L.Trainer:
    """Instantiate the Trainer; a setting the machine cannot satisfy is a user error."""
    trainer_cfg = trainer_cfg.copy()
    with open_dict(trainer_cfg):
        precision = trainer_cfg.pop("float32_matmul_precision", None)
    if precision is not None:  # TF32 on Ampere and later GPUs (`high`); no effect on a CPU
        torch.set_float32_matmul_precision(precision)
    try:
        return instantiate(trainer_cfg, plugins=[SafeCheckpointIO()], **kwargs)
    except Exception as exc:
        cause = exc.__cause__ or exc
        if type(cause).__name__ == "MisconfigurationException" or isinstance(cause, ValueError):
            reason = str(cause).strip().splitlines()[0]
            raise UserError(f"cannot set up the trainer: {reason}; check trainer.*") from None
        raise
