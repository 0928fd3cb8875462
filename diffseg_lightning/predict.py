"""``diffseg-predict ckpt_path=... input_dir=...``: a folder of images in, masks, probabilities and uncertainty out.

The folder may hold 2D images (png, jpg, bmp, tif, gif) and NIfTI files (``.nii``, ``.nii.gz``). A 2D
image gives ``<stem>_mask.png``, ``<stem>_prob.png``, ``<stem>_uncertainty.png`` and
``<stem>_overlay.png``; a NIfTI file gives ``<stem>_mask.nii.gz``, ``<stem>_prob.nii.gz`` and
``<stem>_uncertainty.nii.gz`` with its affine and spacing, plus an overlay PNG. A NIfTI volume
(H, W, D) is predicted slice by slice along its last axis (each axial slice is one item) and written
back as one volume; a last axis as long as the model's channel count is read as channels instead
(see :func:`~diffseg_lightning.data.folder.nifti_layout`).

Files that cannot be read or have the wrong channel count are skipped: one warning line each and a
final ``skipped N file(s): ...`` line; the others are written. When no file can be predicted (or the
folder is missing or empty) the run ends with a one-line ``error:`` and exit code 1.
"""

from __future__ import annotations

import logging
from functools import partial

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from diffseg_lightning.callbacks import MaskWriter
from diffseg_lightning.data import ImageFolder, SegmentationDataModule
from diffseg_lightning.data.folder import describe_skipped, nothing_usable
from diffseg_lightning.entry import load_checkpoint, module_from_checkpoint
from diffseg_lightning.utils import CONFIG_DIR, run_cli, user_errors

log = logging.getLogger(__name__)


@rank_zero_only
def _warn(message: str, *args: object) -> None:
    log.warning(message, *args)


def predict(cfg: DictConfig) -> dict[str, list]:
    """Predict every usable file of ``cfg.input_dir`` into ``cfg.output_dir``.

    Returns:
        ``written``: the input paths whose outputs were written; ``skipped``: ``(path, reason)`` pairs.

    Raises:
        DiffSegError: when the checkpoint or the folder is unusable, or no file could be predicted.
    """
    L.seed_everything(cfg.seed, workers=True)
    checkpoint = load_checkpoint(cfg.ckpt_path)
    data_cfg = checkpoint["diffseg_config"]["data"]
    size = cfg.size if cfg.get("size") is not None else data_cfg["size"]
    datamodule = SegmentationDataModule(
        predict=partial(ImageFolder, root=cfg.input_dir, size=size, channels=data_cfg["channels"]),
        channels=data_cfg["channels"],
        mask_channels=data_cfg["mask_channels"],
        eval_batch_size=cfg.batch_size,
        normalize=data_cfg.get("normalize", "zscore"),
    )
    datamodule.setup(
        "predict"
    )  # a missing folder, or one without a usable file, fails here, before the model loads
    dataset: ImageFolder = datamodule.datasets["predict"]
    for path, reason in dataset.skipped:
        _warn("skipping %s: %s", path, reason)
    module = module_from_checkpoint(checkpoint, cfg.sampler, cfg.get("noise"))
    writer = MaskWriter(cfg.output_dir, threshold=cfg.sampler.threshold, overlay=cfg.overlay)
    callbacks = [writer, RichProgressBar()] if cfg.progress_bar else [writer]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=False, enable_progress_bar=bool(cfg.progress_bar)
    )
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    skipped = [(str(path), reason) for path, reason in dataset.skipped] + writer.skipped
    if not writer.written:
        raise nothing_usable(cfg.input_dir, skipped)
    if skipped:
        _warn("%s", describe_skipped(skipped))
    return {"written": writer.written, "skipped": skipped}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def hydra_main(cfg: DictConfig) -> None:
    with user_errors():
        predict(cfg)


def main() -> None:
    """Console script: run with one-line reports of config errors."""
    run_cli(hydra_main)


if __name__ == "__main__":
    main()
