"""The command-line wrapper every ``python -m ekd_ddnn.<command>`` runs through.

Before Hydra starts (:func:`run_app`): overrides must parse (exit 2), name existing config
options and keys, compose, and the run directory must be writable; ``resume=<dir>`` reuses
the run's recorded overrides. Inside the Hydra job (:func:`command`): the command's own
checks, then the run-directory lock and record, then the work; a :class:`UserError`
anywhere becomes one ``error:`` line on stderr and exit status 1.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf, open_dict

from ekd_ddnn import CONFIG_DIR
from ekd_ddnn.errors import DivergedError, UserError, find_user_error
from ekd_ddnn.results import read_overrides
from ekd_ddnn.run.rundir import holds_run, run_dir_lock, run_output, write_record

T = TypeVar("T")


def _one_line(error: UserError) -> str:
    """The message; an error re-raised from a DataLoader worker carries the worker's
    traceback in its text, of which the last line is the message."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(error):
        return re.sub(r"^[\w.]*Error: ", "", lines[-1].strip())
    return lines[0] if lines else type(error).__name__


def fail(message: str, code: int = 1) -> None:
    """Print ``error: <message>`` on stderr (and into the run's log file) and exit."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    record = logging.LogRecord("ekd_ddnn", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    sys.exit(code)


# Lines of Lightning's that tell our users nothing, by (logger, message start); everything
# else is shown. `verbose=true` shows these too.
QUIET_LOGS = (("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),)
# Warnings by (message regex, module regex), the same narrow way
QUIET_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities"),
)


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(
            record.name.startswith(name) and message.startswith(start) for name, start in QUIET_LOGS
        )


def route_logs_to_run_log(verbose: bool = False) -> None:
    """Send Lightning's messages and Python warnings through the root logger, which Hydra
    writes to the console and to the run's log file; drop the known noise unless
    ``verbose``. Lightning gives its loggers a console handler of their own when imported
    before logging is configured (so nothing of theirs reached the file); it is removed."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith("lightning")]
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)
    if verbose:
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Quiet) for f in handler.filters):
            handler.addFilter(_Quiet())
    for message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)


def report_user_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate an entry point: a :class:`UserError` becomes one stderr line and exit code 1.
    Everything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            user_error = find_user_error(exc)
            if user_error is None:
                raise
            fail(_one_line(user_error))

    return wrapper


def _rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) or 0


def _folders(root: Path) -> set[Path]:
    """The folders one and two levels under ``root`` (where loggers make theirs, e.g.
    ``csv/version_0``): a shallow look, as a run directory may hold a large tree."""
    return {p for pattern in ("*", "*/*") for p in root.glob(pattern) if p.is_dir()}


def _remove_folders(folders: set[Path]) -> None:
    """Remove ``folders`` (those a refused command made in its locked run directory: a
    logger's, with the hyperparameters it wrote at the start) and what they hold."""
    for folder in folders:
        if folder.parent not in folders:
            shutil.rmtree(folder, ignore_errors=True)


