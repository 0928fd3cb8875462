"""STAPLE fusion (Warfield et al., IEEE TMI 2004) against SimpleITK's STAPLEImageFilter, and its properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffseg_lightning.exceptions import DiffSegError
from diffseg_lightning.inference import fusion
from diffseg_lightning.inference.fusion import Fusion, check_finite_fusion, fuse_samples, staple

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


def low_diversity_cases(rng: np.random.Generator, num_cases: int, num_raters: int) -> np.ndarray:
    """(num_cases, S, 32, 32) uint8: S copies of one random mask per case, two of them each off by one pixel:
    samples that agree closely, where EM drives p and q to (or, in floating point, past) 1."""
    cases = np.repeat(
        (rng.random((num_cases, 1, 32, 32)) < rng.uniform(0.05, 0.9)).astype(np.uint8), num_raters, 1
    )
    for case in cases:
        for rater in (0, 1):
            i, j = rng.integers(0, 32, 2)
            case[rater, i, j] ^= 1
    return cases


@pytest.mark.parametrize("num_raters", [2, 3, 5])
def test_samples_that_agree_closely_match_simpleitk(num_raters):
    """Today's code returned NaN for the whole image on most of these (S >= 3): p or q rounded one step
    above 1 and log1p(-q) became NaN. ITK keeps every p and q in [0, 1] and reaches p = q = 1 exactly."""
    pytest.importorskip("SimpleITK", reason="the [staple] extra is not installed")
    cases = low_diversity_cases(np.random.default_rng(num_raters), 20, num_raters)
    ours = staple(torch.from_numpy(cases)[:, :, None].double())[:, 0].numpy()
    assert np.isfinite(ours).all()
    for case, w in zip(cases, ours, strict=True):
        # float64 EM to ITK's stopping rule: both stop within ~1e-7 of one fixed point (see the docstring)
        np.testing.assert_allclose(w, sitk_staple(case), atol=1e-6, rtol=0)


@pytest.mark.parametrize("degenerate", [0, 1], ids=["one-empty", "one-full"])
def test_a_degenerate_sample_among_agreeing_ones_matches_simpleitk(degenerate):
    """Five samples agree, a sixth is all background (or all foreground): the agreeing raters reach p = q = 1,
    the degenerate one p = 0, q = 1 (or p = 1, q = 0), and W is exactly the agreeing mask, as in ITK."""
    pytest.importorskip("SimpleITK", reason="the [staple] extra is not installed")
    rng = np.random.default_rng(5 + degenerate)
    for density in (0.05, 0.3, 0.7):
        base = (rng.random((32, 32)) < density).astype(np.uint8)
        raters = np.stack([base] * 5 + [np.full_like(base, degenerate)])
        ours = staple(torch.from_numpy(raters)[None, :, None])[0, 0].numpy()
        expected = sitk_staple(raters)
        assert np.isfinite(expected).all()
        np.testing.assert_array_equal(ours, expected)  # both are exactly 0 or 1 here
        np.testing.assert_array_equal(ours, base)


def test_a_non_finite_fused_value_is_an_error_naming_the_case_and_the_fusion(tmp_path, monkeypatch):
    """Evaluation and prediction refuse a NaN fused map (before: eval failed on "probability must be finite",
    predict wrote empty masks with exit 0), whatever made it: here a STAPLE that returns NaN for one case."""
    from conftest import TINY, compose_config

    from diffseg_lightning.entry import build_module

    cfg = compose_config("train", [*TINY, "sampler.fusion=staple"], tmp_path)
    module = build_module(cfg.model, cfg.noise, cfg.sampler).eval()

    def nan_for_the_second_case(decisions, **_):
        w = decisions[:, 0].float()
        w[1] = float("nan")
        return w

    monkeypatch.setattr(fusion, "staple", nan_for_the_second_case)
    batch = {
        "image": torch.randn(2, 1, 32, 32),
        "mask": torch.zeros(2, 1, 32, 32),
        "index": torch.arange(2),
        "case": ["good.png", "bad.png"],
    }
    expected = (
        r"fusion 'staple' \(sampler.fusion\) gave a NaN or infinite probability for case bad.png \(1024 of"
    )
    with pytest.raises(DiffSegError, match=expected):
        module.predict_step(batch, 0)
    with pytest.raises(DiffSegError, match=expected):
        module.test_step(batch, 0)


def test_check_finite_fusion_names_every_bad_case():
    probability = torch.zeros(3, 1, 4, 4)
    probability[0, 0, 1, 1] = float("inf")
    probability[2] = float("nan")
    with pytest.raises(DiffSegError, match=r"'vote'.*case a \(1 of 16 values\), c \(16 of 16 values\);"):
        check_finite_fusion(probability, "vote", ["a", "b", "c"])
    with pytest.raises(
        DiffSegError, match=r"the method's probability \(no fusion\) is NaN or infinite for case a"
    ):
        check_finite_fusion(probability, "none", ["a", "b", "c"])
    check_finite_fusion(probability[1:2], "staple", ["b"])  # finite: no error
