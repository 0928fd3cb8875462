"""Per-case Dice, IoU and HD95 computed with MONAI, under one written-down empty-mask policy.

Empty-mask policy (tested in ``tests/test_metrics.py``):

- Dice and IoU: reference and prediction both empty -> NaN (nnU-Net's ``summary.json`` convention), and
  means are nan-means; reference empty but prediction not (or the reverse) -> 0.
- HD95: both empty -> NaN; exactly one empty -> the image diagonal in the given units (the largest
  distance possible in the image, a finite worst case instead of MONAI's inf/NaN).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

from diffseg_lightning.exceptions import ConfigError

METRIC_NAMES = ("dice", "iou", "hd95")


def segmentation_metrics(
    prediction: torch.Tensor, reference: torch.Tensor, spacing: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Per-case, per-channel Dice, IoU and HD95 of binary masks.

    Args:
        prediction: (B, C, H, W) binary prediction (any dtype; non-zero is foreground).
        reference: (B, C, H, W) binary reference.
        spacing: pixel spacing (dy, dx) for HD95 in physical units; None gives pixels.

    Returns:
        ``{"dice", "iou", "hd95"}``, each (B, C) float32 on the CPU, with the empty-mask policy above.
    """
    if prediction.shape != reference.shape:
        raise ConfigError(
            f"prediction {tuple(prediction.shape)} and reference {tuple(reference.shape)} differ in shape"
        )
    pred = (prediction > 0).float().cpu()
    ref = (reference > 0).float().cpu()
    pred_empty = pred.flatten(2).sum(-1) == 0
    ref_empty = ref.flatten(2).sum(-1) == 0
    both_empty = pred_empty & ref_empty
    one_empty = pred_empty ^ ref_empty

    nan = torch.tensor(float("nan"))
    dice = torch.where(both_empty, nan, compute_dice(pred, ref, include_background=True, ignore_empty=False))
    iou = torch.where(both_empty, nan, compute_iou(pred, ref, include_background=True, ignore_empty=False))

    with warnings.catch_warnings():  # MONAI warns on every empty mask; the policy below handles them
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(pred, ref, include_background=True, percentile=95, spacing=spacing)
    extent = [n * (spacing[i] if spacing is not None else 1.0) for i, n in enumerate(pred.shape[2:])]
    diagonal = torch.tensor(math.hypot(*extent))
    hd95 = torch.where(one_empty, diagonal, torch.where(both_empty, nan, hd95.float()))
    return {"dice": dice.float(), "iou": iou.float(), "hd95": hd95}


def aggregate_cases(cases: Sequence[dict], metrics: Sequence[str] = METRIC_NAMES) -> dict[str, float]:
    """Nan-mean of each metric over per-case rows (NaN when no case defines it)."""
    means = {}
    for name in metrics:
        values = np.array([row[name] for row in cases if name in row], dtype=np.float64)
        finite = values[~np.isnan(values)]
        means[name] = float(finite.mean()) if finite.size else float("nan")
    return means
