"""Instance (object-level) metrics for label maps: object Dice and Hausdorff, GlaS F1, F1 at an IoU, AJI, PQ,
the Hungarian matching of predictions to targets used by the set-prediction losses, and the multi-category
panoptic counts (PQ per category, mean IoU of the semantic view) of ODISE's evaluation.

Inputs are instance label maps of one case, (H, W) (any number of dimensions works) of integers:
0 is background and every other value is one object. Labels need not be consecutive, and an object is
the set of pixels that carry its label (it is not split into connected components; run
``scipy.ndimage.label`` first on a binary mask or on labels that may be disconnected). Pairwise overlaps
come from one contingency table (``np.bincount`` over the combined labels), distances from
``scipy.ndimage.distance_transform_edt``; the only Python loops run over objects, never over pixels.
Cases are evaluated one at a time; loop over the cases of a data set and aggregate with nan-means.

Empty-mask policy (tested in ``tests/test_instance_metrics.py``), following the package convention of
:mod:`diffseg_lightning.metrics.segmentation` (nnU-Net: undefined when both maps are empty, nan-means):

- Both maps without objects: every metric is NaN (the GlaS reference code would give object Dice 1 and
  F1 1; panopticapi drops such a class from the mean, which a nan-mean reproduces).
- Exactly one map without objects: object Dice 0, F1 / precision / recall 0, AJI 0, DQ / SQ / PQ 0, and
  object Hausdorff the image diagonal (in the units of ``spacing``), the largest distance in the image, as
  for HD95 in :func:`~diffseg_lightning.metrics.segmentation.segmentation_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from diffseg_lightning.exceptions import ConfigError

LabelMap = np.ndarray | torch.Tensor


def _as_labels(labels: LabelMap, name: str) -> np.ndarray:
    """A validated integer numpy copy of a label map."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"{name}: expected an instance label map of integers (0 = background, 1..N = objects), got dtype "
            f"{labels.dtype}; label a binary mask with scipy.ndimage.label first"
        )
    if labels.ndim == 0:
        raise ConfigError(f"{name}: expected an instance label map (H, W), got a scalar")
    if labels.size and labels.min() < 0:
        raise ConfigError(f"{name}: labels must be >= 0 (0 = background), found {labels.min()}")
    return labels


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Map the labels to 0 (background) and 1..N in increasing order of the original labels."""
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if ids.size and ids[0] == 0:
        return inverse, ids.size - 1
    return inverse + 1, ids.size


class _Pair:
    """Relabelled prediction and reference of one case and their contingency table.

    Attributes:
        gt, pred: relabelled maps, 0 and 1..N.
        n_gt, n_pred: numbers of objects.
        inter: (n_gt, n_pred) pixel counts of the pairwise intersections.
        gt_area: (n_gt,) and pred_area: (n_pred,) object areas in pixels.
        union: (n_gt, n_pred) pairwise unions.
    """

    def __init__(self, pred: LabelMap, gt: LabelMap) -> None:
        pred_np, gt_np = _as_labels(pred, "pred"), _as_labels(gt, "gt")
        if pred_np.shape != gt_np.shape:
            raise ConfigError(f"pred {pred_np.shape} and gt {gt_np.shape} label maps differ in shape")
        self.shape = gt_np.shape
        self.gt, self.n_gt = _relabel(gt_np)
        self.pred, self.n_pred = _relabel(pred_np)
        table = np.bincount(
            (self.gt * (self.n_pred + 1) + self.pred).ravel(), minlength=(self.n_gt + 1) * (self.n_pred + 1)
        ).reshape(self.n_gt + 1, self.n_pred + 1)
        self.inter = table[1:, 1:]
        self.gt_area = table[1:].sum(axis=1)
        self.pred_area = table[:, 1:].sum(axis=0)
        self.union = self.gt_area[:, None] + self.pred_area[None, :] - self.inter

    @property
    def both_empty(self) -> bool:
        return self.n_gt == 0 and self.n_pred == 0

    @property
    def one_empty(self) -> bool:
        return (self.n_gt == 0) != (self.n_pred == 0)

    def iou(self) -> np.ndarray:
        """(n_gt, n_pred) pairwise IoU."""
        return self.inter / np.maximum(self.union, 1)


def _diagonal(shape: Sequence[int], spacing: Sequence[float] | None) -> float:
    extent = [n * (spacing[i] if spacing is not None else 1.0) for i, n in enumerate(shape)]
    return math.hypot(*extent)


def _weighted_best_dice(inter: np.ndarray, area: np.ndarray, other_area: np.ndarray) -> float:
    """Sum over the rows' objects of area weight x Dice with the maximally overlapping column object."""
    best = inter.argmax(axis=1)  # first maximum: the smallest label on ties (MATLAB's mode in the GlaS code)
    best_inter = inter[np.arange(inter.shape[0]), best]
    dice = np.where(best_inter > 0, 2.0 * best_inter / (area + other_area[best]), 0.0)
    return float((area / area.sum() * dice).sum())


