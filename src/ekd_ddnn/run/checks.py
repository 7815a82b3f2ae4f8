"""Configuration checks that run before a command writes anything.

One mechanism per class of mistake: every argument a config passes to a constructor is
checked against that constructor's type hints (a string for a count, a fraction for a block
count, NaN or infinity for a weight); the trainer settings a machine cannot or should not
run; a resumed run's settings against the ones it was trained with.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import os
import types
import typing
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ekd_ddnn.errors import UserError


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint) if a is not type(None))
    if origin in (list, tuple, collections.abc.Sequence):
        return "a list"
    return str(hint)


def _first_mismatch(value: Any, hint: Any, key: str) -> tuple[str, Any, Any] | None:
    """``(key, value, hint)`` of the first part of ``value`` that ``hint`` does not admit;
    annotations it does not know admit anything."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        misses = [_first_mismatch(value, o, key) for o in options if o is not type(None)]
        return None if any(m is None for m in misses) else (misses[0] or (key, value, hint))
    if hint is bool:
        return None if isinstance(value, bool) else (key, value, hint)
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else (key, value, hint)
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok and math.isfinite(value) else (key, value, hint)
    if hint is str:
        return None if isinstance(value, str) else (key, value, hint)
    if origin in (list, tuple, collections.abc.Sequence) and typing.get_args(hint):
        if not isinstance(value, list | tuple):
            return (key, value, hint)
        inner = typing.get_args(hint)[0]
        for i, item in enumerate(value):
            found = _first_mismatch(item, inner, f"{key}[{i}]")
            if found:
                return found
    return None


def _hints(target: Callable) -> dict[str, Any]:
    """Type hints of ``target``'s parameters; a class's ``__init__`` along its bases too
    (subclasses pass ``**kwargs`` on)."""
    hints: dict[str, Any] = {}
    functions = (
        [c.__init__ for c in reversed(target.__mro__) if "__init__" in vars(c)]
        if isinstance(target, type)
        else [target]
    )
    for fn in functions:
        try:
            hints.update(typing.get_type_hints(fn))
        except Exception:  # hints that do not evaluate: nothing to check
            continue
    hints.pop("return", None)
    return hints


def check_arguments(node: DictConfig | None, key: str) -> None:
    """Every argument ``node`` gives its ``_target_`` has the type the target declares;
    every number anywhere in ``node`` is finite."""
    if node is None:
        return
    from hydra.utils import get_method

    values = OmegaConf.to_container(node, resolve=True)
    _check_finite(values, key)
    target = values.get("_target_")
    if not isinstance(target, str):
        return
    try:
        function = get_method(target)
    except Exception:
        return  # an unknown target fails with its own message when built
    check_types(values, function, f"{key}.")


def check_types(values: dict[str, Any], target: Callable, prefix: str) -> None:
    """Every value in ``values`` (a keyword argument of ``target`` by name; ``_``-names and
    names ``target`` does not hint are left alone) has the type ``target``'s hints declare;
    the first that has not is refused in one line that names it after ``prefix``."""
    hints = _hints(target)
    for name, value in values.items():
        if not isinstance(name, str) or name.startswith("_") or name not in hints:
            continue
        found = _first_mismatch(value, hints[name], f"{prefix}{name}")
        if found:
            where, bad, hint = found
            raise UserError(f"{where} must be {_describe(hint)}, got {bad!r}")


