"""What the three entry points share: building a run's parts from configs, and reading checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from diffseg_lightning.utils.errors import DiffSegError


def build_module(model_cfg: DictConfig, noise_cfg: DictConfig, sampler_cfg: DictConfig) -> L.LightningModule:
    """Instantiate the LightningModule with its kernel and inference recipe (all from Hydra configs).

    The kernel and sampler are passed to the partial module, not merged into its config, so Hydra
    does not turn them back into config nodes.
    """
    module_factory = instantiate(model_cfg, _partial_=True)
    return module_factory(kernel=instantiate(noise_cfg), sampler=instantiate(sampler_cfg))


def build_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-shaped group (callbacks, loggers); None or empty gives []."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a DiffSeg checkpoint, with a one-line error when it is missing, unreadable or not ours."""
    path = Path(path)
    if not path.is_file():
        raise DiffSegError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise DiffSegError(
            f"checkpoint {path} is not a readable checkpoint ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DiffSegError(f"checkpoint {path} has no state_dict: not a Lightning checkpoint")
    if "diffseg_config" not in checkpoint:
        raise DiffSegError(f"checkpoint {path} has no diffseg_config: it was not written by diffseg-train")
    return checkpoint


#: Kernel settings that only change how a trained model is sampled; ``noise.<key>=...`` on the command line
#: of ``diffseg-eval`` / ``diffseg-predict`` overrides them. Anything else (T, schedule, objective) would
#: change what the network was trained to predict.
SAMPLING_KEYS = ("sampling", "eta", "clip_x0")


def inference_noise_config(trained: DictConfig, overrides: DictConfig | dict | None) -> DictConfig:
    """The checkpoint's kernel config with the inference-time ``overrides`` (keys of :data:`SAMPLING_KEYS`;
    a null value keeps the trained setting).

    Raises:
        DiffSegError: when an override is not a sampling setting, or the trained kernel has no such key.
    """
    overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}  # null: as trained
    if not overrides:
        return trained
    for key in overrides:
        if key not in SAMPLING_KEYS:
            raise DiffSegError(
                f"noise.{key} cannot change at inference: it is part of what the network was trained on; "
                f"only {list(SAMPLING_KEYS)} can (e.g. noise.sampling=dpmpp_2m)"
            )
        if key not in trained:
            raise DiffSegError(
                f"noise.{key}: the checkpoint's kernel ({trained.get('_target_')}) has no such setting"
            )
    merged = trained.copy()
    with open_dict(merged):
        merged.merge_with(overrides)
    return merged


def module_from_checkpoint(
    checkpoint: dict[str, Any], sampler_cfg: DictConfig, noise_overrides: DictConfig | dict | None = None
) -> L.LightningModule:
    """Rebuild the trained module from the config stored in its checkpoint, with a new sampler and,
    optionally, new kernel sampling settings (:func:`inference_noise_config`)."""
    run_cfg = OmegaConf.create(checkpoint["diffseg_config"])
    noise_cfg = inference_noise_config(run_cfg.noise, noise_overrides)
    module = build_module(run_cfg.model, noise_cfg, sampler_cfg)
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = checkpoint["diffseg_config"]
    return module


@rank_zero_only
def save_config(cfg: DictConfig, output_dir: str | Path) -> None:
    """Write the fully resolved config as ``<output_dir>/config.yaml`` (Hydra's .hydra/ keeps the raw one)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(output_dir) / "config.yaml", resolve=True)
