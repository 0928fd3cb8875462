"""GED, HM-IoU, soft Dice and sample diversity against hand calculations, brute force and their conventions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import assert_close

from diffseg_lightning.metrics.multi_annotator import (
    ged_by_sample_count,
    generalized_energy_distance,
    hungarian_matched_iou,
    iou_distance_matrix,
    sample_diversity,
    soft_dice,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def masks(*rows: list[int]) -> torch.Tensor:
    """One case of 1x4 masks: masks([1,1,0,0], [1,0,0,0]) -> (1, 2, 1, 4) float {0, 1}."""
    return torch.tensor(rows, dtype=torch.float32).view(1, len(rows), 1, -1)


def random_masks(generator: torch.Generator, *shape: int, p: float = 0.4) -> torch.Tensor:
    return torch.rand(*shape, generator=generator) < p


# s1 = [1,1,0,0], s2 = [1,0,0,0]; y1 = [1,1,0,0], y2 = [0,0,1,1]
S_HAND = masks([1, 1, 0, 0], [1, 0, 0, 0])
Y_HAND = masks([1, 1, 0, 0], [0, 0, 1, 1])


def test_iou_distance_matrix_by_hand():
    # d(s1,y1) = 1 - 2/2 = 0; d(s1,y2) = 1 - 0/4 = 1; d(s2,y1) = 1 - 1/2 = 0.5; d(s2,y2) = 1 - 0/3 = 1
    d = iou_distance_matrix(S_HAND, Y_HAND)
    assert d.shape == (1, 2, 2) and d.dtype == torch.float32
    assert_close(d, torch.tensor([[[0.0, 1.0], [0.5, 1.0]]]))
    # symmetric, zero on the diagonal
    assert_close(iou_distance_matrix(Y_HAND, S_HAND), d.transpose(1, 2))
    assert (torch.diagonal(iou_distance_matrix(S_HAND, S_HAND), dim1=1, dim2=2) == 0).all()


def test_iou_distance_empty_mask_convention():
    empty, full = masks([0, 0, 0, 0]), masks([0, 1, 1, 0])
    assert iou_distance_matrix(empty, empty).item() == 0.0  # both empty: IoU 1, d = 0
    assert iou_distance_matrix(empty, full).item() == 1.0  # one empty: IoU 0, d = 1
    assert iou_distance_matrix(full, empty).item() == 1.0


def test_ged_by_hand_pins_the_diagonal_convention():
    # E[d(S,Y)] = (0 + 1 + 0.5 + 1) / 4 = 0.625
    # E[d(S,S')] over all 4 ordered pairs, diagonal included: (0 + 0.5 + 0.5 + 0) / 4 = 0.25
    # E[d(Y,Y')] likewise: (0 + 1 + 1 + 0) / 4 = 0.5
    # D^2 = 2 * 0.625 - 0.25 - 0.5 = 0.5   (diagonal excluded would give 1.25 - 0.5 - 1.0 = -0.25)
    assert generalized_energy_distance(S_HAND, Y_HAND).item() == pytest.approx(0.5)


def test_ged_single_sample_single_annotator_is_twice_the_distance():
    # S = A = 1: the self terms are 0, so D^2 = 2 d(s, y); d([1,1,0,0], [0,1,1,0]) = 1 - 1/3
    s, y = masks([1, 1, 0, 0]), masks([0, 1, 1, 0])
    assert generalized_energy_distance(s, y).item() == pytest.approx(2 * (2 / 3))


def test_ged_empty_mask_convention():
    empty2 = masks([0, 0, 0, 0], [0, 0, 0, 0])
    # every mask empty: all distances 0, GED 0 (a correct "no lesion" prediction is perfect)
    assert generalized_energy_distance(empty2, empty2).item() == 0.0
    # empty samples against a non-empty annotator: 2 * 1 - 0 - 0 = 2
    assert generalized_energy_distance(empty2, masks([0, 1, 0, 0])).item() == pytest.approx(2.0)


def test_ged_identical_distributions_is_zero_and_nonnegative():
    g = torch.Generator().manual_seed(0)
    y = random_masks(g, 4, 3, 4, 4)
    same = y[:, [2, 0, 1]]  # the same multiset of masks, in another order
    assert_close(generalized_energy_distance(same, y), torch.zeros(4))
    # the same distribution as a doubled multiset (each annotator twice) is also at distance 0
    assert_close(generalized_energy_distance(torch.cat([y, y], 1), y), torch.zeros(4))
    for _ in range(5):
        s, a = random_masks(g, 6, 5, 4, 4), random_masks(g, 6, 3, 4, 4)
        assert (generalized_energy_distance(s, a) >= -1e-6).all()


def test_ged_by_sample_count_equals_ged_on_sliced_samples():
    g = torch.Generator().manual_seed(1)
    s, y = random_masks(g, 3, 6, 5, 5), random_masks(g, 3, 4, 5, 5)
    out = ged_by_sample_count(s, y, counts=(1, 4, 16, 6))
    assert list(out) == [1, 4, 6]  # 16 > S = 6 is left out
    for n, value in out.items():
        assert_close(value, generalized_energy_distance(s[:, :n], y))
    with pytest.raises(ValueError, match="positive integers"):
        ged_by_sample_count(s, y, counts=(0, 2))


def brute_force_hm_iou(s: torch.Tensor, y: torch.Tensor) -> float:
    """Max over all permutations of the mean IoU against the cyclically tiled annotators (one case)."""
    num_s, num_a = s.shape[0], y.shape[0]
    tiled = y[[k % num_a for k in range(num_s)]]
    iou = 1 - iou_distance_matrix(s[None], tiled[None])[0]
    return max(
        sum(iou[i, perm[i]].item() for i in range(num_s)) / num_s
        for perm in itertools.permutations(range(num_s))
    )


def test_hungarian_matched_iou_by_hand():
    # cost 1 - IoU = [[0, 1], [0.5, 1]]: the matching s1-y1, s2-y2 costs 1, the other 1.5 -> mean IoU 1 - 1/2
    assert hungarian_matched_iou(S_HAND, Y_HAND).item() == pytest.approx(0.5)
    # S = 3, A = 2: annotators tiled to [y1, y2, y1]; s3 = y2. Best: s1-y1 (0), s3-y2 (0), s2-y1 (0.5)
    # -> mean IoU = 1 - 0.5 / 3
    s3 = masks([1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1])
    assert hungarian_matched_iou(s3, Y_HAND).item() == pytest.approx(1 - 0.5 / 3)


def test_hungarian_matched_iou_empty_masks_match_with_iou_one():
    empty_and_full = masks([0, 0, 0, 0], [1, 1, 0, 0])
    swapped = masks([1, 1, 0, 0], [0, 0, 0, 0])
    assert hungarian_matched_iou(empty_and_full, swapped).item() == pytest.approx(1.0)


@pytest.mark.parametrize(("num_s", "num_a"), [(4, 2), (5, 2), (3, 3), (2, 3), (5, 1)])
def test_hungarian_matched_iou_matches_brute_force(num_s, num_a):
    g = torch.Generator().manual_seed(10 * num_s + num_a)
    s, y = random_masks(g, 3, num_s, 3, 3), random_masks(g, 3, num_a, 3, 3)
    got = hungarian_matched_iou(s, y)
    for k in range(3):
        assert got[k].item() == pytest.approx(brute_force_hm_iou(s[k], y[k]), abs=1e-6)


def test_soft_dice_by_hand():
    # annotators [1,1,0,0] and [1,0,0,0] -> mean [1, 0.5, 0, 0]; probability [0.9, 0.45, 0.2, 0]
    # tau 0.1: pred [1,1,1,0], ref [1,1,0,0] -> 2*2/(3+2) = 0.8
    # tau 0.2 .. 0.4: pred [1,1,0,0] (0.2 > 0.2 is False), ref [1,1,0,0] -> 1
    # tau 0.5 .. 0.8: pred [1,0,0,0], ref [1,0,0,0] (0.5 > 0.5 is False) -> 1
    # tau 0.9: pred empty (0.9 > 0.9 is False), ref [1,0,0,0] -> 0
    # mean = (0.8 + 7 * 1 + 0) / 9
    probability = torch.tensor([[[0.9, 0.45, 0.2, 0.0]]])
    y = masks([1, 1, 0, 0], [1, 0, 0, 0])
    assert soft_dice(probability, y).item() == pytest.approx(7.8 / 9)


def test_soft_dice_annotator_mean_ties_are_not_foreground():
    # 10 annotators, 3 of them mark the pixel: mean 0.3, which is not > 0.3
    y = torch.zeros(1, 10, 1, 2)
    y[0, :3, 0, 0] = 1
    probability = torch.tensor([[[0.35, 0.0]]])
    # tau 0.1, 0.2: both [1, 0] -> 1; tau 0.3: pred [1,0], ref empty -> 0; tau >= 0.4: both empty -> 1
    assert soft_dice(probability, y).item() == pytest.approx(8 / 9)


def test_soft_dice_both_empty_policy():
    empty = masks([0, 0, 0, 0])
    # nothing above any threshold on either side: Dice 1 everywhere, or every threshold skipped -> NaN
    low = torch.full((1, 1, 4), 0.05)
    assert soft_dice(low, empty).item() == 1.0
    assert math.isnan(soft_dice(low, empty, both_empty="skip").item())
    # probability 0.35 on one pixel, no annotator: tau 0.1-0.3 -> 0 (one side empty), tau 0.4-0.9 -> both empty
    p = torch.tensor([[[0.35, 0.0, 0.0, 0.0]]])
    assert soft_dice(p, empty).item() == pytest.approx(6 / 9)
    assert soft_dice(p, empty, both_empty="skip").item() == 0.0
    with pytest.raises(ValueError, match="both_empty"):
        soft_dice(p, empty, both_empty="ignore")


def test_sample_diversity_by_hand_and_policies():
    # d(s1,s2) = 1 - 1/2 = 0.5; d(s1,s3) = 1 (s3 empty); d(s2,s3) = 1 -> mean over 3 pairs = 2.5 / 3
    s = masks([1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0])
    assert sample_diversity(s).item() == pytest.approx(2.5 / 3)
    assert sample_diversity(masks([0, 0, 0, 0], [0, 0, 0, 0])).item() == 0.0  # two empty samples agree
    assert math.isnan(sample_diversity(masks([1, 0, 0, 0])).item())  # S = 1: no pair
    # relation to the GED self term (diagonal included): E[d(S,S')] = (S - 1) / S * diversity
    g = torch.Generator().manual_seed(3)
    r = random_masks(g, 2, 4, 4, 4)
    self_term = iou_distance_matrix(r, r).mean((1, 2))
    assert_close(self_term, 3 / 4 * sample_diversity(r))


def test_batched_equals_per_case():
    g = torch.Generator().manual_seed(4)
    s, y = random_masks(g, 4, 5, 6, 6), random_masks(g, 4, 3, 6, 6)
    s[1] = False  # an all-empty case in the batch
    probability = torch.rand(4, 6, 6, generator=g)
    batched = {
        "ged": generalized_energy_distance(s, y),
        "hm": hungarian_matched_iou(s, y),
        "soft": soft_dice(probability, y),
        "div": sample_diversity(s),
        "ged2": ged_by_sample_count(s, y, counts=(2,))[2],
    }
    for k in range(4):
        one = {
            "ged": generalized_energy_distance(s[k : k + 1], y[k : k + 1]),
            "hm": hungarian_matched_iou(s[k : k + 1], y[k : k + 1]),
            "soft": soft_dice(probability[k : k + 1], y[k : k + 1]),
            "div": sample_diversity(s[k : k + 1]),
            "ged2": ged_by_sample_count(s[k : k + 1], y[k : k + 1], counts=(2,))[2],
        }
        for name, value in one.items():
            assert_close(batched[name][k : k + 1], value, name)


def test_float_and_bool_inputs_agree_and_bad_input_is_rejected():
    g = torch.Generator().manual_seed(5)
    s, y = random_masks(g, 2, 3, 4, 4), random_masks(g, 2, 2, 4, 4)
    assert_close(generalized_energy_distance(s, y), generalized_energy_distance(s.float(), y.long()))
    with pytest.raises(ValueError, match="binary"):
        generalized_energy_distance(s.float() * 0.5, y)
    with pytest.raises(ValueError, match="batch and spatial"):
        hungarian_matched_iou(s, y[:, :, :3])
    with pytest.raises(ValueError, match="at least 4 dims"):
        sample_diversity(s[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        soft_dice(torch.full((2, 4, 4), 1.5), y)
    with pytest.raises(ValueError, match="thresholds"):
        soft_dice(torch.rand(2, 4, 4, generator=g), y, thresholds=(0.5, 1.0))
