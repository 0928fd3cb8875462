"""What the entry points share: the run-level checks of a resumed run, loggers and callbacks, the saved config.

Building a method from its configs or its checkpoint lives in :mod:`diffseg_lightning.methods.build`, reading a
checkpoint in :mod:`diffseg_lightning.utils.checkpoints` (the project's one checkpoint reader); both are
re-exported here for the CLIs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from diffseg_lightning.methods.build import NON_ARCHITECTURE_KEYS as NON_ARCHITECTURE_KEYS  # re-exported
from diffseg_lightning.methods.build import accepted_parameters as accepted_parameters
from diffseg_lightning.methods.build import build_module as build_module
from diffseg_lightning.methods.build import check_weights as check_weights
from diffseg_lightning.methods.build import config_differences as config_differences
from diffseg_lightning.methods.build import describe_differences
from diffseg_lightning.methods.build import module_from_checkpoint as module_from_checkpoint
from diffseg_lightning.utils.checkpoints import RENAMED_TARGETS as RENAMED_TARGETS  # re-exported
from diffseg_lightning.utils.checkpoints import LoadedCheckpoint as LoadedCheckpoint
from diffseg_lightning.utils.checkpoints import load_checkpoint as load_checkpoint
from diffseg_lightning.utils.errors import DiffSegError
from diffseg_lightning.utils.moved_settings import MOVED_KEYS


def build_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-shaped group (callbacks, loggers); None or empty gives []."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


#: Kernel settings that define what the network is trained to predict (its target and the noise levels
#: of the timesteps it sees). A resumed run must keep them: see :func:`check_resume`.
PREDICTION_KEYS = (
    "_target_",
    "num_train_timesteps",
    "schedule",
    "beta_start",
    "beta_end",
    "objective",
    "learn_variance",
)


def check_resume(checkpoint: dict[str, Any], cfg: DictConfig) -> None:
    """Refuse, in one line, to resume ``checkpoint`` with a kernel that makes the network predict something else.

    A kernel setting of :data:`PREDICTION_KEYS` (T, schedule, objective, ...) that differs from the
    checkpoint's is an error, not a warning: the weights, the EMA and the optimiser's moments were fitted to
    the old target, so the resumed run would match neither configuration while its ``config.yaml`` claimed
    the new one, and a warning scrolls away in the training log. Other kernel settings (loss weights) may
    change, with a warning naming them; the kernel options of old checkpoints that are solver options now
    (:data:`~diffseg_lightning.utils.moved_settings.MOVED_KEYS`) are left out.

    Raises:
        DiffSegError: naming the checkpoint, each changed setting and its old and new value.
    """
    path = getattr(checkpoint, "path", "(in memory)")
    trained = checkpoint["diffseg_config"].get("noise")
    noise = config_differences(trained, OmegaConf.to_container(cfg.noise, resolve=True), "noise")
    fatal = [d for d in noise if d[0].split(".")[1] in PREDICTION_KEYS]
    if any(key == "noise._target_" for key, _, _ in fatal):
        fatal = [d for d in fatal if d[0] == "noise._target_"]  # another kernel: its other keys mean nothing
    if fatal:
        key, old, _ = fatal[0]
        fix = (
            f"the checkpoint's kernel {old}"
            if key == "noise._target_"
            else " ".join(f"{k}={o}" for k, o, _ in fatal)
        )
        raise DiffSegError(
            f"cannot resume from checkpoint {path}: {describe_differences(fatal)}; that changes what the network predicts "
            f"(resume with {fix}, or train from scratch without ckpt_path)"
        )
    warned = [d for d in noise if d[0].split(".")[1] not in (*PREDICTION_KEYS, *MOVED_KEYS)]
    if warned:
        rank_zero_warn(
            f"resuming checkpoint {path} with changed loss settings: {describe_differences(warned, len(warned))}"
        )


def check_resume_weights(checkpoint: dict[str, Any], cfg: DictConfig, module: L.LightningModule) -> None:
    """One line, before the trainer, when the checkpoint's weights do not fit the model this run builds
    (another width, another method): it names the model settings that differ (:func:`check_weights`)."""
    check_weights(module, checkpoint, "this run's model", OmegaConf.to_container(cfg.model, resolve=True))


@rank_zero_only
def save_config(cfg: DictConfig, output_dir: str | Path) -> None:
    """Write the fully resolved config as ``<output_dir>/config.yaml`` (Hydra's .hydra/ keeps the raw one)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(output_dir) / "config.yaml", resolve=True)