def command(
    check: Callable[[DictConfig], None] | None = None, *, run_dir: bool = True
) -> Callable[[Callable[[DictConfig], T]], Callable[[DictConfig], T]]:
    """Wrap a Hydra task function: ``check(cfg)``, then (commands with a run directory)
    lock it, refuse one that already holds a run (unless ``resume``), write the run's
    record; then run the task. A task that refuses its config before it wrote any output
    (a :class:`UserError` from building the network, data, ...: no checkpoint or result
    written or changed) takes its record back: the directory holds no record of a run, or
    of a resumption, that never ran.

    Ranks other than 0 of a DDP run share rank 0's directory and skip all but the check.
    """

    def decorate(fn: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
        @functools.wraps(fn)
        @report_user_errors
        def wrapper(cfg: DictConfig) -> T:
            route_logs_to_run_log(bool(cfg.get("verbose")))
            if check is not None:
                check(cfg)
            if not run_dir or _rank() != 0:
                return fn(cfg)
            out = Path(cfg.paths.output_dir)
            resumed = bool(cfg.get("resume"))
            with run_dir_lock(out):
                if not resumed and holds_run(out):
                    raise UserError(
                        f"run directory {out} already holds a run; continue it with "
                        f"resume={out}, or choose another hydra.run.dir"
                    )
                output = run_output(out)
                folders = _folders(out)
                record = write_record(cfg, out, resumed=resumed)
                try:
                    return fn(cfg)
                except Exception as exc:
                    refusal = find_user_error(exc)
                    if (
                        refusal is not None
                        and not isinstance(refusal, DivergedError)
                        and run_output(out) == output  # refused before it wrote anything
                    ):
                        shutil.rmtree(record, ignore_errors=True)
                        _remove_folders(_folders(out) - folders)
                    raise

        return wrapper

    return decorate


# ------------------------------------------------------------------ before Hydra starts


def check_override_syntax(args: list[str]) -> list[Any]:
    """Parse the overrides (Hydra's grammar); exit 2 with one line when one does not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parsed = []
    for arg in args:
        if arg.startswith("-"):
            continue
        try:
            parsed += OverridesParser.create().parse_overrides([arg])
        except OverrideParseException as exc:
            fail(f"cannot parse override {arg!r}: {str(exc).strip().splitlines()[0]}", 2)
    return parsed


# Hydra's command-line flags that take a value (the next argument)
VALUE_FLAGS = ("-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name")


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the overrides)."""
    flags, overrides = [], []
    take_value = False
    for arg in args:
        if take_value or arg.startswith("-"):
            flags.append(arg)
            take_value = not take_value and arg in VALUE_FLAGS
        else:
            overrides.append(arg)
    return flags, overrides


def user_config_dirs(flags: list[str]) -> list[Path]:
    """Folders of the user's own configs (``--config-dir`` / ``-cd``), searched before ours."""
    dirs = []
    for i, flag in enumerate(flags):
        if flag in ("-cd", "--config-dir") and i + 1 < len(flags):
            dirs.append(Path(flags[i + 1]).resolve())
        elif flag.startswith("--config-dir="):
            dirs.append(Path(flag.partition("=")[2]).resolve())
    return dirs


def check_group_choices(args: list[str], config_dirs: list[Path] | None = None) -> None:
    """Reject ``group=option`` overrides naming no config file, naming the valid options."""
    dirs = [Path(CONFIG_DIR), *(config_dirs or [])]
    for arg in args:
        key, sep, value = arg.lstrip("+").partition("=")
        groups = [d / key for d in dirs if (d / key).is_dir()]
        if not sep or key.startswith("hydra") or not groups:
            continue
        options = sorted(
            {p.stem for g in groups for p in g.glob("*.yaml") if not p.stem.startswith("_")}
        )
        for choice in value.split(","):  # multirun: a,b,c
            if choice and choice != "null" and choice not in options:
                raise UserError(f"unknown {key} {choice!r}; choose one of: {', '.join(options)}")


def _unknown_key_message(cfg_keys: DictConfig | None, full_key: str) -> str:
    """``unknown key a.b`` with the closest existing key of its parent, where there is one."""
    parent, _, leaf = full_key.rpartition(".")
    hint = ""
    if isinstance(cfg_keys, DictConfig):
        node = OmegaConf.select(cfg_keys, parent) if parent else cfg_keys
        if isinstance(node, DictConfig):
            keys = {str(k).lower(): str(k) for k in node}  # case too: ekd.W -> ekd.w
            close = difflib.get_close_matches(leaf.lower(), list(keys), n=1)
            if close:
                hint = f"; did you mean {parent + '.' if parent else ''}{keys[close[0]]}?"
    return (
        f"unknown key {full_key}{hint} (to add a new key on purpose: +{full_key}=...)"
        if hint
        else f"unknown key {full_key}; check the spelling (to add a new key: +{full_key}=...)"
    )


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


def check_composes(config_name: str, parsed: list[Any]) -> DictConfig:
    """Compose the config as Hydra will (a sweep by its first value); one line if it fails."""
    from hydra.errors import ConfigCompositionException

    overrides = []
    for o in parsed:
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()), None)
            overrides.append(f"{o.get_key_element()}={first}")
        else:
            overrides.append(o.input_line)
    try:
        return _compose(config_name, overrides)
    except ConfigCompositionException as exc:
        cause = exc.__cause__
        full_key = getattr(cause, "full_key", None)
        if full_key and "not in struct" in str(cause):
            keep = [o for o in overrides if not o.lstrip("+~").startswith(full_key + "=")]
            try:
                base = _compose(config_name, keep)
            except ConfigCompositionException:
                base = None
            raise UserError(_unknown_key_message(base, full_key)) from None
        lines = str(exc).strip().splitlines()
        raise UserError(f"cannot compose the config: {lines[0] if lines else exc}") from None


