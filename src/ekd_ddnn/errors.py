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
from pathlib import Path
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


def check_group_choices(args: list[str], config_dir: str | Path) -> None:
    """Reject ``group=option`` overrides naming no config file, in one line.

    Hydra reports an unknown option over many lines (search paths, a hint about
    ``HYDRA_FULL_ERROR``); this check runs first and names the valid options instead.
    """
    for arg in args:
        key, sep, value = arg.lstrip("+").partition("=")
        group = Path(config_dir) / key
        if not sep or key.startswith("hydra") or not group.is_dir():
            continue
        options = sorted(p.stem for p in group.glob("*.yaml") if not p.stem.startswith("_"))
        for choice in value.split(","):  # multirun: a,b,c
            if choice and choice != "null" and choice not in options:
                raise UserError(f"unknown {key} {choice!r}; choose one of: {', '.join(options)}")


def check_override_syntax(args: list[str]) -> None:
    """Exit with status 2 and one line when an override does not parse (Hydra's grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    for arg in args:
        if arg.startswith("-"):
            continue
        try:
            OverridesParser.create().parse_overrides([arg])
        except OverrideParseException as exc:
            reason = str(exc).strip().splitlines()[0]
            print(f"error: cannot parse override {arg!r}: {reason}", file=sys.stderr, flush=True)
            sys.exit(2)


def run_app(main: Callable[[], object], config_dir: str | Path) -> None:
    """Run a ``@hydra.main`` entry point after checking its overrides' syntax and groups."""
    check_override_syntax(sys.argv[1:])
    try:
        check_group_choices(sys.argv[1:], config_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    main()
