"""Instance metrics on hand-made label maps; every expected number is worked out by hand in the comments.

Objects are drawn as column ranges over all rows of small images, so areas are (rows x columns) and the
Hausdorff distances are horizontal distances between columns.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffseg_lightning.metrics.instances import (
    aggregated_jaccard_index,
    f1_at_iou,
    mean_iou,
    object_dice,
    object_hausdorff,
    panoptic_counts,
    panoptic_quality,
    panoptic_quality_from_counts,
    semantic_counts,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def bars(width: int, *objects: tuple[int, int, int], rows: int = 2) -> np.ndarray:
    """A (rows, width) label map; each object ``(label, first column, last column + 1)`` fills all rows."""
    out = np.zeros((rows, width), dtype=np.int64)
    for label, start, stop in objects:
        out[:, start:stop] = label
    return out


def all_metrics(pred, gt, threshold: float = 0.5) -> dict[str, float]:
    return {
        "object_dice": object_dice(pred, gt),
        "object_hausdorff": object_hausdorff(pred, gt),
        "aji": aggregated_jaccard_index(pred, gt),
        **f1_at_iou(pred, gt, threshold),
        **panoptic_quality(pred, gt, threshold),
    }


def test_perfect_prediction_with_other_label_ids():
    gt = bars(8, (1, 0, 3), (2, 5, 8))
    pred = bars(8, (7, 0, 3), (3, 5, 8))  # same objects, other (non-consecutive) ids
    m = all_metrics(pred, gt)
    for name in ("object_dice", "aji", "precision", "recall", "f1", "dq", "sq", "pq"):
        assert m[name] == pytest.approx(1.0), name
    assert m["object_hausdorff"] == 0.0
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    # torch tensors are accepted as well
    assert object_dice(torch.from_numpy(pred), torch.from_numpy(gt)) == pytest.approx(1.0)


def test_split_object():
    # gt: G1 = columns 0-3 (area 8). pred: S1 = columns 0-2 (area 6), S2 = column 3 (area 2).
    gt, pred = bars(4, (1, 0, 4)), bars(4, (1, 0, 3), (2, 3, 4))
    m = all_metrics(pred, gt)
    # object Dice: gt side G1->S1: 2*6/(8+6) = 6/7; pred side: S1->G1 6/7 (weight 6/8), S2->G1 2*2/(2+8) = 0.4
    # (weight 2/8) -> 0.742857; mean of the sides (6/7 + 0.742857) / 2 = 0.8
    assert m["object_dice"] == pytest.approx(0.8)
    # Hausdorff: H(G1, S1) = 1 (column 3 to column 2); H(G1, S2) = 3 (column 0 to column 3).
    # gt side 1; pred side 6/8 * 1 + 2/8 * 3 = 1.5; mean 1.25
    assert m["object_hausdorff"] == pytest.approx(1.25)
    # IoU(G1, S1) = 6/8 = 0.75 > 0.5: TP = 1, FP = 1 (S2), FN = 0
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((0.5, 1.0, 2 / 3))
    # AJI: G1 pairs with S1: C = 6, U = 8; S2 unused adds 2: 6 / 10
    assert m["aji"] == pytest.approx(0.6)
    # PQ: SQ = 0.75, DQ = 1 / (1 + 0.5) = 2/3, PQ = 0.5
    assert (m["sq"], m["dq"], m["pq"]) == pytest.approx((0.75, 2 / 3, 0.5))


def test_merged_objects():
    # gt: G1 = columns 0-1 (area 4), G2 = columns 3-7 (area 10). pred: S1 = columns 0-7 (area 16).
    gt, pred = bars(8, (1, 0, 2), (2, 3, 8)), bars(8, (1, 0, 8))
    m = all_metrics(pred, gt)
    # object Dice: gt side: G1 2*4/20 = 0.4 (weight 4/14), G2 2*10/26 = 10/13 (weight 10/14) -> 120.8/182;
    # pred side: S1 -> G2 (largest overlap) 10/13 = 140/182; mean 130.4/182
    assert m["object_dice"] == pytest.approx(130.4 / 182)
    # Hausdorff: H(G1, S1) = 6 (column 7 to column 1), H(G2, S1) = 3 (column 0 to column 3).
    # gt side (4*6 + 10*3)/14 = 54/14; pred side 3 = 42/14; mean 48/14
    assert m["object_hausdorff"] == pytest.approx(48 / 14)
    # IoU(G2, S1) = 10/16 = 0.625 > 0.5, IoU(G1, S1) = 4/16: TP = 1, FP = 0, FN = 1 (G1)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    # AJI: both gt objects pair with S1 and each adds the union 16: C = 4 + 10, U = 16 + 16 -> 14/32
    assert m["aji"] == pytest.approx(14 / 32)
    # PQ: SQ = 0.625, DQ = 1 / (1 + 0.5) = 2/3, PQ = 0.625 * 2/3
    assert (m["sq"], m["dq"], m["pq"]) == pytest.approx((0.625, 2 / 3, 0.625 * 2 / 3))


def test_missed_object():
    # gt: G1 = columns 0-1, G2 = columns 4-5 (areas 4). pred: S1 = G1.
    gt, pred = bars(6, (1, 0, 2), (2, 4, 6)), bars(6, (1, 0, 2))
    m = all_metrics(pred, gt)
    # object Dice: gt side 0.5*1 + 0.5*0; pred side 1 -> 0.75
    assert m["object_dice"] == pytest.approx(0.75)
    # Hausdorff: G2 overlaps nothing -> nearest prediction by Hausdorff, S1: H = 4 (column 5 to 1, 0 to 4).
    # gt side 0.5*0 + 0.5*4 = 2; pred side 0; mean 1
    assert m["object_hausdorff"] == pytest.approx(1.0)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    # AJI: C = 4, U = 4 + |G2| = 8
    assert m["aji"] == pytest.approx(0.5)
    assert (m["sq"], m["dq"], m["pq"]) == pytest.approx((1.0, 2 / 3, 2 / 3))


def test_false_positive():
    # the mirror of the missed object: pred has an extra object S2 = columns 4-5
    gt, pred = bars(6, (1, 0, 2)), bars(6, (1, 0, 2), (2, 4, 6))
    m = all_metrics(pred, gt)
    assert m["object_dice"] == pytest.approx(0.75)
    assert m["object_hausdorff"] == pytest.approx(1.0)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((0.5, 1.0, 2 / 3))
    assert m["aji"] == pytest.approx(0.5)  # C = 4, U = 4 + |S2| = 8
    assert (m["sq"], m["dq"], m["pq"]) == pytest.approx((1.0, 2 / 3, 2 / 3))


def test_unmatched_object_takes_the_nearest_object_by_hausdorff_distance():
    # one row. gt: G = columns 10-11. pred: S1 = columns 0-8 (closest pixel, 2 away), S2 = columns 15-16.
    gt = bars(20, (1, 10, 12), rows=1)
    pred = bars(20, (1, 0, 9), (2, 15, 17), rows=1)
    # H(G, S1) = 10 (column 0 to column 10); H(G, S2) = 5 (10 to 15, 16 to 11): G takes S2, not the closer S1.
    # gt side 5; pred side: S1 -> G 10 (weight 9/11), S2 -> G 5 (weight 2/11) = 100/11; mean 155/22
    assert object_hausdorff(pred, gt) == pytest.approx(155 / 22)
    # with a pixel spacing of 0.5 along the columns every distance halves
    assert object_hausdorff(pred, gt, spacing=(1.0, 0.5)) == pytest.approx(155 / 44)
    assert object_dice(pred, gt) == 0.0  # no overlaps at all


def test_aji_against_the_formula():
    # gt (rows 0-1): G1 = columns 0-2 (area 6), G2 = columns 4-5 (area 4).
    # pred: S1 = columns 1-3 (rows 0-1, area 6), S2 = columns 5-7 (rows 0-1, area 6), S3 = row 2, columns 0-1.
    gt = bars(8, (1, 0, 3), (2, 4, 6), rows=3)
    gt[2] = 0
    pred = bars(8, (1, 1, 4), (2, 5, 8), rows=3)
    pred[2] = 0
    pred[2, 0:2] = 3
    # G1 -> S1: |n| = 4 (columns 1-2), |u| = 8 (columns 0-3), IoU 0.5; G2 -> S2: |n| = 2, |u| = 8, IoU 0.25.
    # C = 4 + 2 = 6; U = 8 + 8 + |S3| = 18
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(6 / 18)
    # at IoU > 0.5 nothing matches (0.5 is not > 0.5): TP 0, FP 3, FN 2
    f1 = f1_at_iou(pred, gt)
    assert (f1["tp"], f1["fp"], f1["fn"], f1["f1"]) == (0, 3, 2, 0.0)
    pq = panoptic_quality(pred, gt)
    assert (pq["dq"], pq["sq"], pq["pq"]) == (0.0, 0.0, 0.0)
    # at IoU > 0.2 both pairs match: TP 2, FP 1, FN 0; SQ = (0.5 + 0.25)/2, DQ = 2 / 2.5
    f1 = f1_at_iou(pred, gt, threshold=0.2)
    assert (f1["tp"], f1["fp"], f1["fn"]) == (2, 1, 0)
    assert (f1["precision"], f1["recall"], f1["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    pq = panoptic_quality(pred, gt, threshold=0.2)
    assert (pq["sq"], pq["dq"], pq["pq"]) == pytest.approx((0.375, 0.8, 0.3))


def test_low_threshold_matching_maximises_the_number_of_matches():
    # one row. G1 = [0, 10), G2 = [10, 16); S1 = [4, 13), S2 = [0, 3).
    # IoU(G1, S1) = 6/13 = 0.46, IoU(G1, S2) = 3/10 = 0.3, IoU(G2, S1) = 3/12 = 0.25.
    # Greedy by IoU would take G1-S1 and leave G2 alone; the optimal matching is G1-S2, G2-S1.
    gt = bars(16, (1, 0, 10), (2, 10, 16), rows=1)
    pred = bars(16, (1, 4, 13), (2, 0, 3), rows=1)
    f1 = f1_at_iou(pred, gt, threshold=0.2)
    assert (f1["tp"], f1["fp"], f1["fn"], f1["f1"]) == (2, 0, 0, 1.0)
    assert panoptic_quality(pred, gt, threshold=0.2)["sq"] == pytest.approx((0.3 + 0.25) / 2)


def test_pq_is_sq_times_dq_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(5):
        gt = rng.integers(0, 4, size=(6, 6))
        pred = np.where(rng.random((6, 6)) < 0.7, gt, rng.integers(0, 4, size=(6, 6)))
        pq = panoptic_quality(pred, gt)
        assert pq["pq"] == pytest.approx(pq["sq"] * pq["dq"])
        f1 = f1_at_iou(pred, gt)
        assert f1["f1"] == pytest.approx(pq["dq"])  # F1 at IoU 0.5 is PQ's detection quality


def test_empty_maps_follow_the_written_policy():
    empty, some = np.zeros((4, 6), dtype=np.int64), bars(6, (1, 0, 2), rows=4)
    both = all_metrics(empty, empty)
    for name in ("object_dice", "object_hausdorff", "aji", "precision", "recall", "f1", "dq", "sq", "pq"):
        assert math.isnan(both[name]), name
    diagonal = math.hypot(4, 6)
    for pred, gt in ((empty, some), (some, empty)):
        m = all_metrics(pred, gt)
        for name in ("object_dice", "aji", "precision", "recall", "f1", "dq", "sq", "pq"):
            assert m[name] == 0.0, name
        assert m["object_hausdorff"] == pytest.approx(diagonal)
    assert object_hausdorff(empty, some, spacing=(2.0, 1.0)) == pytest.approx(math.hypot(8, 6))


def test_bad_input_is_rejected_clearly():
    labels = bars(6, (1, 0, 2))
    with pytest.raises(ValueError, match="differ in shape"):
        object_dice(labels, labels[:, :4])
    with pytest.raises(ValueError, match="integers"):
        object_dice(labels.astype(np.float32), labels)
    with pytest.raises(ValueError, match="scipy.ndimage.label"):
        aggregated_jaccard_index(labels > 0, labels)
    with pytest.raises(ValueError, match=">= 0"):
        f1_at_iou(-labels, labels)
    with pytest.raises(ValueError, match="threshold"):
        panoptic_quality(labels, labels, threshold=1.0)
    with pytest.raises(ValueError, match="spacing"):
        object_hausdorff(labels, labels, spacing=(1.0,))


def _brute_force_glas(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Object Dice and Hausdorff written as loops over objects on pixel coordinates (the GlaS code's reading)."""
    from scipy.spatial.distance import cdist

    def objects(labels):
        return [labels == k for k in np.unique(labels) if k != 0]

    def hausdorff(a, b):
        d = cdist(np.argwhere(a), np.argwhere(b))
        return max(d.min(axis=1).max(), d.min(axis=0).max())

    def side(src, dst):
        total_area = sum(o.sum() for o in src)
        dice = dist = 0.0
        for o in src:
            overlaps = [(o & t).sum() for t in dst]
            w = o.sum() / total_area
            if max(overlaps) > 0:
                t = dst[int(np.argmax(overlaps))]
                dice += w * 2 * (o & t).sum() / (o.sum() + t.sum())
                dist += w * hausdorff(o, t)
            else:
                dist += w * min(hausdorff(o, t) for t in dst)
        return dice, dist

    (dg, hg), (dp, hp) = side(objects(gt), objects(pred)), side(objects(pred), objects(gt))
    return (dg + dp) / 2, (hg + hp) / 2


