"""Safe checkpoint reading: weights-only unpickling and one clear error per failure.

``torch.load(weights_only=True)`` unpickles only tensors and plain containers, so a crafted
file cannot run code on load; every object our checkpoints hold (Lightning's state, the
network's builder arguments, the resolved config) is of those types. Nothing read from a
checkpoint is instantiated unless it names a class of ours (:func:`data_config`).
"""

from __future__ import annotations

import errno
import inspect
import os
import stat
from pathlib import Path
from typing import Any

import torch

from ekd_ddnn.errors import UserError
from ekd_ddnn.models import DepthDynamicNet, build_net
from ekd_ddnn.run.checks import check_types


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Any torch checkpoint file, read weights-only; every way it can fail is one line."""
    path = Path(path)
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            raise UserError(
                f"checkpoint {path} is a directory; pass the file, e.g. "
                f"{path}/checkpoints/last.ckpt"
            )
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise UserError(
            f"checkpoint {path} does not exist; pass ckpt_path=<run dir>/checkpoints/last.ckpt"
        ) from None
    except OSError as exc:  # a folder on the way or the file itself
        reason = "permission denied" if exc.errno == errno.EACCES else exc.strerror
        raise UserError(
            f"cannot read checkpoint {path}: {reason}; check the file's permissions"
        ) from None
    try:
        # the names a weights-only load refuses, whatever words this torch version uses
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path))
    except Exception:  # not a zip: truncated, garbage, or a legacy format
        unsafe = []
    if unsafe:
        raise UserError(
            f"checkpoint {path} was refused: it holds a Python object ({', '.join(unsafe)}) that "
            "would run code on load; only load checkpoints written by ekd-ddnn"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, wrong format
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        raise UserError(
            f"checkpoint {path} is truncated or corrupt ({reason}); copy it again or use "
            "another checkpoint"
        ) from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a training checkpoint (it holds a {type(ckpt).__name__})")
    return ckpt


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an ekd-ddnn (Lightning) checkpoint without executing code from it, and check the
    parts its readers use (:func:`check_contents`)."""
    ckpt = read_checkpoint(path)
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or "net_config" not in hparams or "state_dict" not in ckpt:
        raise UserError(
            f"{path} is not an ekd-ddnn training checkpoint (no network description); "
            "use a checkpoints/*.ckpt file written by `python -m ekd_ddnn.train`"
        )
    check_contents(ckpt, path)
    return ckpt


# what evaluate, export, select and the front read of a checkpoint, in the user's words
_PARTS = {"net_config": "network description", "loss": "loss description", "config": "run config"}


def check_contents(ckpt: dict[str, Any], path: str | Path) -> None:
    """Refuse, in one line, a checkpoint whose weights or settings its readers cannot use:
    weights, network description, loss description or run config that are not mappings, or a
    network with settings ``build_net`` lacks (a later release's, or a hand edit)."""
    parts = {"state_dict": ckpt["state_dict"]}
    parts |= {key: ckpt["hyper_parameters"].get(key, {}) for key in _PARTS}
    for key, part in parts.items():
        if not isinstance(part, dict):
            what = _PARTS.get(key, "state dict (the weights)")
            raise UserError(f"checkpoint {path}: its {what} is not a mapping")
    arguments = inspect.signature(build_net).parameters
    unknown = set(parts["net_config"]) - set(arguments)
    if unknown:
        raise UserError(
            f"checkpoint {path}: its network has settings this ekd-ddnn does not know "
            f"({', '.join(sorted(map(str, unknown)))}); use the ekd-ddnn release that wrote it"
        )
    required = [name for name, a in arguments.items() if a.default is inspect.Parameter.empty]
    missing = [name for name in required if name not in parts["net_config"]]
    if missing:
        raise UserError(
            f"checkpoint {path}: its network description lacks {', '.join(missing)}; use a "
            "checkpoints/*.ckpt file written by `python -m ekd_ddnn.train`"
        )
    # the types a config's model settings are checked against, build_net's hints
    check_types(parts["net_config"], build_net, f"checkpoint {path}: its network setting ")


def net_from_checkpoint(ckpt: dict[str, Any], path: str | Path) -> DepthDynamicNet:
    """Rebuild the network from the checkpoint's builder arguments (of a checkpoint from
    :func:`load_checkpoint`) and load its weights."""
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


def our_data_classes() -> set[str]:
    """The ``_target_`` names of our data modules (public alias and defining module)."""
    import ekd_ddnn.data as data

    names = set()
    for name in data.__all__:
        cls = getattr(data, name)
        if isinstance(cls, type) and issubclass(cls, data.ImageDataModule):
            names |= {f"ekd_ddnn.data.{name}", f"{cls.__module__}.{cls.__qualname__}"}
    return names


def _targets(node: Any, where: str = "") -> list[tuple[str, Any]]:
    """Every ``(location, _target_)`` in a nested config, at any depth."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                found.append((where or "data", value))
            else:
                found += _targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            found += _targets(value, f"{where}[{i}]")
    return found


def data_config(ckpt: dict[str, Any], override: Any = None) -> Any:
    """The data config to evaluate on: ``override`` (``data=<name>``) or the checkpoint's.

    A checkpoint is a file anyone can hand over, and ``instantiate`` calls whatever a
    ``_target_`` names: the stored config is used only when its one ``_target_`` (at the top)
    is a data module of ours and nothing inside it names another.
    """
    if override:
        return override
    data_cfg = (ckpt["hyper_parameters"].get("config") or {}).get("data")
    if not data_cfg:
        raise UserError("the checkpoint records no data; pass data=<name> and data.data_dir=...")
    targets = _targets(data_cfg)
    ours = our_data_classes()
    if (
        not isinstance(data_cfg, dict)
        or any(where != "data" or target not in ours for where, target in targets)
        or not targets
    ):
        names = ", ".join(str(t) for _, t in targets) or "none"
        raise UserError(
            f"the checkpoint names an unknown data class ({names}); pass data=<name> "
            "(digits, cifar10, cifar100, imagenet, synthetic) and data.data_dir=..."
        )
    return data_cfg
