"""Per-pixel uncertainty of S sampled masks."""

from __future__ import annotations

import math

import torch


def sample_std(samples: torch.Tensor) -> torch.Tensor:
    """Standard deviation over samples (population, ddof 0): (B, S, C, H, W) -> (B, C, H, W)."""
    return samples.std(dim=1, unbiased=False)


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of a Bernoulli(p), 0 at p in {0, 1}; values in [0, 1]."""
    p = p.clamp(0.0, 1.0)
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2.0)


def predictive_entropy(samples: torch.Tensor) -> torch.Tensor:
    """Entropy (bits) of the mean foreground probability over samples: (B, S, C, H, W) -> (B, C, H, W)."""
    return binary_entropy(samples.mean(dim=1))


def mutual_information(samples: torch.Tensor) -> torch.Tensor:
    """Mutual information (bits) between the prediction and the sample: (B, S, C, H, W) -> (B, C, H, W).

    The BALD score of Houlsby, Huszar, Ghahramani & Lengyel, "Bayesian active learning for classification
    and preference learning", arXiv:1112.5745, 2011 (the epistemic part of the predictive entropy, as in
    Gal, Islam & Ghahramani, ICML 2017): the entropy of the mean foreground probability minus the mean of
    the per-sample entropies, ``H(mean_s p_s) - mean_s H(p_s)``, with :func:`binary_entropy`.

    It is >= 0 by the concavity of the entropy (values below 0 from float rounding are clamped to 0) and at
    most 1 bit: 0 when all samples agree (e.g. binary samples that are all 0 or all 1), 1 bit for binary
    samples split in equal halves between 0 and 1. Soft samples that all say 0.5 give 0 (all uncertainty is
    aleatoric), although their predictive entropy is 1 bit.

    Args:
        samples: (B, S, C, H, W) foreground probabilities in [0, 1].

    Returns:
        (B, C, H, W) mutual information in bits, in [0, 1].
    """
    total = binary_entropy(samples.mean(dim=1))
    expected = binary_entropy(samples).mean(dim=1)
    return (total - expected).clamp_min(0.0)
