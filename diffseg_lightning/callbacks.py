"""Lightning callbacks that write a run's outputs: ``summary.json``, image panels, prediction PNGs."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter, WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image


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


class SummaryWriter(L.Callback):
    """Writes ``<output_dir>/summary.json`` from the test results, on rank 0 after every process finished."""

    def __init__(self, output_dir: str, filename: str = "summary.json") -> None:
        self.path = Path(output_dir) / filename

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = getattr(pl_module, "results", {}).get("test")
        if results is not None and trainer.is_global_zero:
            write_summary(self.path, results, {"split": "test"})
        trainer.strategy.barrier("summary")


@torch.no_grad()
def warmup_ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor,
                      decay: float) -> None:
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
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
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


class MaskWriter(BasePredictionWriter):
    """Writes ``<stem>_mask.png`` (0/255), ``<stem>_prob.png`` and ``<stem>_uncertainty.png`` per image.

    The uncertainty PNG is the predictive entropy in bits (0 -> 0, 1 bit -> 255). Predictions are
    resized back to each image's original size (bilinear on probabilities, then thresholded).
    """

    def __init__(self, output_dir: str, threshold: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.threshold = threshold

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for i, case in enumerate(prediction["case"]):
            size = prediction["original_size"][i].tolist() if prediction["original_size"] is not None else None
            maps = {"prob": prediction["probability"][i], "uncertainty": prediction["entropy"][i]}
            if size is not None:
                maps = {k: F.interpolate(v[None].float(), size=size, mode="bilinear", align_corners=False)[0]
                        for k, v in maps.items()}
            stem = Path(case).stem
            mask = (maps["prob"][0] > self.threshold).float()
            Image.fromarray(_to_uint8(mask)).save(self.output_dir / f"{stem}_mask.png")
            Image.fromarray(_to_uint8(maps["prob"][0])).save(self.output_dir / f"{stem}_prob.png")
            Image.fromarray(_to_uint8(maps["uncertainty"][0])).save(self.output_dir / f"{stem}_uncertainty.png")
