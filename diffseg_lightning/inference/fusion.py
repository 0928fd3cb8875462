"""Fusion of S sampled masks into one prediction."""

from __future__ import annotations

from enum import Enum

import torch


class Fusion(str, Enum):
    """How S samples become one mask.

    MEAN: average the samples' foreground probabilities, then threshold.
    VOTE: binarise every sample at 0.5, then keep pixels where the fraction of votes exceeds the threshold
    (threshold 0.5 is the majority vote).
    """

    MEAN = "mean"
    VOTE = "vote"

    @classmethod
    def parse(cls, value: str | Fusion) -> Fusion:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown fusion {value!r}; valid: {[f.value for f in cls]}") from None


def fuse_samples(samples: torch.Tensor, fusion: str | Fusion = Fusion.MEAN, threshold: float = 0.5):
    """Fuse samples of foreground probabilities.

    Args:
        samples: (B, S, C, H, W) foreground probabilities in [0, 1].
        fusion: a :class:`Fusion` name.
        threshold: the cut on the fused probability (mean) or on the vote fraction (vote).

    Returns:
        ``(probability, mask)``: the fused soft map (B, C, H, W) and its binary mask (B, C, H, W) float.
    """
    fusion = Fusion.parse(fusion)
    if fusion is Fusion.MEAN:
        probability = samples.mean(dim=1)
    else:
        probability = (samples > 0.5).float().mean(dim=1)
    return probability, (probability > threshold).float()
