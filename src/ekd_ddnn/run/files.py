"""Atomic, link-safe file writing: the only way our commands write a file a user keeps.

Every file is written to a fresh temporary file (``tempfile.mkstemp``: unpredictable name,
created exclusively, never a followed link) in the target's own directory, flushed to disk,
and renamed over the target only when complete. A rename within one directory is atomic on
every POSIX filesystem (NFS and cluster scratch included), so a crash, a kill or a full disk
leaves either the old file or the new one, never a partial one; the temporary file is removed
on failure. (Lightning's own save writes to ``$TMPDIR`` and moves the file, which is a copy,
not a rename, when the run directory is on another filesystem.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ekd_ddnn.errors import UserError, find_in_chain


def write_error(path: str | Path, exc: OSError) -> UserError:
    """The one-line message for an OS error while writing ``path``."""
    path = Path(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            f"no space left on {path.parent} while writing {path.name}; the previous files are "
            "kept: free space there or write to another filesystem (hydra.run.dir=..., out=...)"
        )
    reason = exc.strerror or str(exc)
    return UserError(f"cannot write {path}: {reason.lower()}; choose a writable location")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` with ``write(file)`` through a temporary file and a rename.

    ``write`` gets an open binary file; it never sees a path, so nothing follows a link.
    An OS error (no space, read-only, permission) becomes one :class:`UserError` line.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory; give a file path")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what open() would give; mkstemp makes it 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as exc:
        # writers may wrap the OS error (torch.save's zip writer raises a RuntimeError
        # while closing a file the disk could not hold): report the OS error underneath
        os_error = find_in_chain(exc, OSError)
        if os_error is None:
            raise
        raise write_error(path, os_error) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomically(path: str | Path, text: str) -> None:
    """:func:`write_atomically` for a text file (UTF-8)."""
    write_atomically(path, lambda f: f.write(text.encode()))