def _check_finite(value: Any, key: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")


def check_integer(
    value: Any, key: str, *, minimum: int | None = None, maximum: int | None = None
) -> None:
    """``key`` is an integer (not a bool), at least ``minimum`` and at most ``maximum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"{key} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise UserError(f"{key} must be <= {maximum}, got {value}")


MAX_SEED = 2**32 - 1  # Lightning's seed_everything (numpy) accepts 0 .. 2**32 - 1


def check_seed(value: Any, key: str = "seed") -> None:
    """``key`` is a seed Lightning accepts: an integer in ``0 .. 2**32 - 1``."""
    check_integer(value, key, minimum=0, maximum=MAX_SEED)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch ignores any other with a warning


def check_trainer(trainer: DictConfig, *, allow_cpu_oversubscription: bool = False) -> None:
    """Trainer settings that would train nothing or overload the machine."""
    for key in ("max_epochs", "max_steps"):
        value = trainer.get(key)
        if value is None:
            continue
        check_integer(value, f"trainer.{key}", minimum=-1)
        if value == 0:
            raise UserError(f"trainer.{key}=0 trains nothing; give at least 1 (or -1 for no limit)")
    limit = trainer.get("limit_train_batches")
    if not isinstance(limit, bool) and isinstance(limit, int | float) and limit == 0:
        raise UserError(
            f"trainer.limit_train_batches={limit} trains nothing; give a count >= 1 or a "
            "fraction of the epoch in (0, 1]"
        )
    if trainer.get("max_epochs") == -1 and trainer.get("max_steps", -1) == -1:
        raise UserError(
            "trainer.max_epochs=-1 with trainer.max_steps=-1 never stops; set one of them"
        )
    # counts that must be positive: Lightning divides by the first, the module's logging
    # schedule by the second (a 0 fails mid-run in a traceback)
    for key in ("accumulate_grad_batches", "log_every_n_steps"):
        if trainer.get(key) is not None:
            check_integer(trainer.get(key), f"trainer.{key}", minimum=1)
    precision = trainer.get("float32_matmul_precision")
    if precision is not None and precision not in MATMUL_PRECISIONS:
        raise UserError(
            f"trainer.float32_matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)} "
            f"(torch.set_float32_matmul_precision), got {precision!r}"
        )
    devices = trainer.get("devices")
    count = len(devices) if isinstance(devices, list | tuple) else devices
    if (
        trainer.get("accelerator") == "cpu"
        and isinstance(count, int)
        and count > usable_cores()
        and not allow_cpu_oversubscription
    ):
        raise UserError(
            f"trainer.devices={count} starts {count} CPU processes on {usable_cores()} cores; "
            f"use at most {usable_cores()} (on purpose, e.g. to test DDP: "
            "allow_cpu_oversubscription=true)"
        )


def check_optimizer(node: DictConfig) -> None:
    """The optimizer builds (torch validates its values) and its learning rate is > 0."""
    import torch
    from hydra.utils import instantiate

    check_arguments(node, "optimizer")
    lr = node.get("lr")
    if isinstance(lr, int | float) and lr <= 0:
        raise UserError(f"optimizer.lr must be > 0, got {lr}")
    try:
        instantiate(node)([torch.nn.Parameter(torch.zeros(1))])
    except Exception as exc:
        cause = exc.__cause__ or exc
        if not isinstance(cause, ValueError | TypeError):
            raise
        raise UserError(f"optimizer: {str(cause).splitlines()[0]}; check optimizer.*") from None


# Settings a resumed run may change: how it runs, not what it trains.
RESUMABLE = (
    "trainer.",
    "logger.",
    "callbacks.",
    "paths.",
    "resume",
    "ckpt_path",
    "test",
    "optimized_metric",
    "allow_cpu_oversubscription",
    "verbose",
    "data.data_dir",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.eval_batch_size",
    "data.download",
    "data.on_device",  # the same distribution, other random draws (as data.num_workers)
    "model.compile",
    "model.compile_mode",
    "model.compile_scope",
    "model.channels_last",
    "model.weights_path",
)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def changed_settings(stored: dict, current: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences ``key old -> new`` between two resolved configs."""
    old, new = _flatten(stored), _flatten(current)
    refused, allowed = [], []
    for key in sorted(old.keys() | new.keys()):
        if key == "resume" or old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        line = f"{key} {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}"
        free = any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in RESUMABLE)
        (allowed if free else refused).append(line)
    return refused, allowed
