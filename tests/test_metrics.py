"""Dice / IoU / HD95 against hand calculations and a brute-force HD95, and the empty-mask policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffseg_lightning.metrics import aggregate_cases, segmentation_metrics


def square(size: int, top: int, left: int, side: int) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[..., top : top + side, left : left + side] = 1
    return m


def test_dice_and_iou_by_hand():
    pred, ref = square(16, 2, 2, 4), square(16, 4, 4, 4)  # overlap 2x2 = 4 of 16 + 16 pixels
    scores = segmentation_metrics(pred, ref)
    assert scores["dice"].item() == pytest.approx(2 * 4 / 32)
    assert scores["iou"].item() == pytest.approx(4 / 28)


def brute_force_hd95(pred: np.ndarray, ref: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the boundary pixels, by all pairwise distances."""

    def edge(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m))

    a, b = edge(pred), edge(ref)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    size = 24
    yy, xx = np.mgrid[:size, :size]
    masks = []
    for _ in range(2):
        cy, cx, r = rng.uniform(7, 17), rng.uniform(7, 17), rng.uniform(3, 7)
        masks.append((yy - cy) ** 2 + (xx - cx) ** 2 < r**2)
    scores = segmentation_metrics(torch.tensor(masks[0])[None, None], torch.tensor(masks[1])[None, None])
    assert scores["hd95"].item() == pytest.approx(brute_force_hd95(*masks), rel=1e-5)


def test_hd95_spacing_scales_distances():
    pred, ref = square(16, 2, 2, 4), square(16, 2, 6, 4)  # shifted by 4 columns
    pixels = segmentation_metrics(pred, ref)["hd95"].item()
    mm = segmentation_metrics(pred, ref, spacing=(1.0, 0.5))["hd95"].item()
    assert pixels == pytest.approx(4.0)
    assert mm == pytest.approx(2.0)


def test_empty_mask_policy():
    empty, full = torch.zeros(1, 1, 10, 20), square(20, 0, 0, 5)[..., :10, :]
    both = segmentation_metrics(empty, empty)
    assert (
        math.isnan(both["dice"].item()) and math.isnan(both["iou"].item()) and math.isnan(both["hd95"].item())
    )
    for pred, ref in [(full, empty), (empty, full)]:
        one = segmentation_metrics(pred, ref)
        assert one["dice"].item() == 0.0 and one["iou"].item() == 0.0
        assert one["hd95"].item() == pytest.approx(math.hypot(10, 20))


def test_aggregate_is_nanmean():
    rows = [
        {"dice": 1.0, "iou": 1.0},
        {"dice": float("nan"), "iou": float("nan")},
        {"dice": 0.5, "iou": 0.25},
    ]
    means = aggregate_cases(rows, ("dice", "iou", "hd95"))
    assert means["dice"] == pytest.approx(0.75) and means["iou"] == pytest.approx(0.625)
    assert math.isnan(means["hd95"])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        segmentation_metrics(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
