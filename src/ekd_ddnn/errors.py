"""The exception types of user-facing errors.

A mistake the user can fix (a wrong depth, a missing dataset, a negative weight) raises
:class:`UserError`; the command-line wrapper (``ekd_ddnn.run.cli``) prints its message as one
``error:`` line and exits with status 1. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class UserError(Exception):
    """A mistake in the user's input; its message says what is wrong and how to fix it."""


class InvalidDepthError(UserError, ValueError):
    """A depth (per-stage block counts) that the network cannot run."""


def find_in_chain(exc: BaseException | None, kind: type[E]) -> E | None:
    """The first exception of ``kind`` in ``exc``'s cause/context chain (Hydra, Lightning and
    torch wrap the errors they pass on)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The first :class:`UserError` in ``exc``'s cause/context chain."""
    return find_in_chain(exc, UserError)


class DivergedError(UserError):
    """Training produced a non-finite loss: the run is stopped and gives no results."""
