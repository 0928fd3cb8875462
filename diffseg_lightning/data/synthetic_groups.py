"""Synthetic lesions with a subgroup attribute that shifts image appearance (for fairness reports).

FEDD (Carrion & Norouzi, MICCAI 2023) reports every metric per skin-tone group of the DDI set.
:class:`SyntheticGroupSegmentation` gives the synthetic test bed such a group: each case belongs to
one of ``G`` groups, drawn with the probabilities ``group_fractions`` (imbalanced by default, as
skin tones are in dermatology sets), and the group changes how the image looks, not the anatomy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffseg_lightning.data.synthetic import SyntheticSegmentation
from diffseg_lightning.exceptions import ConfigError

__all__ = ["SyntheticGroupSegmentation"]

_GROUP_STREAM = 104729  # mixed into the case's seed: the group draw never touches the base stream


class SyntheticGroupSegmentation(SyntheticSegmentation):
    """:class:`SyntheticSegmentation` plus ``group`` (int64) per item, with a group-specific appearance.

    For a case of group ``g`` the base image ``x`` (C, H, W, z-scored) becomes
    ``x_g = scale_g * x + offset_g + noise_g * eps`` with ``eps ~ N(0, I)`` drawn from the case's own
    seeded stream. Under ``data.normalize=zscore`` the scale and offset are normalised away and the
    group shift is the extra noise, i.e. a lower lesion contrast-to-noise ratio (the role that a
    darker skin tone plays for dermoscopic lesion contrast); with ``normalize=none`` the intensity
    shift stays too. The masks, labels and instances are those of the base case (the group changes
    appearance only), so segmentation targets are comparable across groups.

    Choices: the group is drawn per case from ``rng((seed, split, index, 104729))`` with
    probabilities ``group_fractions``; the defaults are two groups, 70% / 30%, with group 1 noisier
    (``group_noise = (0.0, 0.6)``) and darker (``group_offset = (0.0, -0.5)``).

    Args:
        group_fractions: probability of each group (G values > 0, normalised to sum 1).
        group_noise: extra noise std per group (G values >= 0).
        group_scale: intensity scale per group (G values > 0).
        group_offset: intensity offset per group (G values).
        **kwargs: the options of :class:`SyntheticSegmentation` (num_cases, size, channels, seed,
            split, empty_fraction, ...).

    Items: those of :class:`SyntheticSegmentation` plus ``group`` (int64 scalar in ``[0, G)``).

    Raises:
        ValueError: the per-group lists differ in length, or hold invalid values.
    """

    def __init__(
        self,
        group_fractions: Sequence[float] = (0.7, 0.3),
        group_noise: Sequence[float] = (0.0, 0.6),
        group_scale: Sequence[float] | None = None,
        group_offset: Sequence[float] = (0.0, -0.5),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        fractions = [float(f) for f in group_fractions]
        g = len(fractions)
        scale = [1.0] * g if group_scale is None else [float(s) for s in group_scale]
        noise = [float(s) for s in group_noise]
        offset = [float(o) for o in group_offset]
        if g < 1 or any(len(v) != g for v in (noise, scale, offset)):
            raise ConfigError(
                "SyntheticGroupSegmentation: group_fractions, group_noise, group_scale and group_offset need "
                f"one value per group; got lengths {len(fractions)}, {len(noise)}, {len(scale)}, {len(offset)}"
            )
        if any(not f > 0 or not math.isfinite(f) for f in fractions):
            raise ConfigError(f"SyntheticGroupSegmentation: group_fractions must be > 0, got {fractions}")
        if any(s < 0 for s in noise) or any(not s > 0 for s in scale):
            raise ConfigError(
                f"SyntheticGroupSegmentation: group_noise must be >= 0 and group_scale > 0, got {noise}, {scale}"
            )
        total = sum(fractions)
        self.group_fractions = [f / total for f in fractions]
        self.group_noise, self.group_scale, self.group_offset = noise, scale, offset
        self.num_groups = g

    def __repr__(self) -> str:
        return (
            f"{super().__repr__()[:-1]}, group_fractions={self.group_fractions}, group_noise={self.group_noise}, "
            f"group_scale={self.group_scale}, group_offset={self.group_offset})"
        )

    def group_of(self, index: int) -> int:
        """The group of case ``index`` (non-negative)."""
        rng = np.random.default_rng((self.seed, self.split_id, int(index), _GROUP_STREAM))
        return int(rng.choice(self.num_groups, p=self.group_fractions))

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        index = int(item["index"])
        group = self.group_of(index)
        rng = np.random.default_rng((self.seed, self.split_id, index, _GROUP_STREAM, 1))
        image = item["image"].numpy()
        shifted = self.group_scale[group] * image + self.group_offset[group]
        if self.group_noise[group] > 0:
            shifted = shifted + self.group_noise[group] * rng.standard_normal(image.shape, dtype=np.float32)
        item["image"] = torch.from_numpy(shifted.astype(np.float32, copy=False))
        item["group"] = torch.tensor(group, dtype=torch.int64)
        return item
