"""Axis-aligned box utilities and a batched non-maximum suppression, in plain torch.

Written here because torchvision (whose ``torchvision.ops`` holds the usual versions) is not installed beside
the pinned torch. Plain geometry with no layer of its own, so it sits at the bottom (``utils``): the DiffusionDet
head in ``nets/`` refines boxes with :func:`apply_deltas`, the method in ``methods/`` matches them with
:func:`generalized_box_iou`, and prediction keeps them with :func:`batched_nms`. Boxes are ``(..., 4)`` tensors, either ``xyxy`` (x1, y1, x2, y2) or ``cxcywh`` (centre x,
centre y, width, height), in any consistent unit (pixels or fractions of the image side).

References:
    Rezatofighi et al., "Generalized Intersection over Union", CVPR 2019 (GIoU).
    Girshick, "Fast R-CNN", ICCV 2015, Eq. 2 and its released box coder (the ``apply_deltas`` encoding with
    weights, as DiffusionDet and Sparse R-CNN use it).
    Neubeck & Van Gool, "Efficient non-maximum suppression", ICPR 2006 (greedy NMS).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffseg_lightning.exceptions import ConfigError

__all__ = [
    "apply_deltas",
    "batched_nms",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "random_boxes",
]


def _check_boxes(boxes: Tensor, name: str) -> None:
    if boxes.shape[-1] != 4:
        raise ConfigError(f"{name}: expected boxes of shape (..., 4), got {tuple(boxes.shape)}")


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x1, y1, x2, y2)."""
    _check_boxes(boxes, "box_cxcywh_to_xyxy")
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) (x1, y1, x2, y2) -> (..., 4) (cx, cy, w, h)."""
    _check_boxes(boxes, "box_xyxy_to_cxcywh")
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) areas; a degenerate box (x2 < x1 or y2 < y1) has area 0."""
    _check_boxes(boxes, "box_area")
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter, union


def box_iou(a: Tensor, b: Tensor, eps: float = 1e-9) -> Tensor:
    """Pairwise IoU of xyxy boxes: (..., N, 4) and (..., M, 4) -> (..., N, M); two empty boxes give 0."""
    _check_boxes(a, "box_iou")
    _check_boxes(b, "box_iou")
    inter, union = _inter_union(a, b)
    return inter / union.clamp(min=eps)


def generalized_box_iou(a: Tensor, b: Tensor, eps: float = 1e-9) -> Tensor:
    """Pairwise GIoU of xyxy boxes (Rezatofighi et al., CVPR 2019): (..., N, 4), (..., M, 4) -> (..., N, M).

    ``GIoU = IoU - (|C| - |A u B|) / |C|`` with ``C`` the smallest box enclosing both; in [-1, 1].
    """
    _check_boxes(a, "generalized_box_iou")
    _check_boxes(b, "generalized_box_iou")
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp(min=eps)
    lt = torch.minimum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=eps)


def apply_deltas(
    deltas: Tensor,
    boxes: Tensor,
    weights: tuple[float, float, float, float] = (2.0, 2.0, 1.0, 1.0),
    scale_clamp: float = math.log(100000.0 / 16),
) -> Tensor:
    """Refine xyxy ``boxes`` by the regression ``deltas`` (Girshick, ICCV 2015, Eq. 2 inverted).

    With ``(dx, dy, dw, dh) = deltas / weights``: ``cx' = cx + dx w``, ``cy' = cy + dy h``,
    ``w' = w exp(dw)``, ``h' = h exp(dh)`` (``dw``, ``dh`` clamped at ``scale_clamp``). The weights
    (2, 2, 1, 1) and the clamp ``log(100000 / 16)`` are DiffusionDet's (and Sparse R-CNN's) defaults.

    Args:
        deltas: (..., 4).
        boxes: (..., 4) xyxy.

    Returns:
        (..., 4) xyxy refined boxes.
    """
    _check_boxes(deltas, "apply_deltas")
    _check_boxes(boxes, "apply_deltas")
    cx, cy, w, h = box_xyxy_to_cxcywh(boxes).unbind(-1)
    wx, wy, ww, wh = weights
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=scale_clamp)
    dh = (deltas[..., 3] / wh).clamp(max=scale_clamp)
    return box_cxcywh_to_xyxy(torch.stack([cx + dx * w, cy + dy * h, w * dw.exp(), h * dh.exp()], dim=-1))


def random_boxes(
    shape: tuple[int, ...], device: torch.device | str | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """DiffusionDet's padding boxes: ``(*shape, 4)`` cxcywh fractions ``N(0.5, 1/6)``, w and h at least 1e-4."""
    boxes = torch.randn((*shape, 4), device=device, generator=generator) / 6.0 + 0.5
    return torch.cat([boxes[..., :2], boxes[..., 2:].clamp(min=1e-4)], dim=-1)


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS within each group (image, class): which boxes survive.

    In score order (ties: the lower index first), a box is kept unless a kept box of the same group overlaps
    it with IoU > ``iou_threshold``. The pairwise IoU matrix is computed once, masked to pairs of one group;
    the greedy pass then walks the sorted boxes with tensor operations only (no host synchronisation), so
    boxes of all images go through one call.

    Args:
        boxes: (N, 4) xyxy.
        scores: (N,) higher is better.
        groups: (N,) integer group ids; boxes of different groups never suppress each other.
        iou_threshold: suppress at IoU strictly above this, in [0, 1].

    Returns:
        (K,) int64 indices of the kept boxes, in decreasing score order.
    """
    _check_boxes(boxes, "batched_nms")
    n = boxes.shape[0]
    if boxes.dim() != 2 or scores.shape != (n,) or groups.shape != (n,):
        raise ConfigError(
            f"batched_nms: expected boxes (N, 4), scores (N,) and groups (N,), got {tuple(boxes.shape)}, "
            f"{tuple(scores.shape)} and {tuple(groups.shape)}"
        )
    if not 0.0 <= iou_threshold <= 1.0:
        raise ConfigError(f"batched_nms: iou_threshold must be in [0, 1], got {iou_threshold}")
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b, g = boxes[order], groups[order]
    suppresses = (box_iou(b, b) > iou_threshold) & (g[:, None] == g[None, :])
    suppresses = torch.triu(suppresses, diagonal=1)  # only a higher-ranked box suppresses a lower one
    keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
    for i in range(n):  # greedy and sequential by definition; vectorised over the other boxes
        keep = keep & ~(suppresses[i] & keep[i])
    return order[keep]
