"""Shared helpers: user-facing errors, config resolvers, run-directory I/O."""

from diffseg_lightning.utils.compose import compose_config
from diffseg_lightning.utils.errors import DiffSegError, run_cli, user_errors
from diffseg_lightning.utils.resolvers import CONFIG_DIR, register_resolvers

__all__ = ["CONFIG_DIR", "DiffSegError", "compose_config", "register_resolvers", "run_cli", "user_errors"]