def test_object_dice_and_hausdorff_match_a_brute_force_reading_on_random_maps():
    from scipy import ndimage

    rng = np.random.default_rng(5)
    for _ in range(4):
        gt, _ = ndimage.label(ndimage.binary_opening(rng.random((20, 20)) < 0.55))
        pred, _ = ndimage.label(ndimage.binary_opening(rng.random((20, 20)) < 0.55))
        expected_dice, expected_hd = _brute_force_glas(pred, gt)
        assert object_dice(pred, gt) == pytest.approx(expected_dice)
        assert object_hausdorff(pred, gt) == pytest.approx(expected_hd)


# ------------------------------------------------------------------------- panoptic counts (K categories)
def test_pq_per_category_seen_and_unseen_by_hand():
    """Two categories; category 0 (seen): one TP of IoU 3/4 and one FN; category 1 (unseen): one FP."""
    gt_s = np.zeros((4, 6), np.int64)
    gt_c = np.zeros((4, 6), np.int64)
    gt_s[0:2, 0:2], gt_c[0:2, 0:2] = 1, 1  # category 0, 4 px
    gt_s[3, 4:6], gt_c[3, 4:6] = 2, 1  # category 0, missed
    pr_s = np.zeros_like(gt_s)
    pr_c = np.zeros_like(gt_c)
    pr_s[0:2, 0:2], pr_c[0:2, 0:2] = 5, 1
    pr_s[1, 1], pr_c[1, 1] = 0, 0  # 3 of the 4 pixels: IoU 3/4
    pr_s[0:2, 4:6], pr_c[0:2, 4:6] = 7, 2  # category 1 where nothing is: FP
    counts = panoptic_counts(pr_s, pr_c, gt_s, gt_c, 2)
    np.testing.assert_allclose(counts, [[1, 0, 1, 0.75], [0, 1, 0, 0]])
    seen = np.array([True, False])
    pq_seen = panoptic_quality_from_counts(counts, seen)
    assert pq_seen["pq"] == pytest.approx(0.75 / 1.5) and pq_seen["sq"] == pytest.approx(0.75)
    assert pq_seen["rq"] == pytest.approx(1 / 1.5)
    assert panoptic_quality_from_counts(counts, ~seen)["pq"] == 0.0
    assert panoptic_quality_from_counts(counts)["pq"] == pytest.approx(0.25)
    # one category is the metric of metrics/instances.py (an independent implementation)
    reference = panoptic_quality(np.where(pr_c == 1, pr_s, 0), np.where(gt_c == 1, gt_s, 0))
    assert pq_seen["pq"] == pytest.approx(reference["pq"]) and pq_seen["sq"] == pytest.approx(reference["sq"])
    assert math.isnan(panoptic_quality_from_counts(np.zeros((2, 4)))["pq"])
    # a segment of the right shape but the wrong category is a FP and a FN, never a TP
    wrong = panoptic_counts(np.where(pr_c == 1, pr_s, 0), np.where(pr_c == 1, 2, 0), gt_s, gt_c, 2)
    np.testing.assert_allclose(wrong[:, :3], [[0, 0, 2], [0, 1, 0]])
    semantic = semantic_counts(pr_c, gt_c, 2)
    np.testing.assert_allclose(semantic, [[3, 6], [0, 4]])
    assert mean_iou(semantic) == pytest.approx(0.25) and mean_iou(semantic, seen) == pytest.approx(0.5)
