"""User-facing errors: one clear line and a non-zero exit for what the user can fix; a traceback and a request
to report it for anything else; no empty run directory left behind by a failed run."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import string
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from hydra.errors import HydraException, InstantiationException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffseg_lightning.exceptions import ConfigError, DiffSegError, NonFiniteLossError
from diffseg_lightning.utils.moved_settings import MOVED_KEYS, moved_setting_message

__all__ = ["USER_ERRORS", "ConfigError", "DiffSegError", "NonFiniteLossError", "run_cli", "user_errors"]

#: What :func:`user_errors` reports in one line: only the errors our own checks raise. Any other
#: exception (a ``ValueError`` from inside torch, a bug of ours) keeps its traceback.
USER_ERRORS = (DiffSegError,)

#: The characters Hydra 1.3's override grammar takes in an unquoted value (besides its own syntax: ``,`` makes
#: a sweep, ``[]{}()`` lists, dicts and functions, ``=`` separates the key). Anything else, any non-ASCII
#: letter included, needs a quoted value: ``'key="value"'``.
UNQUOTED = frozenset(string.ascii_letters + string.digits + " _-+./\\:$%*@?|,")

BUG_HINT = "this looks like a bug in DiffSeg, not in your input: please report it with the traceback above"

# What run_cli knows about the run in progress: whether its task function started (so that an error is
# not Hydra's setup of the run) and the run directory it may remove when the run fails.
_cli = {"active": False, "task_started": False, "run_dirs": ()}


def one_line(message: str) -> str:
    """Collapse a (possibly multi-line) message to one line, dropping Hydra's search-path listing."""
    return " ".join(message.split("Config search path")[0].split())