def check_writable_dir(path: Path, what: str) -> None:
    """``path`` can be created (or exists) as a directory we may write into."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{what} {path}: {probe} is a file, not a directory; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(
            f"{what} {path} is not writable ({probe} is read-only or not yours); "
            "choose another path"
        )


@contextlib.contextmanager
def _hydra_runtime(cfg: DictConfig) -> Iterator[None]:
    """Resolve ``${hydra:...}`` of a config composed outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    with open_dict(cfg):
        cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig().set_config(cfg)
    try:
        yield
    finally:
        HydraConfig.instance().cfg = None


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def _within(key: str, other: str) -> bool:
    """``key`` is ``other`` or lies inside it (``callbacks.kill.epoch`` in ``callbacks.kill``)."""
    return key == other or key.startswith(other + ".")


def _resume_dir(config_name: str, args: list[str]) -> Path | None:
    """The run directory ``resume=`` names (``latest``: the newest run with a checkpoint)."""
    value = next((a.partition("=")[2] for a in reversed(args) if a.startswith("resume=")), None)
    if value in (None, "", "null"):
        return None
    if value != "latest":
        return Path(value)
    try:  # `latest` depends on the log folder and task: compose without deletions
        cfg = _compose(config_name, [a for a in args if a[:1] not in ("-", "~")])
    except Exception:
        return None  # the full compose below reports what is wrong
    with _hydra_runtime(cfg):
        return Path(cfg.hydra.run.dir)


def with_recorded_overrides(run_dir: Path, args: list[str]) -> list[str]:
    """``resume=<dir>``: the run's recorded overrides first, those given now on top.

    A recorded override is dropped where one given now sets the same key (or a key above
    it); ``~key`` of a key that only the recorded overrides added is that dropping.
    """
    recorded = [o for o in read_overrides(run_dir) if not _key(o).startswith("hydra")]
    given = {_key(a) for a in args if not a.startswith("-")}
    previous = [o for o in recorded if not any(_within(_key(o), k) for k in given)]
    added = [_key(o) for o in recorded if o.startswith("+")]
    kept = [a for a in args if not (a.startswith("~") and any(_within(k, _key(a)) for k in added))]
    return [*previous, *kept]


def preflight(config_name: str, args: list[str]) -> list[str]:
    """Every check that needs no Hydra job; returns the arguments to run Hydra with."""
    flags, args = split_args(args)
    dirs = user_config_dirs(flags)
    check_override_syntax(args)
    check_group_choices(args, dirs)
    # composed here as Hydra will compose it: --config-dir adds to the search path
    search = (
        [f"hydra.searchpath=[{','.join(f'file://{d}' for d in dirs)}]"]
        if dirs and not any(a.startswith("hydra.searchpath=") for a in args)
        else []
    )
    multirun = any(a in ("-m", "--multirun") for a in flags)
    resume = None if multirun else _resume_dir(config_name, [*args, *search])
    if resume is not None:
        if not (resume / "checkpoints" / "last.ckpt").is_file():
            raise UserError(
                f"nothing to resume: {resume}/checkpoints/last.ckpt does not exist; pass "
                "resume=<run dir> of a run that saved a checkpoint (or resume=latest)"
                if not any(a == "resume=latest" for a in args)
                else f"nothing to resume: no run in {resume.parent} has checkpoints/last.ckpt; "
                "start a new run without resume="
            )
        args = with_recorded_overrides(resume, args)
    cfg = check_composes(config_name, check_override_syntax([*args, *search]))
    multirun = multirun or cfg.hydra.mode == "MULTIRUN"
    with _hydra_runtime(cfg):
        run_dir = Path(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)
    check_writable_dir(run_dir, "run directory")
    return [*flags, *args]


def run_app(main: Callable[[], object], config_name: str) -> None:
    """Run a ``@hydra.main`` entry point after :func:`preflight`."""
    try:
        sys.argv[1:] = preflight(config_name, sys.argv[1:])
    except UserError as exc:
        fail(_one_line(exc))
    main()
