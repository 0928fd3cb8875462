"""ECE, uncertainty-error overlap and uncertainty-error AUROC: hand cases, torchmetrics cross-checks, policies."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_calibration_error,
    multiclass_calibration_error,
)

from diffseg_lightning.metrics.calibration import (
    expected_calibration_error,
    uncertainty_error_auroc,
    uncertainty_error_overlap,
    uncertainty_error_overlap_curve,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def row(*values: float) -> torch.Tensor:
    """One case as a (1, 1, W) tensor."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, -1)


# ---------------------------------------------------------------- ECE


@pytest.mark.parametrize("convention", ["foreground", "top_label"])
def test_ece_perfectly_calibrated_bins_is_zero(convention):
    # p = 0.25 on 4 pixels, 1 foreground; p = 0.75 on 4 pixels, 3 foreground.
    # foreground: |0.25 - 1/4| and |0.75 - 3/4| -> 0.  top-label: confidence 0.75 everywhere, 6 of 8 correct -> 0.
    p = row(0.25, 0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75)
    t = row(1, 0, 0, 0, 1, 1, 1, 0)
    assert expected_calibration_error(p, t, convention=convention).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("convention", ["foreground", "top_label"])
def test_ece_constant_prediction_half_positive(convention):
    # constant 0.8, 50 % foreground: one bin, |0.5 - 0.8| = 0.3 in both conventions
    p, t = torch.full((1, 2, 5), 0.8), torch.tensor([[[1, 0, 1, 0, 1], [0, 1, 0, 1, 0]]])
    assert expected_calibration_error(p, t, convention=convention).item() == pytest.approx(0.3, abs=1e-6)


def test_ece_conventions_differ_when_top_label_pools_p_and_one_minus_p():
    # p = [0.2, 0.2, 0.8, 0.8], all foreground.
    # foreground: bin of 0.2: 1/2 * |1 - 0.2| = 0.4; bin of 0.8: 1/2 * |1 - 0.8| = 0.1 -> 0.5
    # top-label: confidence 0.8 for all four (one bin); correct: only the two 0.8 pixels -> |0.5 - 0.8| = 0.3
    p, t = row(0.2, 0.2, 0.8, 0.8), row(1, 1, 1, 1)
    assert expected_calibration_error(p, t).item() == pytest.approx(0.5, abs=1e-6)
    assert expected_calibration_error(p, t, convention="top_label").item() == pytest.approx(0.3, abs=1e-6)


def test_ece_last_bin_is_closed():
    # p = 1.0 shares the last bin [0.9, 1] with 0.95: mean confidence 0.975, foreground fraction 0.5 -> 0.475
    # (torchmetrics gives p = 1 a bin of its own: 0.5 * 0.05 + 0.5 * 1.0 = 0.525)
    p, t = row(0.95, 1.0), row(1, 0)
    assert expected_calibration_error(p, t).item() == pytest.approx(0.475, abs=1e-6)


def test_ece_empty_target_has_no_special_case():
    # all background, constant 0.1: |0 - 0.1| = 0.1, not NaN
    assert expected_calibration_error(
        torch.full((1, 3, 3), 0.1), torch.zeros(1, 3, 3)
    ).item() == pytest.approx(0.1)


@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_ece_matches_torchmetrics_per_case(num_bins):
    g = torch.Generator().manual_seed(num_bins)
    p = torch.rand(4, 16, 16, generator=g) ** 2  # skewed, values in [0, 1)
    t = torch.rand(4, 16, 16, generator=g) < p  # roughly calibrated, but not exactly
    t[2] = False  # an all-background case
    fg = expected_calibration_error(p, t, num_bins)
    top = expected_calibration_error(p, t, num_bins, convention="top_label")
    for k in range(4):
        ref_fg = binary_calibration_error(p[k].flatten(), t[k].flatten().long(), n_bins=num_bins)
        stacked = torch.stack([1 - p[k].flatten(), p[k].flatten()], 1)
        ref_top = multiclass_calibration_error(stacked, t[k].flatten().long(), num_classes=2, n_bins=num_bins)
        assert fg[k].item() == pytest.approx(ref_fg.item(), abs=1e-6)
        assert top[k].item() == pytest.approx(ref_top.item(), abs=1e-6)


