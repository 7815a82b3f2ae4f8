"""User-facing errors and the wrapper that turns them into one line on stderr.

A mistake the user can fix (a wrong depth, a missing dataset, a negative weight) raises
:class:`UserError`. Entry points wrap their task function with :func:`report_user_errors`,
which prints ``error: <message>`` and exits with status 1 instead of a traceback.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the user's input; its message says what is wrong and how to fix it."""


class InvalidDepthError(UserError, ValueError):
    """A depth (per-stage block counts) that the network cannot run."""


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The first :class:`UserError` in ``exc``'s cause/context chain (Hydra wraps errors)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def report_user_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate an entry point: a :class:`UserError` becomes one stderr line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            user_error = find_user_error(exc)
            if user_error is None:
                raise
            print(f"error: {user_error}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapper
