"""Safe checkpoint loading: weights-only unpickling and one clear error per failure.

``torch.load(weights_only=True)`` unpickles only tensors and plain containers, so a crafted
file cannot run code on load; every object our checkpoints hold (Lightning's state, the
network's builder arguments, the resolved config) is of those types.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ekd_ddnn.errors import UserError
from ekd_ddnn.losses import EKDLoss
from ekd_ddnn.models import DepthDynamicNet, build_net


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an ekd-ddnn (Lightning) checkpoint without executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"checkpoint {path} does not exist; pass ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:  # not a pickle of ours at all
            raise UserError(
                f"checkpoint {path} is truncated or corrupt: not a torch file"
            ) from None
        raise UserError(
            f"checkpoint {path} was refused: it holds a Python object ({found.group(1)}) that "
            "would run code on load; only load checkpoints written by ekd-ddnn"
        ) from None
    except Exception as exc:  # truncated zip, garbage bytes, wrong format
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"checkpoint {path} is truncated or corrupt ({reason}); copy it again or use "
            "another checkpoint"
        ) from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "net_config" not in hparams or "state_dict" not in ckpt:
        raise UserError(
            f"{path} is not an ekd-ddnn training checkpoint (no network description); "
            "use a checkpoints/*.ckpt file written by `python -m ekd_ddnn.train`"
        )
    return ckpt


def net_from_checkpoint(ckpt: dict[str, Any], path: str | Path) -> DepthDynamicNet:
    """Rebuild the network from the checkpoint's builder arguments and load its weights."""
    config = dict(ckpt["hyper_parameters"]["net_config"])
    config.pop("weights_path", None)
    config.pop("compile", None)  # evaluation and export run eager
    net = build_net(**config)
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[1 if "\n" in str(exc) else 0].strip()
        raise UserError(
            f"checkpoint {path}: its weights do not fit its {config.get('arch')} "
            f"{config.get('blocks')} network ({reason})"
        ) from None
    return net.eval()


def loss_from_checkpoint(ckpt: dict[str, Any]) -> EKDLoss:
    """The loss settings the checkpoint was trained with (they decide the trained depths)."""
    return EKDLoss(**ckpt["hyper_parameters"].get("loss", {}))


def data_config(ckpt: dict[str, Any], override: Any = None) -> Any:
    """The data config to evaluate on: ``override`` (``data=<name>``) or the checkpoint's."""
    data_cfg = override or ckpt["hyper_parameters"].get("config", {}).get("data")
    if not data_cfg:
        raise UserError("the checkpoint records no data; pass data=<name> and data.data_dir=...")
    return data_cfg
