"""DiffSeg's exception types. This module imports nothing, so every layer (``nets/`` and ``diffusion/``
included) can raise them; :mod:`diffseg_lightning.utils.errors` turns them into one-line CLI errors."""

from __future__ import annotations


class DiffSegError(RuntimeError):
    """An error caused by the user's input (data, config, checkpoint), with a message that says what to fix."""


class ConfigError(DiffSegError, ValueError):
    """A setting (a config value, an argument) outside what it accepts; raised by our own checks only.

    It is also a ``ValueError``, so callers that validate arguments the Python way can catch it as one.
    """


class NonFiniteLossError(DiffSegError):
    """The training loss became NaN or infinite."""
