"""Deterministic, seeded splits shared by every loader."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def check_split(split: str, splits: Sequence[str] = SPLITS, name: str = "") -> str:
    """Return ``split``, or raise a ``ValueError`` listing the valid ones."""
    if split not in splits:
        prefix = f"{name}: " if name else ""
        raise ValueError(f"{prefix}split must be one of {tuple(splits)}, got {split!r}")
    return split


def split_by_fractions(count: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Partition ``range(count)`` into ``len(fractions)`` sorted index lists by a seeded shuffle.

    The cases are shuffled with ``numpy.random.default_rng(seed).permutation(count)`` and cut at
    ``round(cumsum(fractions) * count)``, so a split depends only on the number of (sorted) cases,
    the fractions and the seed, and the parts always partition the cases.

    Raises:
        ValueError: when the fractions are negative or do not sum to 1.
    """
    if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative shares summing to 1, got {list(fractions)}")
    order = np.random.default_rng(seed).permutation(count)
    bounds = np.round(np.cumsum([0.0, *fractions]) * count).astype(int)
    bounds[-1] = count
    return [sorted(int(i) for i in order[bounds[k] : bounds[k + 1]]) for k in range(len(fractions))]


def seeded_split(count: int, fractions: Sequence[float], seed: int, split: str) -> list[int]:
    """The sorted indices of ``split`` (train / val / test) under :func:`split_by_fractions`."""
    return split_by_fractions(count, fractions, seed)[SPLITS.index(check_split(split))]
