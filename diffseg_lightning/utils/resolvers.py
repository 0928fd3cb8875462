"""OmegaConf resolvers used by the configs in ``diffseg_lightning/conf/``, and where those configs live."""

from __future__ import annotations

import netrc
import os
import secrets
from datetime import datetime
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf

from diffseg_lightning.exceptions import ConfigError

#: The Hydra configs ship inside the package (``diffseg_lightning/conf``; the repository's top-level ``conf``
#: is a link to it), so an installed wheel finds them from any directory.
CONFIG_DIR = str(Path(str(resources.files("diffseg_lightning") / "conf")).resolve())


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


def input_size(size, crop=None):
    """The network's input size: ``data.size`` (the resize), else ``data.crop`` (e.g. BraTS's centre crop).

    Raises:
        ValueError: when neither is set (a loader that keeps each image's own size has no fixed input size).
    """
    chosen = size if size is not None else crop
    if chosen is None:
        raise ConfigError(
            "the network needs a fixed input size but data.size (and data.crop) are null: set data.size=..."
        )
    return chosen


def slurm_tasks(devices) -> int:
    """SLURM tasks per node for ``hydra/launcher=slurm``: one per device, as Lightning's SLURMEnvironment
    expects."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(
            f"hydra/launcher=slurm needs trainer.devices as a positive number of devices per node, got "
            f"{devices!r} (-1 / auto are unknown before the job lands on a node): e.g. trainer.devices=8"
        )
    return devices


def slurm_gpus(accelerator: str, devices) -> int | None:
    """GPUs per node to request: one per task, none when the trainer runs on CPU."""
    tasks = slurm_tasks(devices)
    return None if str(accelerator) == "cpu" else tasks


def run_name() -> str:
    """A run (or sweep) directory's name that no other run gets: ``2025-01-31_12-00-00_4242-9f1c``.

    The start time, then this process's id (unique among the runs on one host) and 16 random bits
    (against runs on other hosts writing to the same folder). Hydra resolves it once per run: it is
    registered with ``use_cache``, like Hydra's own ``now``, so every read of ``hydra.run.dir`` in a run,
    and every job of a sweep (Hydra copies the cache into each job's config), sees the same name; DDP
    workers started by Lightning get the resolved directory on their command line.

    Processes started by ``torchrun`` compose the config each on their own, so there the name is the
    rendezvous id they share (``torchrun-<id>``; ``--standalone`` makes a unique one).
    """
    torchrun = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if torchrun != "none":
        return f"torchrun-{torchrun}"
    while True:
        name = f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}-{secrets.token_hex(2)}"
        if name not in _ISSUED:  # runs of one process (in-process calls of a CLI) never repeat a name
            _ISSUED.add(name)
            return name


_ISSUED: set[str] = set()


def register_resolvers() -> None:
    """Register the ``diffseg.*`` resolvers (idempotent)."""
    resolvers = {
        "diffseg.wandb_offline": wandb_offline,
        "diffseg.output_channels": model_output_channels,
        "diffseg.input_size": input_size,
        "diffseg.slurm_tasks": slurm_tasks,
        "diffseg.slurm_gpus": slurm_gpus,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("diffseg.run_name"):
        OmegaConf.register_new_resolver("diffseg.run_name", run_name, use_cache=True)  # once per run


register_resolvers()