def _exit_with(message: str) -> None:
    message = one_line(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def user_error(err: BaseException) -> str | None:
    """The one-line message of a user error (:data:`USER_ERRORS`, also when raised inside a Hydra
    ``instantiate``), or None for anything else."""
    if isinstance(err, USER_ERRORS):
        return str(err)
    cause: BaseException | None = err
    while isinstance(cause, InstantiationException):
        cause = cause.__cause__
    if cause is not err and isinstance(cause, USER_ERRORS):
        return f"{cause} ({one_line(str(err)).split(':')[0]})"
    return None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors the user can fix into a one-line ``error: ...`` message and exit code 1.

    Covers :class:`DiffSegError` (``ConfigError`` included), also when raised inside a Hydra
    ``instantiate``. Anything else propagates with its traceback (:func:`run_cli` adds a line asking to
    report it). Set ``DIFFSEG_FULL_ERROR=1`` to get the traceback of a user error too.
    """
    if _cli["active"]:
        _cli["task_started"] = True
        _cli["run_dirs"] = removable_run_dirs()
    try:
        yield
    except Exception as err:
        message = user_error(err)
        if message is None or os.environ.get("DIFFSEG_FULL_ERROR"):
            raise
        _exit_with(message)


def run_cli(hydra_main: Callable[[], object]) -> None:
    """Run a ``@hydra.main`` function as a console script.

    - Errors of the command line and config composition (unknown option, missing group, an override Hydra
      cannot parse, with how to quote it), and a run directory Hydra cannot create: one ``error:`` line.
    - Errors of our checks: one line (:func:`user_errors`).
    - Anything else: its traceback, then one line asking to report it; exit code 1.
    - A failed run's directory is removed when it holds nothing but Hydra's own files
      (:func:`removable_run_dirs`).

    Hydra prints its own multi-line report unless ``HYDRA_FULL_ERROR`` is set; we set it so the exception
    reaches us. ``DIFFSEG_FULL_ERROR=1`` lets every exception through untouched.
    """
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    _cli.update(active=True, task_started=False, run_dirs=())
    try:
        hydra_main()
    except SystemExit as exit:
        if exit.code not in (None, 0):
            remove_run_dirs(_cli["run_dirs"])
        raise
    except BaseException as err:
        remove_run_dirs(_cli["run_dirs"])
        if os.environ.get("DIFFSEG_FULL_ERROR") or isinstance(err, KeyboardInterrupt):
            raise
        if not _cli["task_started"]:
            message = setup_error(err)
            if message is not None:
                _exit_with(message)
        traceback.print_exception(err)
        if isinstance(err, OSError):
            hint = "a file-system error: check the path and the free space; if they are fine, " + BUG_HINT
        else:
            hint = BUG_HINT
        print(f"error: {type(err).__name__}: {_first_line(err)} ({hint})", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        _cli.update(active=False, run_dirs=())


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def setup_error(err: BaseException) -> str | None:
    """The one-line message of an error raised before the task function ran, or None when it is not one
    of the command line, the config or the run directory."""
    if isinstance(err, OverrideParseException):
        return override_hint(sys.argv[1:]) or str(err)
    if isinstance(err, HydraException | OmegaConfBaseException):
        return moved_setting_hint(str(err), sys.argv[1:]) or str(err)
    os_error: BaseException | None = err
    while os_error is not None and not isinstance(os_error, OSError):  # logging wraps it in a ValueError
        os_error = os_error.__cause__ or os_error.__context__
    if isinstance(os_error, OSError) and os_error.filename:
        return (
            f"cannot write the run directory: {os_error.strerror}: {os_error.filename} "
            "(it is hydra.run.dir, under paths.log_dir or $DIFFSEG_LOG_DIR: choose a writable folder)"
        )
    return None


def moved_setting_hint(message: str, arguments: list[str]) -> str | None:
    """For Hydra's "Could not override 'noise.sampling'" (no ``noise`` node: ``diffseg-eval``): where the old
    kernel option went (:func:`~diffseg_lightning.utils.moved_settings.moved_setting_message`); else None."""
    for argument in arguments:
        key, _, value = argument.lstrip("+~").partition("=")
        name = key.removeprefix("noise.")
        if name != key and name in MOVED_KEYS and f"'{key}'" in message:
            return moved_setting_message(name, value)
    return None


def override_hint(arguments: list[str]) -> str | None:
    """For the first command-line override Hydra cannot parse: what is wrong and, when quoting its value
    fixes it, the quoted form to type (e.g. ``'data.root="/data/Ärzte"'``); None when every one parses."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()

    def parses(override: str) -> bool:
        try:
            parser.parse_overrides([override])
        except Exception:
            return False
        return True

    for argument in arguments:
        if argument.startswith("-") or "=" not in argument or parses(argument):
            continue
        key, value = argument.split("=", 1)
        quoted = next((q for q in (f'{key}="{value}"', f"{key}='{value}'") if parses(q)), None)
        if quoted is None:
            return f"cannot parse the override {argument}"
        bad = "".join(dict.fromkeys(c for c in value if c not in UNQUOTED))
        return (
            f"cannot parse the override {argument}: {f'{bad!r} needs' if bad else 'it needs'} a quoted value "
            "(Hydra reads an unquoted value only of ASCII letters, digits, spaces and _-+./\\:$%*@?|); type it "
            f"as {shlex.quote(quoted)}"
            + (" (the double quotes for Hydra, the single ones for the shell)" if '"' not in value else "")
        )
    return None


# ------------------------------------------------------------------------------- a failed run's directory
def removable_run_dirs() -> tuple[Path, ...]:
    """The folders Hydra made for this job that are ours to remove should the run fail: the run directory
    (in a sweep: the job's directory, then the sweep's), when it is named by the config's pattern
    (``hydra.run.dir`` / ``hydra.sweep.dir`` an interpolation such as ``${diffseg.run_name:}``, not given
    on the command line, so it is new to this run). A fixed path (a user's folder, an earlier run's
    directory, a DDP worker's) is never removed. Called inside the task."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return ()
    hydra = HydraConfig.get()
    try:
        group = "sweep" if hydra.mode == RunMode.MULTIRUN else "run"
        given = {o.split("=", 1)[0].lstrip("+~") for o in hydra.overrides.hydra}
        if not OmegaConf.is_interpolation(hydra[group], "dir") or f"hydra.{group}.dir" in given:
            return ()
        job = Path(hydra.runtime.output_dir)
        return (job, Path(hydra.sweep.dir).absolute()) if group == "sweep" else (job,)
    except OmegaConfBaseException:  # not inside a job of a Hydra app: no run directory of ours
        return ()


def remove_run_dirs(folders: tuple[Path, ...]) -> None:
    """Remove each of ``folders`` in turn while it holds nothing but what Hydra writes before the task
    (``.hydra/``, the job's ``.log``, a sweep's ``multirun.yaml``) and empty folders; stop at the first
    that holds any other file (a sweep's folder holding another job's results is kept)."""
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                if entry.name == ".hydra" or not any(p.is_file() for p in entry.rglob("*")):
                    continue
            elif entry.is_file() and (entry.suffix == ".log" or entry.name == "multirun.yaml"):
                continue
            return
        shutil.rmtree(folder, ignore_errors=True)