def object_dice(pred: LabelMap, gt: LabelMap) -> float:
    """Object-level Dice of the GlaS challenge.

    Sirinukunwattana et al., "Gland segmentation in colon histology images: The GlaS challenge contest",
    Medical Image Analysis 35:489-502, 2017, and its evaluation code (evaluation_metrics_v6):

    ``0.5 * [sum_i gamma_i Dice(G_i, S*(G_i)) + sum_j sigma_j Dice(G*(S_j), S_j)]``, where
    ``gamma_i = |G_i| / sum_k |G_k|``, ``sigma_j = |S_j| / sum_k |S_k|``, and ``S*(G_i)`` is the predicted
    object that maximally overlaps ``G_i`` (ties: the smallest label); an object that overlaps nothing in the
    other map scores Dice 0.

    Args:
        pred: (H, W) predicted instance labels (integers, 0 = background).
        gt: (H, W) reference instance labels.

    Returns:
        The object Dice in [0, 1]; NaN when both maps are empty, 0 when exactly one is (module docstring).
    """
    pair = _Pair(pred, gt)
    if pair.both_empty:
        return float("nan")
    if pair.one_empty:
        return 0.0
    gt_side = _weighted_best_dice(pair.inter, pair.gt_area, pair.pred_area)
    pred_side = _weighted_best_dice(pair.inter.T, pair.pred_area, pair.gt_area)
    return 0.5 * (gt_side + pred_side)


class _HausdorffCache:
    """Hausdorff distances between objects of two relabelled maps, each computed once on demand."""

    def __init__(self, pair: _Pair, spacing: Sequence[float] | None) -> None:
        self.pair = pair
        self.spacing = spacing
        self.gt_boxes = ndimage.find_objects(pair.gt)
        self.pred_boxes = ndimage.find_objects(pair.pred)
        self.cache: dict[tuple[int, int], float] = {}

    def __call__(self, i: int, j: int) -> float:
        """Symmetric Hausdorff distance between gt object ``i`` and predicted object ``j`` (0-based).

        Both objects are cropped to the box around them: every nearest point of one object lies in it, so the
        distance transform of the crop gives the exact distances.
        """
        key = (i, j)
        if key not in self.cache:
            a, b = self.gt_boxes[i], self.pred_boxes[j]
            box = tuple(
                slice(min(sa.start, sb.start), max(sa.stop, sb.stop)) for sa, sb in zip(a, b, strict=True)
            )
            in_gt = self.pair.gt[box] == i + 1
            in_pred = self.pair.pred[box] == j + 1
            to_pred = ndimage.distance_transform_edt(~in_pred, sampling=self.spacing)
            to_gt = ndimage.distance_transform_edt(~in_gt, sampling=self.spacing)
            self.cache[key] = float(max(to_pred[in_gt].max(), to_gt[in_pred].max()))
        return self.cache[key]


