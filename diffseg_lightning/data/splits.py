"""Deterministic, seeded splits shared by every loader: fraction splits, and k-fold cross-validation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffseg_lightning.exceptions import ConfigError

SPLITS = ("train", "val", "test")


def check_split(split: str, splits: Sequence[str] = SPLITS, name: str = "") -> str:
    """Return ``split``, or raise a ``ValueError`` listing the valid ones."""
    if split not in splits:
        prefix = f"{name}: " if name else ""
        raise ConfigError(f"{prefix}split must be one of {tuple(splits)}, got {split!r}")
    return split


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative train / val / test shares that sum to 1, else a ``ValueError``."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or abs(sum(values) - 1.0) > 1e-6 or min(values) < 0:
        raise ConfigError(f"fractions must be three non-negative shares summing to 1, got {list(fractions)}")
    return values  # type: ignore[return-value]


def split_by_fractions(count: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Partition ``range(count)`` into ``len(fractions)`` sorted index lists by a seeded shuffle.

    The cases are shuffled with ``numpy.random.default_rng(seed).permutation(count)`` and cut at
    ``round(cumsum(fractions) * count)``, so a split depends only on the number of (sorted) cases,
    the fractions and the seed, and the parts always partition the cases.

    Raises:
        ValueError: when the fractions are negative or do not sum to 1.
    """
    if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must be non-negative shares summing to 1, got {list(fractions)}")
    order = np.random.default_rng(seed).permutation(count)
    bounds = np.round(np.cumsum([0.0, *fractions]) * count).astype(int)
    bounds[-1] = count
    return [sorted(int(i) for i in order[bounds[k] : bounds[k + 1]]) for k in range(len(fractions))]


def kfold(count: int, folds: int, seed: int) -> list[list[int]]:
    """``folds`` disjoint, sorted index lists covering ``range(count)``: a seeded shuffle cut into near-equal
    parts (sizes differ by at most one), like scikit-learn's ``KFold(shuffle=True)`` with numpy's generator.

    Raises:
        ValueError: when ``folds`` < 2 or exceeds ``count``.
    """
    if not 2 <= folds <= max(count, 2) or folds > count:
        raise ConfigError(f"data.folds must lie in [2, number of cases = {count}], got {folds}")
    order = np.random.default_rng(seed).permutation(count)
    return [sorted(int(i) for i in part) for part in np.array_split(order, folds)]


def check_fold(folds: int | None, fold: int) -> None:
    if folds is not None and not 0 <= fold < folds:
        raise ConfigError(f"data.fold must lie in [0, data.folds = {folds}), got {fold}")


def seeded_split(
    count: int,
    fractions: Sequence[float],
    seed: int,
    split: str,
    folds: int | None = None,
    fold: int = 0,
) -> list[int]:
    """The sorted case indices of ``split`` (train / val / test) among ``count`` sorted cases.

    Without ``folds``: the parts of :func:`split_by_fractions` (``fractions`` = train / val / test shares).
    With ``folds`` = k: ``test`` is fold ``fold`` of :func:`kfold`, and the other folds are split into
    train / val by the ratio ``fractions[0] : fractions[1]`` (same seed), so the k test folds partition the
    cases and each fold has its own validation cases drawn from its training pool.
    """
    check_split(split)
    if folds is None:
        return split_by_fractions(count, fractions, seed)[SPLITS.index(split)]
    check_fold(folds, fold)
    parts = kfold(count, folds, seed)
    if split == "test":
        return parts[fold]
    pool = sorted(i for k, part in enumerate(parts) if k != fold for i in part)
    return pool_split(pool, fractions[0], fractions[1], seed, split)


def pool_split(pool: Sequence[int], train_share: float, val_share: float, seed: int, split: str) -> list[int]:
    """Split a pool of case indices (e.g. an official training set) into ``train`` / ``val`` by
    ``train_share : val_share`` (renormalised), with :func:`split_by_fractions`."""
    total = train_share + val_share
    if total <= 0:
        raise ConfigError(f"train / val shares {train_share}, {val_share} leave no case for train or val")
    parts = split_by_fractions(len(pool), (train_share / total, val_share / total), seed)
    return [pool[i] for i in parts[split == "val"]]


def train_val_split(
    count: int, split: str, val_fraction: float, seed: int, folds: int | None = None, fold: int = 0
) -> list[int]:
    """``train`` / ``val`` indices of an official training set of ``count`` cases (its test set is official).

    Without ``folds``: a seeded ``val_fraction`` of the cases is ``val``. With ``folds`` = k: ``val`` is
    fold ``fold`` of :func:`kfold` and ``train`` the other folds (k-fold cross-validation on the training set).
    """
    if split not in ("train", "val"):
        raise ConfigError(f"train_val_split serves train and val, got {split!r}")
    if folds is None:
        return pool_split(list(range(count)), 1.0 - val_fraction, val_fraction, seed, split)
    check_fold(folds, fold)
    parts = kfold(count, folds, seed)
    if split == "val":
        return parts[fold]
    return sorted(i for k, part in enumerate(parts) if k != fold for i in part)