def test_ece_bad_input():
    p, t = torch.rand(2, 4, 4), torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match="convention"):
        expected_calibration_error(p, t, convention="max")
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(p, t, num_bins=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(p * 3 - 1, t)
    with pytest.raises(ValueError, match="binary"):
        expected_calibration_error(p, t + 0.5)
    with pytest.raises(ValueError, match="must both be"):
        expected_calibration_error(p, t[:, :3])


# ---------------------------------------------------------------- UEO


def test_ueo_is_one_when_the_uncertainty_marks_exactly_the_errors():
    g = torch.Generator().manual_seed(0)
    error = torch.rand(3, 8, 8, generator=g) < 0.2
    uncertainty = error.float() * 0.7  # any threshold in [0, 0.7) recovers the error map
    assert_close(uncertainty_error_overlap(uncertainty, error), torch.ones(3))


def test_ueo_curve_by_hand():
    # u = [0.9, 0.6, 0.2, 0.0], errors at pixels 0 and 2 (|E| = 2)
    # tau 0.1: U = {0, 1, 2}, U & E = {0, 2} -> 2*2 / (3 + 2) = 0.8
    # tau 0.5: U = {0, 1},    U & E = {0}    -> 2*1 / (2 + 2) = 0.5
    # tau 0.8: U = {0},       U & E = {0}    -> 2*1 / (1 + 2) = 2/3
    u, e = row(0.9, 0.6, 0.2, 0.0), row(1, 0, 1, 0)
    curve = uncertainty_error_overlap_curve(u, e, thresholds=(0.1, 0.5, 0.8))
    assert_close(curve, torch.tensor([[0.8, 0.5, 2 / 3]]))
    assert uncertainty_error_overlap(u, e, thresholds=(0.1, 0.5, 0.8)).item() == pytest.approx(0.8)
    # integer thresholds: n = 4 gives 0, 0.25, 0.5, 0.75 (strict >): at 0, U = {0, 1, 2} -> 0.8 again
    assert_close(uncertainty_error_overlap_curve(u, e, thresholds=4), torch.tensor([[0.8, 0.5, 0.5, 2 / 3]]))


def test_ueo_curve_matches_direct_thresholding():
    g = torch.Generator().manual_seed(1)
    u = torch.rand(3, 6, 6, generator=g).round(decimals=1)  # ties on the threshold grid
    e = torch.rand(3, 6, 6, generator=g) < u
    taus = [k / 10 for k in range(10)]
    curve = uncertainty_error_overlap_curve(u, e, thresholds=10)
    for k in range(3):
        for j, tau in enumerate(taus):
            marked = u[k] > torch.tensor(tau, dtype=u.dtype)
            expected = 2 * (marked & e[k]).sum() / (marked.sum() + e[k].sum())
            assert curve[k, j].item() == pytest.approx(expected.item(), abs=1e-6)


def test_ueo_empty_error_policy():
    no_error = torch.zeros(1, 2, 2)
    calm = torch.tensor([[[0.0, 0.3], [0.5, 0.2]]])  # max 0.5 < 0.99: some threshold marks nothing -> 1
    assert uncertainty_error_overlap(calm, no_error).item() == 1.0
    certain_of_nothing = torch.tensor([[[1.0, 0.3], [0.5, 0.2]]])  # u = 1 is above every threshold -> 0
    assert uncertainty_error_overlap(certain_of_nothing, no_error).item() == 0.0
    assert math.isnan(uncertainty_error_overlap(calm, no_error, empty_error="nan").item())
    # a case with errors is unaffected by the policy
    error = torch.tensor([[[1, 0], [0, 0]]])
    one, nan = (
        uncertainty_error_overlap(certain_of_nothing, error, empty_error=p).item() for p in ("one", "nan")
    )
    assert one == nan == 1.0


def test_ueo_minmax_normalisation():
    g = torch.Generator().manual_seed(2)
    u = torch.rand(2, 5, 5, generator=g)
    u[:, 0, 0], u[:, 0, 1] = 0.0, 1.0  # spans [0, 1] exactly, so min-max is the identity
    e = torch.rand(2, 5, 5, generator=g) < 0.3
    expected = uncertainty_error_overlap(u, e)
    assert_close(uncertainty_error_overlap(u * 5 + 2, e, normalize="minmax"), expected)
    with pytest.raises(ValueError, match="normalize='minmax'"):
        uncertainty_error_overlap(u * 5 + 2, e)
    # a constant map becomes 0: nothing is ever above a threshold >= 0 -> Dice 0 against a non-empty E
    assert (
        uncertainty_error_overlap(torch.full((1, 2, 2), 3.0), e[:1, :2, :2] | True, normalize="minmax").item()
        == 0.0
    )
    with pytest.raises(ValueError, match="normalize"):
        uncertainty_error_overlap(u, e, normalize="zscore")
    with pytest.raises(ValueError, match="empty_error"):
        uncertainty_error_overlap(u, e, empty_error="zero")
    with pytest.raises(ValueError, match="thresholds"):
        uncertainty_error_overlap(u, e, thresholds=(0.2, 1.0))


# ---------------------------------------------------------------- AUROC


def test_auroc_perfect_inverse_and_uninformative():
    e = row(1, 1, 0, 0, 0)
    assert uncertainty_error_auroc(row(0.9, 0.8, 0.1, 0.2, 0.3), e).item() == 1.0  # errors most uncertain
    assert uncertainty_error_auroc(row(0.1, 0.2, 0.9, 0.8, 0.7), e).item() == 0.0  # errors least uncertain
    assert uncertainty_error_auroc(torch.full((1, 1, 5), 0.4), e).item() == 0.5  # constant: all ties
    # by hand with a tie: wrong u = {0.5, 0.2}, right u = {0.5, 0.1, 0.3}; pairs (6):
    # 0.5 vs 0.5 -> 1/2, 0.5 > 0.1, 0.5 > 0.3, 0.2 < 0.5, 0.2 > 0.1, 0.2 < 0.3 -> (0.5 + 1 + 1 + 0 + 1 + 0) / 6
    assert uncertainty_error_auroc(row(0.5, 0.2, 0.5, 0.1, 0.3), e).item() == pytest.approx(3.5 / 6)


def test_auroc_nan_when_one_class_is_missing():
    u = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(3))
    e = torch.zeros(3, 4, 4, dtype=torch.bool)
    e[1] = True  # all wrong
    e[2, 0, 0] = True  # one wrong pixel: defined
    out = uncertainty_error_auroc(u, e)
    assert math.isnan(out[0].item()) and math.isnan(out[1].item()) and not math.isnan(out[2].item())


