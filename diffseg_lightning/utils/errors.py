"""User-facing errors: one clear line, a non-zero exit, no stack trace from deep inside torch."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

log = logging.getLogger("diffseg")


class DiffSegError(RuntimeError):
    """An error caused by the user's input (data, config, checkpoint), with a message that says what to fix."""


class NonFiniteLossError(DiffSegError):
    """The training loss became NaN or infinite."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn :class:`DiffSegError` and option ``ValueError``s into a one-line message and exit code 1.

    Set ``DIFFSEG_FULL_ERROR=1`` to see the full traceback instead.
    """
    try:
        yield
    except (DiffSegError, ValueError, FileNotFoundError) as err:
        if os.environ.get("DIFFSEG_FULL_ERROR"):
            raise
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr, flush=True)
        log.error(message)
        raise SystemExit(1) from None
