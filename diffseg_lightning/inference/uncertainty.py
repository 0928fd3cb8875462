"""Per-pixel uncertainty of S sampled masks."""

from __future__ import annotations

import torch


def sample_std(samples: torch.Tensor) -> torch.Tensor:
    """Standard deviation over samples (population, ddof 0): (B, S, C, H, W) -> (B, C, H, W)."""
    return samples.std(dim=1, unbiased=False)


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of a Bernoulli(p), 0 at p in {0, 1}; values in [0, 1]."""
    p = p.clamp(0.0, 1.0)
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / torch.log(torch.tensor(2.0))


def predictive_entropy(samples: torch.Tensor) -> torch.Tensor:
    """Entropy (bits) of the mean foreground probability over samples: (B, S, C, H, W) -> (B, C, H, W)."""
    return binary_entropy(samples.mean(dim=1))
