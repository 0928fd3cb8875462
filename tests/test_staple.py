"""STAPLE fusion (Warfield et al., IEEE TMI 2004) against SimpleITK's STAPLEImageFilter, and its properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffseg_lightning.inference.fusion import Fusion, fuse_samples, staple

pytestmark = pytest.mark.usefixtures("one_thread")


def disc(size: int = 32, cy: float = 15.0, cx: float = 17.0, r: float = 9.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def noisy_raters(rng: np.random.Generator, num_raters: int, size: int = 32) -> np.ndarray:
    """(S, size, size) uint8 raters built from one base disc: each shifted a little and flipped at its own rate,
    so that their errors are correlated (shared base, shared shifts) and their quality differs."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
    base = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(size / 6, size / 3) ** 2
    raters = [
        np.roll(base, rng.integers(-2, 3), axis=1) ^ (rng.random((size, size)) < rng.uniform(0.02, 0.25))
        for _ in range(num_raters)
    ]
    return np.stack(raters).astype(np.uint8)


def sitk_staple(raters: np.ndarray, **options) -> np.ndarray:
    """SimpleITK's STAPLE of (S, H, W) binary raters -> (H, W) float64 W."""
    sitk = pytest.importorskip("SimpleITK", reason="the [staple] extra is not installed")
    flt = sitk.STAPLEImageFilter()
    for name, value in options.items():
        getattr(flt, f"Set{name}")(value)
    return sitk.GetArrayFromImage(flt.Execute([sitk.GetImageFromArray(r) for r in raters]))


@pytest.mark.parametrize("num_raters", [3, 5, 8])
def test_matches_simpleitk_on_random_cases(num_raters):
    pytest.importorskip("SimpleITK", reason="the [staple] extra is not installed")
    # 5 seeds x 2 channels = 10 independent cases, fused in one batched call
    cases = np.stack(
        [
            np.stack(
                [
                    noisy_raters(np.random.default_rng(100 * seed + 10 * c + num_raters), num_raters)
                    for c in range(2)
                ],
                1,
            )
            for seed in range(5)
        ]
    )  # (B=5, S, C=2, 32, 32)
    ours = staple(torch.from_numpy(cases))
    assert ours.shape == (5, 2, 32, 32) and ours.dtype == torch.float32
    for b in range(5):
        for c in range(2):
            expected = sitk_staple(cases[b, :, c])
            np.testing.assert_allclose(ours[b, c].numpy(), expected, atol=1e-4, rtol=0)


def test_iteration_cap_confidence_weight_and_empty_inputs_in_simpleitk():
    pytest.importorskip("SimpleITK", reason="the [staple] extra is not installed")
    raters = noisy_raters(np.random.default_rng(7), 5)
    d = torch.from_numpy(raters)[None, :, None].double()
    # one EM iteration (M-step from W = mean decision, then E-step) is ITK's MaximumIterations=1
    np.testing.assert_allclose(
        staple(d, max_iter=1)[0, 0].numpy(), sitk_staple(raters, MaximumIterations=1), atol=1e-10
    )
    np.testing.assert_allclose(
        staple(d, confidence_weight=0.5)[0, 0].numpy(), sitk_staple(raters, ConfidenceWeight=0.5), atol=1e-4
    )
    # all raters empty: ITK divides 0 by 0 and returns NaN everywhere, which our policy replaces by W = 0
    assert np.isnan(sitk_staple(np.zeros((3, 8, 8), np.uint8))).all()


def test_unanimous_raters_give_their_decision():
    masks = torch.stack([disc(), disc(cy=20, r=5)])  # (C=2, 32, 32)
    decisions = masks[None, None].expand(1, 4, 2, 32, 32)  # (B=1, S=4, C=2, 32, 32), all raters agree
    w = staple(decisions)
    assert torch.allclose(w, decisions[:, 0].float(), atol=1e-6)


def test_empty_and_full_cases_follow_the_written_policy():
    decisions = torch.zeros(3, 4, 1, 8, 8)
    decisions[1] = 1  # every rater marks every pixel
    decisions[2, :2, :, 2:5, 2:5] = 1  # an ordinary case next to the degenerate ones
    w = staple(decisions)
    assert torch.equal(w[0], torch.zeros(1, 8, 8))  # all raters empty -> W = 0 (ITK: NaN)
    assert torch.equal(w[1], torch.ones(1, 8, 8))  # all raters full -> W = 1 (ITK: NaN)
    assert torch.isfinite(w[2]).all() and torch.allclose(w[2], staple(decisions[2:3])[0])


def test_a_perfect_rater_among_noisy_ones_is_tracked():
    g = torch.Generator().manual_seed(0)
    truth = disc()
    noisy = [truth ^ (torch.rand(32, 32, generator=g) < 0.15) for _ in range(4)]
    decisions = torch.stack([truth, *noisy])[None, :, None]
    w = staple(decisions)[0, 0]
    vote_errors = int(((decisions.float().mean(1)[0, 0] > 0.5) != truth).sum())
    staple_errors = int(((w > 0.5) != truth).sum())
    assert staple_errors * 4 < vote_errors  # 2 vs 16 pixels here
    assert (w - truth.float()).abs().mean() < 0.02


def test_batched_result_equals_per_case_calls():
    rng = np.random.default_rng(3)
    cases = torch.from_numpy(
        np.stack([np.stack([noisy_raters(rng, 4, 16) for _ in range(2)], 1) for _ in range(3)])
    )
    together = staple(cases.double())
    for b in range(3):
        for c in range(2):
            alone = staple(cases[b : b + 1, :, c : c + 1].double())
            assert torch.allclose(together[b, c], alone[0, 0], atol=1e-12, rtol=0)
    # the sync-free fixed loop (convergence only masks, never stops) gives the same answer
    assert torch.allclose(staple(cases.double(), check_every=10_000), together, atol=1e-12, rtol=0)


def test_staple_is_not_a_one_iteration_mean():
    # MedSegDiff's released "STAPLE" is the mean of the samples; real STAPLE weighs raters by their performance
    decisions = torch.from_numpy(noisy_raters(np.random.default_rng(11), 5))[None, :, None]
    mean = decisions.float().mean(1)
    assert (staple(decisions) - mean).abs().max() > 0.3


def test_fuse_samples_staple_binarises_and_thresholds():
    g = torch.Generator().manual_seed(1)
    truth = disc(12, 6, 5, 3).float()
    samples = (0.6 * truth + 0.5 * torch.rand(2, 5, 1, 12, 12, generator=g)).clamp(
        0, 1
    )  # soft, noisy samples
    prob, mask = fuse_samples(samples, "staple", threshold=0.3)
    assert torch.allclose(prob, staple(samples > 0.5))
    assert torch.equal(mask, (prob > 0.3).float())
    assert Fusion.parse("staple") is Fusion.STAPLE


def test_three_dimensional_volumes_are_accepted():
    decisions = torch.zeros(1, 3, 1, 4, 6, 6)
    decisions[:, :, :, 1:3, 2:4, 2:4] = 1
    decisions[0, 0, 0, 0, 0, 0] = 1
    assert staple(decisions).shape == (1, 1, 4, 6, 6)


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="binary"):
        staple(torch.rand(1, 3, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, S, C"):
        staple(torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match="confidence_weight"):
        staple(torch.ones(1, 3, 1, 4, 4), confidence_weight=1.5)
    with pytest.raises(ValueError, match="max_iter"):
        staple(torch.ones(1, 3, 1, 4, 4), max_iter=0)
