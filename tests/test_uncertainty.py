"""Mutual information (BALD) of S samples, against scipy and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from diffseg_lightning.inference.uncertainty import mutual_information, predictive_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def bernoulli_entropy_bits(p: np.ndarray) -> np.ndarray:
    return scipy_entropy(np.stack([p, 1 - p]), base=2, axis=0)


def test_mutual_information_against_scipy_by_hand():
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(2, 7, 3, 4, 5, generator=g, dtype=torch.float64)
    x = samples.numpy()
    expected = bernoulli_entropy_bits(x.mean(axis=1)) - bernoulli_entropy_bits(x).mean(axis=1)
    mi = mutual_information(samples)
    assert mi.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(mi.numpy(), expected, atol=1e-9)


def test_one_pixel_worked_by_hand():
    # samples 0.9 and 0.5: H(0.7) - (H(0.9) + H(0.5)) / 2 = 0.881291 - (0.468996 + 1) / 2 = 0.146793 bits
    samples = torch.tensor([0.9, 0.5], dtype=torch.float64).reshape(1, 2, 1, 1, 1)
    assert mutual_information(samples).item() == pytest.approx(
        0.881290899 - (0.468995594 + 1.0) / 2, abs=1e-8
    )


def test_mutual_information_is_non_negative_and_below_the_predictive_entropy():
    g = torch.Generator().manual_seed(1)
    samples = torch.rand(3, 5, 1, 8, 8, generator=g) ** 3  # skewed towards 0, many near-certain pixels
    mi = mutual_information(samples)
    assert (mi >= 0).all()
    assert (mi <= predictive_entropy(samples) + 1e-6).all()


def test_zero_when_all_samples_agree():
    binary = (torch.rand(2, 1, 1, 6, 6) > 0.5).float().expand(2, 4, 1, 6, 6)
    assert torch.equal(mutual_information(binary), torch.zeros(2, 1, 6, 6))
    soft = torch.full((1, 5, 1, 3, 3), 0.5)  # equally unsure samples: all aleatoric, no epistemic part
    assert mutual_information(soft).abs().max() < 1e-6
    assert torch.allclose(predictive_entropy(soft), torch.ones(1, 1, 3, 3))


def test_one_bit_for_binary_samples_split_in_halves():
    samples = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0]).reshape(1, 6, 1, 1, 1)
    assert mutual_information(samples).item() == pytest.approx(1.0, abs=1e-6)