def object_hausdorff(pred: LabelMap, gt: LabelMap, spacing: Sequence[float] | None = None) -> float:
    """Object-level Hausdorff distance of the GlaS challenge.

    Sirinukunwattana et al., Medical Image Analysis 35:489-502, 2017, and its evaluation code:

    ``0.5 * [sum_i gamma_i H(G_i, S*(G_i)) + sum_j sigma_j H(G*(S_j), S_j)]`` with the area weights of
    :func:`object_dice`, where ``H`` is the symmetric Hausdorff distance between the two objects' pixel sets
    (Euclidean, all pixels, not a percentile), ``S*(G_i)`` the maximally overlapping object of the other map
    and, for an object that overlaps nothing there, the object of the other map nearest to it in Hausdorff
    distance (ties: the smallest label).

    Args:
        pred: (H, W) predicted instance labels (integers, 0 = background).
        gt: (H, W) reference instance labels.
        spacing: pixel spacing per axis, e.g. (dy, dx); None measures in pixels.

    Returns:
        The object Hausdorff distance (0 for a perfect prediction); NaN when both maps are empty and the
        image diagonal when exactly one is (module docstring).
    """
    pair = _Pair(pred, gt)
    if spacing is not None and len(spacing) != len(pair.shape):
        raise ConfigError(f"spacing {tuple(spacing)} does not match the {len(pair.shape)}-D label maps")
    if pair.both_empty:
        return float("nan")
    if pair.one_empty:
        return _diagonal(pair.shape, spacing)
    hd = _HausdorffCache(pair, spacing)

    def side(inter: np.ndarray, area: np.ndarray, distance) -> float:
        total = 0.0
        for r in range(inter.shape[0]):
            if inter[r].max() > 0:
                d = distance(r, int(inter[r].argmax()))
            else:
                d = min(distance(r, k) for k in range(inter.shape[1]))
            total += area[r] / area.sum() * d
        return total

    gt_side = side(pair.inter, pair.gt_area, hd)
    pred_side = side(pair.inter.T, pair.pred_area, lambda j, i: hd(i, j))
    return 0.5 * (gt_side + pred_side)


