"""``diffseg-predict ckpt_path=... input_dir=...``: a folder of images in, mask and uncertainty PNGs out."""

from __future__ import annotations

from functools import partial

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffseg_lightning.callbacks import MaskWriter
from diffseg_lightning.data import ImageFolder, SegmentationDataModule
from diffseg_lightning.entry import load_checkpoint, module_from_checkpoint
from diffseg_lightning.utils import CONFIG_DIR, run_cli, user_errors


def predict(cfg: DictConfig) -> None:
    """Write ``<stem>_mask.png``, ``<stem>_prob.png`` and ``<stem>_uncertainty.png`` for every image."""
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
    datamodule.setup("predict")  # a missing folder or a wrong image fails here, before the model loads
    module = module_from_checkpoint(checkpoint, cfg.sampler)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[MaskWriter(cfg.output_dir, threshold=cfg.sampler.threshold)], logger=False
    )
    trainer.predict(module, datamodule=datamodule, return_predictions=False)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def hydra_main(cfg: DictConfig) -> None:
    with user_errors():
        predict(cfg)


def main() -> None:
    """Console script: run with one-line reports of config errors."""
    run_cli(hydra_main)


if __name__ == "__main__":
    main()
