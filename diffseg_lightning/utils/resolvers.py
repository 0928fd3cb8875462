"""OmegaConf resolvers used by the configs in ``conf/``."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def wandb_offline() -> bool:
    """True unless a W&B key is configured (``WANDB_API_KEY`` or an api.wandb.ai entry in ~/.netrc).

    ``WANDB_MODE`` set by the user wins.
    """
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "disabled", "dryrun")
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def model_output_channels(mask_channels: int, learn_variance: bool) -> int:
    """Channels a denoiser must output for a kernel: the mask, doubled when the variance is learned."""
    return int(mask_channels) * (2 if learn_variance else 1)


def register_resolvers() -> None:
    """Register the ``diffseg.*`` resolvers (idempotent)."""
    resolvers = {
        "diffseg.wandb_offline": wandb_offline,
        "diffseg.output_channels": model_output_channels,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
