"""Lightning callbacks that write a run's outputs: ``summary.json``, image panels, prediction PNGs."""

from __future__ import annotations

import json
import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter, WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.io.files import file_stem, is_nifti
from diffseg_lightning.io.images import png_writer, read_image
from diffseg_lightning.io.volumes import nifti_writer, read_nifti_item
from diffseg_lightning.utils.atomic import atomic_write

log = logging.getLogger(__name__)


def _json_safe(value: Any) -> Any:
    """NaN and inf become null (strict JSON); containers are walked."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_summary(path: Path, results: dict, extra: dict | None = None) -> None:
    """Write ``summary.json`` (nnU-Net layout: ``metric_per_case``, ``mean``) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_json_safe({**results, **(extra or {})}), indent=2))
    tmp.replace(path)


class SummaryJsonWriter(L.Callback):
    """Writes ``<output_dir>/summary.json`` from the test results, on rank 0 after every process finished.

    (Not TensorBoard's ``SummaryWriter``: this one writes the evaluation protocol's JSON file.)
    """

    def __init__(self, output_dir: str, filename: str = "summary.json", split: str = "test") -> None:
        self.path = Path(output_dir) / filename
        self.split = split

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = getattr(pl_module, "results", {}).get("test")
        if results is not None and trainer.is_global_zero:
            write_summary(self.path, results, {"split": self.split})
        trainer.strategy.barrier("summary")


@torch.no_grad()
def warmup_ema_update(
    averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor, decay: float
) -> None:
    """EMA step with the decay ramped up as min(decay, (1 + n) / (10 + n)) after n updates.

    The ramp keeps early, poor weights from dominating short runs; long runs reach ``decay``.
    """
    n = float(num_averaged)
    rate = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
    floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
    if floats:
        torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], rate)
    for a, c in zip(averaged, current, strict=True):
        if not a.is_floating_point():
            a.copy_(c)  # integer buffers (counters) follow the model


