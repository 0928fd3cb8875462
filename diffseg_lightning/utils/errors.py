"""User-facing errors: one clear line, a non-zero exit, no stack trace from deep inside torch."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from hydra.errors import HydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

from diffseg_lightning.exceptions import ConfigError, DiffSegError, NonFiniteLossError

__all__ = ["USER_ERRORS", "ConfigError", "DiffSegError", "NonFiniteLossError", "run_cli", "user_errors"]

#: What :func:`user_errors` reports in one line: only the errors our own checks raise. Any other
#: exception (a ``ValueError`` from inside torch, a bug of ours) keeps its traceback.
USER_ERRORS = (DiffSegError,)


def one_line(message: str) -> str:
    """Collapse a (possibly multi-line) message to one line, dropping Hydra's search-path listing."""
    return " ".join(message.split("Config search path")[0].split())


def _exit_with(message: str) -> None:
    message = one_line(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors the user can fix into a one-line ``error: ...`` message and exit code 1.

    Covers :class:`DiffSegError`, option ``ValueError``s (also when raised inside a Hydra
    ``instantiate``) and missing files. Set ``DIFFSEG_FULL_ERROR=1`` to get the traceback instead.
    """
    try:
        yield
    except InstantiationException as err:
        cause = err.__cause__
        if os.environ.get("DIFFSEG_FULL_ERROR") or not isinstance(cause, (DiffSegError, *USER_ERRORS)):
            raise
        _exit_with(f"{cause} ({one_line(str(err)).split(':')[0]})")
    except (DiffSegError, *USER_ERRORS) as err:
        if os.environ.get("DIFFSEG_FULL_ERROR"):
            raise
        _exit_with(str(err))


def run_cli(hydra_main: Callable[[], object]) -> None:
    """Run a ``@hydra.main`` function, reporting config errors (unknown option, missing group) in one line.

    Hydra prints its own multi-line report unless ``HYDRA_FULL_ERROR`` is set; we set it so the
    exception reaches us, and print its first sentence instead.
    """
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException) as err:
        if os.environ.get("DIFFSEG_FULL_ERROR"):
            raise
        _exit_with(str(err))
