"""A seeded fraction of the labelled training cases (label-efficient experiments)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from diffseg_lightning.exceptions import ConfigError

__all__ = ["LabelFraction"]


class LabelFraction(Dataset):
    """The first ``ceil(fraction * N)`` cases of a seeded permutation of a dataset's N cases.

    FEDD (Carrion & Norouzi, MICCAI 2023) trains its probes on 5, 10, 15 and 20% of the labelled
    images; the baselines must see the same images. The subset of a smaller fraction is contained
    in that of a larger one (the same permutation, cut shorter), so results at growing fractions
    are nested, as in a label-efficiency curve. At least one case is kept.

    Args:
        dataset: the full training set.
        fraction: in ``(0, 1]``; 1 keeps every case (in the original order).
        seed: the permutation's seed.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1]``.
    """

    def __init__(self, dataset: Dataset, fraction: float = 1.0, seed: int = 0) -> None:
        fraction = float(fraction)
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"LabelFraction: fraction must lie in (0, 1], got {fraction}")
        self.dataset = dataset
        self.fraction = fraction
        self.seed = int(seed)
        n = len(dataset)  # type: ignore[arg-type]
        if fraction == 1.0:
            self.indices = list(range(n))
        else:
            keep = max(1, math.ceil(fraction * n))
            order = np.random.default_rng(self.seed).permutation(n)
            self.indices = sorted(int(i) for i in order[:keep])

    def __len__(self) -> int:
        return len(self.indices)

    def __getattr__(self, name: str) -> Any:  # root, split, size ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[self.indices[index]]

    def __repr__(self) -> str:
        return (
            f"LabelFraction({self.dataset!r}, fraction={self.fraction}, seed={self.seed}, cases={len(self)})"
        )