class WarmupEMA(WeightAveraging):
    """Exponential moving average of the weights, with a decay warm-up, on Lightning's ``WeightAveraging``.

    Lightning's ``EMAWeightAveraging`` uses a fixed decay, which makes short runs evaluate stale
    weights; this keeps everything else of ``WeightAveraging`` (validation on the average, the
    average in the checkpoint's ``state_dict``, exact resume).

    Args:
        decay: the decay reached after warm-up.
    """

    def __init__(self, decay: float = 0.999, use_buffers: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"EMA decay must lie in [0, 1], got {decay}")
        super().__init__(use_buffers=use_buffers, multi_avg_fn=partial(warmup_ema_update, decay=decay))


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(H, W) in [0, 1] -> uint8."""
    return (x.clamp(0, 1) * 255).round().byte().cpu().numpy()


def panel_rows(panel: dict[str, torch.Tensor], max_images: int) -> np.ndarray:
    """Image | ground truth | prediction | entropy, one row per case, as one uint8 (H*n, W*4) array."""
    rows = []
    for i in range(min(max_images, panel["image"].shape[0])):
        img = panel["image"][i, 0]
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        cells = [img, panel["mask"][i, 0], panel["prediction"][i, 0], panel["entropy"][i, 0]]
        rows.append(np.concatenate([_to_uint8(c) for c in cells], axis=1))
    return np.concatenate(rows, axis=0)


class ImagePanelLogger(L.Callback):
    """Logs panels of image, ground truth, prediction and uncertainty (entropy) after each validation.

    W&B and TensorBoard loggers get the panel as an image; every run also keeps it as a PNG in
    ``<output_dir>/panels/`` so CSV-only runs can be inspected.
    """

    def __init__(self, output_dir: str, max_images: int = 4) -> None:
        self.output_dir = Path(output_dir) / "panels"
        self.max_images = max_images

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        panel = getattr(pl_module, "panel", None)
        if panel is None or not trainer.is_global_zero or trainer.sanity_checking:
            return
        grid = panel_rows(panel, self.max_images)
        caption = "image | ground truth | prediction | entropy"
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/panel", images=[grid], caption=[caption], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/panel", grid, trainer.global_step, dataformats="HW")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(self.output_dir / f"val_step{trainer.global_step:07d}.png")


def _as_uint8(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 0..255."""
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def overlay_image(image: np.ndarray, mask: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """(C, H, W) image and (H, W) bool mask -> (H, W, 3) uint8 overlay.

    The image is shown in grey (its first channel) or, with 3 channels, in colour, min-max scaled; the
    mask is filled with translucent red (``alpha``) and its contour (mask pixels with a background
    4-neighbour) drawn in opaque red.
    """
    base = image[:3] if image.shape[0] == 3 else np.repeat(image[:1], 3, axis=0)
    low, high = float(base.min()), float(base.max())
    rgb = np.moveaxis((base - low) / (high - low) if high > low else np.zeros_like(base), 0, -1) * 255
    red = np.array([255.0, 0.0, 0.0])
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * red
    m = np.pad(mask, 1)
    interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    rgb[mask & ~interior] = red
    return np.round(rgb).astype(np.uint8)


#: Integer label maps a method may return beside its mask, written by :class:`MaskWriter` as uint16 PNGs.
LABEL_MAPS = ("instances", "panoptic", "semantic")


def output_names(stem: str) -> list[str]:
    """Every file name :class:`MaskWriter` can give an output of the input named ``<stem>.<suffix>``, for a 2D
    image or a NIfTI file."""
    maps = [f"{stem}_{kind}{ext}" for kind in ("mask", "prob", "uncertainty") for ext in (".png", ".nii.gz")]
    return [*maps, f"{stem}_overlay.png", *(f"{stem}_{key}.png" for key in LABEL_MAPS)]


class MaskWriter(BasePredictionWriter):
    """Writes each input's mask, probability, uncertainty and overlay into ``output_dir``.

    2D image files give ``<stem>_mask.png`` (0/255), ``<stem>_prob.png`` and ``<stem>_uncertainty.png``
    (the predictive entropy in bits, 0 -> 0, 1 bit -> 255). NIfTI files give ``<stem>_mask.nii.gz``
    (uint8 0/1), ``<stem>_prob.nii.gz`` and ``<stem>_uncertainty.nii.gz`` (float32, entropy in bits)
    with the input's affine and header (spacing); the axial slices of a volume are collected and
    written as one volume once all have been predicted. ``<stem>_overlay.png`` shows the mask on the
    image (for a volume, on its middle slice; NIfTI arrays are drawn as stored, first axis down). A method
    that also returns integer label maps (instance, panoptic or semantic ids: :data:`LABEL_MAPS`) gets
    ``<stem>_<key>.png`` (uint16) for each, for 2D inputs.
    The mask is the method's own (``prediction["mask"]``). Predictions are resized back to each input's
    original size (bilinear); where the method's mask is its probability above ``threshold``, the resized
    probability is thresholded, and any other mask (an Otsu threshold of a saliency map, a vote) is
    resized itself and thresholded at 0.5. Every file is written under a temporary name and renamed, so an interrupted run
    leaves no partial file.

    Items whose ``error`` (see :class:`~diffseg_lightning.data.ImageFolder`) is set are not written:
    they are logged and listed in ``skipped`` as ``(path, reason)``; ``written`` lists the inputs whose
    outputs are complete. A volume is assembled per process, so predict volumes on one device.

    Args:
        output_dir: the folder to write into (created when absent).
        threshold: the sampler's threshold (see the rule above).
        overlay: also write ``<stem>_overlay.png``.
    """

    def __init__(self, output_dir: str, threshold: float = 0.5, overlay: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.threshold = threshold
        self.overlay = overlay
        self.written: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self._volumes: dict[str, dict[str, Any]] = {}

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        done = {case for case, _ in self.skipped}
        for i, case in enumerate(prediction["case"]):
            slice_index = int(batch["slice"][i]) if "slice" in batch else -1
            if case in done:
                continue
            if batch.get("error") and batch["error"][i]:
                self._skip(
                    case,
                    batch["error"][i] if slice_index < 0 else f"slice {slice_index}: {batch['error'][i]}",
                )
                done.add(case)
                continue
            maps = {
                "prob": prediction["probability"][i],
                "uncertainty": prediction["entropy"][i],
                "mask": prediction["mask"][i],
            }
            # Where the method's mask is its probability above the threshold, the resized probability is
            # thresholded (smooth boundaries, mask and prob files agree); any other mask (an Otsu threshold
            # of a saliency map, a vote) is resized itself.
            thresholded = torch.equal(maps["mask"].bool(), maps["prob"] > self.threshold)
            if prediction.get("original_size") is not None:
                size = prediction["original_size"][i].tolist()
                maps = {
                    k: F.interpolate(v[None].float(), size=size, mode="bilinear", align_corners=False)[0]
                    for k, v in maps.items()
                }
            prob, uncertainty, mask = (
                maps[k][0].float().cpu().numpy() for k in ("prob", "uncertainty", "mask")
            )
            mask = prob > self.threshold if thresholded else mask > 0.5
            if slice_index < 0:
                self._write(case, prob, uncertainty, mask)
                self._write_label_maps(case, prediction, i)
                continue
            depth = int(batch["num_slices"][i])
            volume = self._volumes.setdefault(
                case,
                {
                    "prob": np.zeros((*prob.shape, depth), np.float32),
                    "uncertainty": np.zeros((*prob.shape, depth), np.float32),
                    "mask": np.zeros((*prob.shape, depth), bool),
                    "seen": set(),
                },
            )
            volume["prob"][..., slice_index], volume["uncertainty"][..., slice_index] = prob, uncertainty
            volume["mask"][..., slice_index] = mask
            volume["seen"].add(slice_index)
            if len(volume["seen"]) == depth:
                del self._volumes[case]
                self._write(case, volume["prob"], volume["uncertainty"], volume["mask"])

    def _write_label_maps(self, case: str, prediction: dict, i: int) -> None:
        """``<stem>_<key>.png`` (uint16, nearest-resized to the original size) for every label map the method
        returns (:data:`LABEL_MAPS`: instance ids, panoptic segment ids, semantic classes); 2D inputs only."""
        if is_nifti(case):
            return
        for key in LABEL_MAPS:
            labels = prediction.get(key)
            if labels is None or labels.is_floating_point() or labels[i].dim() != 2:
                continue  # e.g. ODISE's per-category semantic scores (K, H, W): not a label map
            labels = prediction[key][i].float()[None, None]  # (1, 1, H, W)
            if prediction.get("original_size") is not None:
                labels = F.interpolate(labels, size=prediction["original_size"][i].tolist(), mode="nearest")
            array = labels[0, 0].round().cpu().numpy()
            if array.min() < 0 or array.max() > np.iinfo(np.uint16).max:
                raise ConfigError(f"{case}: the {key} map holds labels outside 0..65535")
            atomic_write(
                self.output_dir / f"{file_stem(case)}_{key}.png", png_writer(array.astype(np.uint16))
            )

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for case, volume in list(self._volumes.items()):
            self._skip(
                case, f"only {len(volume['seen'])} of {volume['prob'].shape[-1]} slices were predicted"
            )

    def _skip(self, case: str, reason: str) -> None:
        self._volumes.pop(case, None)
        self.skipped.append((case, reason))
        log.warning("skipping %s: %s", case, reason)

    def _write(self, case: str, prob: np.ndarray, uncertainty: np.ndarray, mask: np.ndarray) -> None:
        """Write one input's outputs: ``prob``, ``uncertainty`` and the bool ``mask`` are (H, W), or (H, W, D)
        for a volume."""
        stem = file_stem(case)
        if is_nifti(case):
            source = nib.load(case)
            files = {
                "mask": nifti_writer(source, mask, np.uint8),
                "prob": nifti_writer(source, prob, np.float32),
                "uncertainty": nifti_writer(source, uncertainty, np.float32),
            }
            files = {f"{stem}_{k}.nii.gz": v for k, v in files.items()}
        else:
            files = {
                f"{stem}_{k}.png": png_writer(_as_uint8(v))
                for k, v in (("mask", mask), ("prob", prob), ("uncertainty", uncertainty))
            }
        if self.overlay:
            middle = prob.shape[2] // 2 if prob.ndim == 3 else -1
            image = read_nifti_item(Path(case), middle) if is_nifti(case) else read_image(Path(case))
            files[f"{stem}_overlay.png"] = png_writer(
                overlay_image(image, mask if middle < 0 else mask[..., middle])
            )
        for name, write in files.items():
            atomic_write(self.output_dir / name, write)
        self.written.append(case)
