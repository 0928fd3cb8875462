"""DiffSeg's exception types. This module imports nothing, so every layer (``nets/`` and ``diffusion/``
included) can raise them; :mod:`diffseg_lightning.utils.errors` turns them into one-line CLI errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class DiffSegError(RuntimeError):
    """An error caused by the user's input (data, config, checkpoint), with a message that says what to fix."""


class ConfigError(DiffSegError, ValueError):
    """A setting (a config value, an argument) outside what it accepts; raised by our own checks only.

    It is also a ``ValueError``, so callers that validate arguments the Python way can catch it as one.
    """


class NonFiniteLossError(DiffSegError):
    """The training loss became NaN or infinite."""


class CaseProblems(DiffSegError):
    """Every problem found in the files of one case (an image and its mask, say), each a message
    ``<file>: <reason>``, so that the data check lists them all, not only the first."""

    def __init__(self, messages: Sequence[str]) -> None:
        self.messages = list(messages)
        super().__init__("; ".join(self.messages))


def read_all(*reads: Callable[[], Any]) -> tuple[Any, ...]:
    """Run every read of one case and return their results; when any raised a :class:`DiffSegError`, raise
    them together (one alone as it is, several as :class:`CaseProblems`). Other exceptions propagate."""
    results, errors = [], []
    for read in reads:
        try:
            results.append(read())
        except DiffSegError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise CaseProblems(
            [m for e in errors for m in (e.messages if isinstance(e, CaseProblems) else [str(e)])]
        )
    return tuple(results)