def _match(pair: _Pair, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matched (gt, pred) object indices whose IoU exceeds ``threshold``.

    With ``threshold >= 0.5`` a pair with IoU > threshold is the only candidate of both its objects
    (two disjoint objects cannot each cover more than half of a third), so the matching is unique and
    taken directly. Below 0.5, the matching maximises the number of matched pairs, then their total IoU
    (Hungarian algorithm, as in StarDist's ``matching``; Schmidt et al., MICCAI 2018).
    """
    iou = pair.iou()
    valid = iou > threshold
    if threshold >= 0.5 or not valid.any():
        return np.nonzero(valid)
    big = min(pair.n_gt, pair.n_pred) + 1.0  # one more match outweighs any IoU gain
    rows, cols = linear_sum_assignment(np.where(valid, big + iou, 0.0), maximize=True)
    keep = valid[rows, cols]
    return rows[keep], cols[keep]


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-to-one assignment of least total cost (``scipy.optimize.linear_sum_assignment``).

    Used to match predictions to reference objects in training losses (DETR-style set prediction).

    Args:
        cost: (N, M) cost of each prediction against each target.

    Returns:
        (prediction indices, target indices), int64 on ``cost``'s device, each of length min(N, M),
        sorted by target index.
    """
    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    order = np.argsort(cols)
    dev = cost.device
    return (
        torch.as_tensor(rows[order], dtype=torch.long, device=dev),
        torch.as_tensor(cols[order], dtype=torch.long, device=dev),
    )


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"IoU threshold must be in [0, 1), got {threshold}")


def f1_at_iou(pred: LabelMap, gt: LabelMap, threshold: float = 0.5) -> dict[str, float]:
    """Detection precision, recall and F1 with a true positive at IoU > ``threshold``.

    A predicted object is a true positive when its IoU with a not yet matched reference object exceeds the
    threshold (one-to-one matching, see below); FP = unmatched predictions, FN = unmatched references;
    ``F1 = 2 TP / (2 TP + FP + FN)``. This is the IoU criterion of the nuclei literature (e.g. StarDist,
    Schmidt et al., MICCAI 2018; Data Science Bowl 2018), not the GlaS detection rule (overlap with at least
    half of the reference object's area). With ``threshold >= 0.5`` the matching is unique; below it the
    matching maximises the number of true positives (Hungarian algorithm).

    Args:
        pred: (H, W) predicted instance labels (integers, 0 = background).
        gt: (H, W) reference instance labels.
        threshold: the IoU a match must exceed, in [0, 1).

    Returns:
        ``{"precision", "recall", "f1", "tp", "fp", "fn"}``. Both maps empty: precision, recall and F1 NaN.
        A zero denominator otherwise (no predictions, or no references) gives 0 for that ratio
        (scikit-learn's ``zero_division=0``, StarDist's convention).
    """
    _check_threshold(threshold)
    pair = _Pair(pred, gt)
    rows, _ = _match(pair, threshold)
    tp = int(rows.size)
    fp, fn = pair.n_pred - tp, pair.n_gt - tp
    if pair.both_empty:
        nan = float("nan")
        return {"precision": nan, "recall": nan, "f1": nan, "tp": 0, "fp": 0, "fn": 0}
    return {
        "precision": tp / pair.n_pred if pair.n_pred else 0.0,
        "recall": tp / pair.n_gt if pair.n_gt else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def _consecutive(labels: LabelMap, name: str) -> np.ndarray:
    """An integer label map relabelled to 0 (background) and 1..N."""
    x = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if not np.issubdtype(x.dtype, np.integer) or (x.size and x.min() < 0):
        raise ConfigError(
            f"glas_f1: {name} must be a label map of integers >= 0 (0 = background), got {x.dtype}"
        )
    ids, inverse = np.unique(x, return_inverse=True)
    inverse = inverse.reshape(x.shape)
    return inverse if ids.size == 0 or ids[0] == 0 else inverse + 1


def glas_f1(pred: LabelMap, gt: LabelMap) -> dict[str, float]:
    """Object-level F1 of the GlaS challenge (Sirinukunwattana et al., MedIA 35:489-502, 2017, Sec. 3.2).

    A predicted object is a true positive when it covers more than half of the reference object it overlaps
    most: ``|S_j n G_i*| / |G_i*| > 0.5``. As two disjoint objects cannot both cover more than half of one
    reference object, each reference object is detected at most once. FP = predicted objects that are not
    TP, FN = reference objects without a TP; ``F1 = 2 TP / (2 TP + FP + FN)``. Both maps empty: NaN (the
    package's empty-mask policy, :mod:`diffseg_lightning.metrics.instances`); one empty: 0.

    Args:
        pred: (H, W) predicted instance labels (integers, 0 = background).
        gt: (H, W) reference instance labels.

    Returns:
        ``{"f1", "precision", "recall", "tp", "fp", "fn"}``.
    """
    p, g = _consecutive(pred, "pred"), _consecutive(gt, "gt")
    if p.shape != g.shape:
        raise ConfigError(f"glas_f1: pred {p.shape} and gt {g.shape} differ in shape")
    p, g = p.ravel(), g.ravel()
    n_pred, n_gt = int(p.max(initial=0)), int(g.max(initial=0))
    if n_pred == 0 and n_gt == 0:
        nan = float("nan")
        return {"f1": nan, "precision": nan, "recall": nan, "tp": 0, "fp": 0, "fn": 0}
    table = np.bincount(g * (n_pred + 1) + p, minlength=(n_gt + 1) * (n_pred + 1)).reshape(
        n_gt + 1, n_pred + 1
    )
    inter, gt_area = table[1:, 1:], table[1:].sum(axis=1)
    tp = 0
    if n_gt and n_pred:
        best = inter.argmax(axis=0)  # (n_pred,) the reference object each prediction overlaps most
        covered = inter[best, np.arange(n_pred)] / gt_area[best]
        tp = int((covered > 0.5).sum())
    fp, fn = n_pred - tp, n_gt - tp
    return {
        "f1": 2 * tp / (2 * tp + fp + fn),
        "precision": tp / n_pred if n_pred else 0.0,
        "recall": tp / n_gt if n_gt else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def aggregated_jaccard_index(pred: LabelMap, gt: LabelMap) -> float:
    """Aggregated Jaccard Index (AJI).

    Kumar et al., "A dataset and a technique for generalized nuclear segmentation for computational
    pathology", IEEE TMI 36(7):1550-1560, 2017: every reference object ``G_i`` is paired with
    the predicted object ``S_j`` of largest IoU with it (ties: the smallest label; a predicted object may be
    paired with several references); ``C += |G_i n S_j|``, ``U += |G_i u S_j|``; then the area of every
    predicted object paired with no reference is added to ``U``; ``AJI = C / U``.

    A reference object that overlaps no prediction adds its own area to ``U`` and pairs with nothing (the
    reading of Hover-Net's ``get_fast_aji``, Graham et al., MedIA 2019; a literal arg-max over all-zero IoUs
    would pair it with an arbitrary prediction).

    Args:
        pred: (H, W) predicted instance labels (integers, 0 = background).
        gt: (H, W) reference instance labels.

    Returns:
        AJI in [0, 1]; NaN when both maps are empty, 0 when exactly one is (module docstring).
    """
    pair = _Pair(pred, gt)
    if pair.both_empty:
        return float("nan")
    if pair.one_empty:
        return 0.0
    iou = pair.iou()
    best = iou.argmax(axis=1)
    rows = np.arange(pair.n_gt)
    paired = iou[rows, best] > 0
    intersection = pair.inter[rows[paired], best[paired]].sum()
    union = pair.union[rows[paired], best[paired]].sum() + pair.gt_area[~paired].sum()
    used = np.zeros(pair.n_pred, dtype=bool)
    used[best[paired]] = True
    union += pair.pred_area[~used].sum()
    return float(intersection / union)


def panoptic_quality(pred: LabelMap, gt: LabelMap, threshold: float = 0.5) -> dict[str, float]:
    """Detection quality, segmentation quality and panoptic quality of one class of instances.

    Kirillov, He, Girshick, Rother & Dollar, "Panoptic segmentation", CVPR 2019: objects match
    at IoU > 0.5 (unique); ``SQ = sum_TP IoU / |TP|``, ``DQ = |TP| / (|TP| + |FP|/2 + |FN|/2)`` (the paper's
    recognition quality RQ; "DQ" as in Hover-Net), ``PQ = SQ * DQ``. Another ``threshold`` uses the matching
    of :func:`f1_at_iou`.

    Args:
        pred: (H, W) predicted instance labels (integers, 0 = background).
        gt: (H, W) reference instance labels.
        threshold: the IoU a match must exceed, in [0, 1); 0.5 is the paper's.

    Returns:
        ``{"dq", "sq", "pq"}``. SQ is 0 when there is no true positive (panopticapi's convention), so
        PQ = SQ * DQ always holds; all three are NaN when both maps are empty (panopticapi leaves such a
        class out of its mean).
    """
    _check_threshold(threshold)
    pair = _Pair(pred, gt)
    if pair.both_empty:
        nan = float("nan")
        return {"dq": nan, "sq": nan, "pq": nan}
    rows, cols = _match(pair, threshold)
    tp = rows.size
    fp, fn = pair.n_pred - tp, pair.n_gt - tp
    sq = float(pair.iou()[rows, cols].sum() / tp) if tp else 0.0
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    return {"dq": dq, "sq": sq, "pq": sq * dq}


# -------------------------------------------------------------------------------- panoptic (K categories)
# Segment maps with a category per segment (ODISE's evaluation): per-image counts, summed over a data set,
# then PQ / SQ / RQ and the mean IoU of the semantic view. One category reproduces :func:`panoptic_quality`.
def panoptic_counts(
    pred_segments: np.ndarray,
    pred_classes: np.ndarray,
    gt_segments: np.ndarray,
    gt_classes: np.ndarray,
    num_classes: int,
) -> np.ndarray:
    """Per-category PQ counts of one image (Kirillov et al., CVPR 2019): (K, 4) = TP, FP, FN, sum of TP IoUs.

    A predicted and a reference segment match when they have the same category and IoU > 0.5 (unique
    because segments do not overlap). Segment maps: (H, W) ints, 0 void; class maps: 0 void, k + 1 for k.
    """
    counts = np.zeros((num_classes, 4), dtype=np.float64)
    p_ids, p_inv = np.unique(pred_segments, return_inverse=True)
    g_ids, g_inv = np.unique(gt_segments, return_inverse=True)
    p_inv, g_inv = p_inv.reshape(-1), g_inv.reshape(-1)
    joint = np.bincount(p_inv * g_ids.size + g_inv, minlength=p_ids.size * g_ids.size).reshape(
        p_ids.size, g_ids.size
    )
    p_area, g_area = joint.sum(1), joint.sum(0)
    p_cls = np.zeros(p_ids.size, np.int64)
    g_cls = np.zeros(g_ids.size, np.int64)
    p_cls[p_inv] = pred_classes.reshape(-1)
    g_cls[g_inv] = gt_classes.reshape(-1)
    p_real, g_real = p_ids != 0, g_ids != 0
    iou = joint / np.maximum(p_area[:, None] + g_area[None] - joint, 1)
    match = (iou > 0.5) & (p_cls[:, None] == g_cls[None]) & p_real[:, None] & g_real[None]
    pi, gi = np.nonzero(match)
    np.add.at(counts[:, 0], p_cls[pi] - 1, 1)
    np.add.at(counts[:, 3], p_cls[pi] - 1, iou[pi, gi])
    matched_p, matched_g = match.any(1), match.any(0)
    np.add.at(counts[:, 1], p_cls[p_real & ~matched_p] - 1, 1)
    np.add.at(counts[:, 2], g_cls[g_real & ~matched_g] - 1, 1)
    return counts


def panoptic_quality_from_counts(counts: np.ndarray, select: np.ndarray | None = None) -> dict[str, float]:
    """PQ, SQ, RQ averaged over the categories (``select`` bool (K,)) that have TP + FP + FN > 0 (panopticapi).

    Per category ``PQ = sum IoU_TP / (TP + FP / 2 + FN / 2)``, ``SQ = sum IoU_TP / TP`` (0 without TP),
    ``RQ = TP / (TP + FP / 2 + FN / 2)``. NaN when no selected category occurs.
    """
    tp, fp, fn, iou = counts.T
    present = tp + fp + fn > 0
    if select is not None:
        present &= select
    if not present.any():
        return {"pq": float("nan"), "sq": float("nan"), "rq": float("nan")}
    denom = tp + 0.5 * fp + 0.5 * fn
    pq = np.where(present, iou / np.maximum(denom, 1e-12), 0.0)
    sq = np.where(present & (tp > 0), iou / np.maximum(tp, 1), 0.0)
    rq = np.where(present, tp / np.maximum(denom, 1e-12), 0.0)
    n = present.sum()
    return {"pq": float(pq.sum() / n), "sq": float(sq.sum() / n), "rq": float(rq.sum() / n)}


def semantic_counts(pred_classes: np.ndarray, gt_classes: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, 2) per-category intersection and union of the semantic maps (0 = background, k + 1 = category k)."""
    p, g = pred_classes.reshape(-1), gt_classes.reshape(-1)
    pred_area = np.bincount(p, minlength=num_classes + 1)[1:]
    gt_area = np.bincount(g, minlength=num_classes + 1)[1:]
    inter = np.bincount(p[p == g], minlength=num_classes + 1)[1:]
    return np.stack([inter, pred_area + gt_area - inter], axis=1).astype(np.float64)


def mean_iou(counts: np.ndarray, select: np.ndarray | None = None) -> float:
    """Mean over categories with a non-empty union (and ``select``) of intersection / union; NaN if none."""
    present = counts[:, 1] > 0
    if select is not None:
        present &= select
    return float((counts[present, 0] / counts[present, 1]).mean()) if present.any() else float("nan")
