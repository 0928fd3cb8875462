"""``diffseg-predict ckpt_path=... input_dir=...``: a folder of images in, masks, probabilities and uncertainty out.

The folder may hold 2D images (png, jpg, bmp, tif, gif) and NIfTI files (``.nii``, ``.nii.gz``). A 2D
image gives ``<stem>_mask.png``, ``<stem>_prob.png``, ``<stem>_uncertainty.png`` and
``<stem>_overlay.png``; a NIfTI file gives ``<stem>_mask.nii.gz``, ``<stem>_prob.nii.gz`` and
``<stem>_uncertainty.nii.gz`` with its affine and spacing, plus an overlay PNG. A NIfTI volume
(H, W, D) is predicted slice by slice along its last axis (each axial slice is one item) and written
back as one volume; a last axis as long as the model's channel count is read as channels instead
(see :func:`~diffseg_lightning.io.volumes.nifti_layout`).

Files that cannot be read or have the wrong channel count are skipped: one warning line each and a
final ``skipped N file(s): ...`` line; the others are written, and outputs that an earlier run left in
``output_dir`` for a skipped file (``<stem>_mask.png`` ..., see :func:`remove_stale_outputs`) are removed,
so no file there looks like a prediction of an input this run did not predict.

Exit codes: 0 when every file was predicted; 2 (:data:`EXIT_SKIPPED`) when some were skipped and the others
written, unless ``allow_skipped=true`` (then 0); 1 with a one-line ``error:`` when no file can be predicted
(or the folder is missing or empty, or the checkpoint is unusable); then no file in ``output_dir`` is
written or removed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from diffseg_lightning.callbacks import MaskWriter, output_names
from diffseg_lightning.data import ImageFolder, SegmentationDataModule
from diffseg_lightning.data.folder import describe_skipped, nothing_usable
from diffseg_lightning.entry import load_checkpoint, module_from_checkpoint
from diffseg_lightning.io.files import file_stem
from diffseg_lightning.utils import CONFIG_DIR, run_cli, user_errors
from diffseg_lightning.validate import check_inference, validate_config

log = logging.getLogger(__name__)

#: ``diffseg-predict``'s exit code when some inputs were skipped and the others written (1 is an error).
EXIT_SKIPPED = 2


@rank_zero_only
def _warn(message: str, *args: object) -> None:
    log.warning(message, *args)


def remove_stale_outputs(
    output_dir: str | Path, skipped: Iterable[str | Path], kept: Iterable[str | Path], inputs: Iterable[Path]
) -> list[Path]:
    """Remove the outputs (:func:`~diffseg_lightning.callbacks.output_names`) an earlier run left in
    ``output_dir`` for files skipped now.

    Args:
        skipped: the inputs skipped in this run.
        kept: the inputs predicted in this run (or by another DDP process); outputs named after their stems
            stay (``b.tif`` is skipped because ``b.png`` writes ``b_mask.png``).
        inputs: every file of the input folder: none of them is removed, even when ``output_dir`` is the
            input folder.

    Returns:
        The files removed.
    """
    keep = {file_stem(path) for path in kept}
    protected = {Path(path).resolve() for path in inputs}
    removed = []
    for stem in sorted({file_stem(path) for path in skipped} - keep):
        for name in output_names(stem):
            path = Path(output_dir) / name
            if path.is_file() and path.resolve() not in protected:
                path.unlink(missing_ok=True)  # another DDP process may have removed it first
                removed.append(path)
    return removed


def predict(cfg: DictConfig) -> dict[str, list]:
    """Predict every usable file of ``cfg.input_dir`` into ``cfg.output_dir``.

    Returns:
        ``written``: the input paths whose outputs were written; ``skipped``: ``(path, reason)`` pairs;
        ``removed``: the outputs of skipped files an earlier run had left (:func:`remove_stale_outputs`).

    Raises:
        DiffSegError: when the checkpoint or the folder is unusable, or no file could be predicted.
    """
    validate_config(cfg)  # the whole config, before anything is read or written
    L.seed_everything(cfg.seed, workers=True)
    checkpoint = load_checkpoint(cfg.ckpt_path, predict=True)  # a method without masks: one line, here
    check_inference(cfg, checkpoint["diffseg_config"])  # the sampler against the trained kernel
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
    module = module_from_checkpoint(checkpoint, cfg.sampler)
    writer = MaskWriter(cfg.output_dir, threshold=cfg.sampler.threshold, overlay=cfg.overlay)
    callbacks = [writer, RichProgressBar()] if cfg.progress_bar else [writer]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=False, enable_progress_bar=bool(cfg.progress_bar)
    )
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    skipped = [(str(path), reason) for path, reason in dataset.skipped] + writer.skipped
    if not writer.written:
        raise nothing_usable(cfg.input_dir, skipped)
    read_errors = {file_stem(case) for case, _ in writer.skipped}
    removed = remove_stale_outputs(
        cfg.output_dir,
        [path for path, _ in skipped],
        kept=[path for path in dataset.files if file_stem(path) not in read_errors],
        inputs=[*dataset.files, *(path for path, _ in dataset.skipped)],
    )
    if removed:
        _warn(
            "removed %d output(s) an earlier run left for skipped file(s): %s",
            len(removed),
            ", ".join(path.name for path in removed),
        )
    if skipped:
        _warn("%s", describe_skipped(skipped))
    return {"written": writer.written, "skipped": skipped, "removed": [str(path) for path in removed]}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def hydra_main(cfg: DictConfig) -> None:
    """Predict; exit code :data:`EXIT_SKIPPED` when an input was skipped, unless ``allow_skipped=true``."""
    with user_errors():
        result = predict(cfg)
    if result["skipped"] and not cfg.get("allow_skipped", False) and rank_zero_only.rank == 0:
        print(
            f"{describe_skipped(result['skipped'])}; the other {len(result['written'])} file(s) were written "
            f"to {cfg.output_dir}; exit code {EXIT_SKIPPED} (allow_skipped=true exits 0)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_SKIPPED)


def main() -> None:
    """Console script: run with one-line reports of config errors."""
    run_cli(hydra_main)


if __name__ == "__main__":
    main()
