"""Lightning's checkpoint IO, made safe: atomic same-directory writes, weights-only reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ekd_ddnn.run.checkpoint import read_checkpoint
from ekd_ddnn.run.files import write_atomically


class SafeCheckpointIO(TorchCheckpointIO):
    """Every checkpoint Lightning saves or loads (best, last, interrupted, ``ckpt_path=``).

    Saving goes through :func:`~ekd_ddnn.run.files.write_atomically` (temporary file in the
    checkpoint's own directory, fsync, rename): a kill or a full disk keeps the previous
    checkpoint whole on any filesystem. Loading goes through
    :func:`~ekd_ddnn.run.checkpoint.read_checkpoint`: weights-only, and one line for a missing,
    unreadable, corrupt or code-running file.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_checkpoint(path)