def test_auroc_matches_torchmetrics_per_case_with_ties():
    g = torch.Generator().manual_seed(4)
    u = (torch.rand(5, 12, 12, generator=g) * 8).floor() / 8  # 8 levels: many ties
    e = torch.rand(5, 12, 12, generator=g) < 0.2 + 0.5 * u
    got = uncertainty_error_auroc(u, e)
    for k in range(5):
        ref = binary_auroc(u[k].flatten(), e[k].flatten().long())
        assert got[k].item() == pytest.approx(ref.item(), abs=1e-6)
    # any monotone rescaling (here to an unbounded range) leaves it unchanged
    assert_close(uncertainty_error_auroc(torch.exp(3 * u) - 10, e), got)


def test_batched_equals_per_case():
    g = torch.Generator().manual_seed(5)
    p = torch.rand(4, 7, 7, generator=g)
    t = torch.rand(4, 7, 7, generator=g) < p
    e = (p > 0.5) != t
    e[3] = False  # a case without errors
    u = 1 - 2 * (p - 0.5).abs()
    batched = [
        expected_calibration_error(p, t),
        uncertainty_error_overlap(u, e),
        uncertainty_error_overlap(u, e, normalize="minmax"),
        uncertainty_error_auroc(u, e),
    ]
    for k in range(4):
        one = [
            expected_calibration_error(p[k : k + 1], t[k : k + 1]),
            uncertainty_error_overlap(u[k : k + 1], e[k : k + 1]),
            uncertainty_error_overlap(u[k : k + 1], e[k : k + 1], normalize="minmax"),
            uncertainty_error_auroc(u[k : k + 1], e[k : k + 1]),
        ]
        for b, o in zip(batched, one, strict=True):
            assert_close(b[k : k + 1], o)


def test_uncertainty_bad_input():
    u, e = torch.rand(2, 3, 3), torch.zeros(2, 3, 3)
    with pytest.raises(ValueError, match="finite"):
        uncertainty_error_auroc(torch.full((2, 3, 3), float("nan")), e)
    with pytest.raises(ValueError, match="floating"):
        uncertainty_error_auroc(torch.ones(2, 3, 3, dtype=torch.long), e)
    with pytest.raises(ValueError, match="binary"):
        uncertainty_error_overlap(u, e + 2)
