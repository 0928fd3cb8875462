"""Synthetic panoptic data with named shape categories, for open-vocabulary segmentation (ODISE).

Every case is drawn from its own random stream ``np.random.default_rng((seed, split_id, index))`` (the
scheme of :class:`~diffseg_lightning.data.synthetic.SyntheticSegmentation`), so item ``i`` is the same in
any order, worker or process, and splits never share a case.

A case: a smooth random background (a Gaussian random field, :func:`~diffseg_lightning.data.synthetic.
smooth_field` helpers reused) plus white noise, and ``0..max_shapes`` non-overlapping objects. Each object
has a category, one of ``categories`` (default circle, square, triangle, cross, ring), a random size, position
and colour (a random RGB offset, so the category is told by the geometry, not by the colour). The training
split draws only the categories not listed in ``unseen`` (the held-out names are never seen in training),
the validation and test splits draw from all categories: the open-vocabulary protocol of ODISE (Xu et al.,
CVPR 2023: train on COCO's names, test with names never trained on).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diffseg_lightning.data.synthetic import (
    SPLITS,
    check_int,
    check_size,
    lattice_matrix,
    smooth_field,
    unit_std,
)
from diffseg_lightning.exceptions import ConfigError

SHAPE_CATEGORIES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")


def _shape_mask(category: str, yy: np.ndarray, xx: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Boolean (H, W) mask of one shape of ``category`` centred at the origin of ``yy``, ``xx`` (pixels)."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy  # rotated coordinates
    if category == "circle":
        return u**2 + v**2 <= radius**2
    if category == "square":
        half = radius / np.sqrt(2.0) * 1.15
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if category == "triangle":  # equilateral, circumradius ``radius``: three half-planes
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            phi = angle + np.pi / 2 + 2 * np.pi * k / 3
            inside &= np.cos(phi) * xx + np.sin(phi) * yy >= -radius / 2
        return inside
    if category == "cross":
        arm = radius * 0.35
        return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | ((np.abs(v) <= arm) & (np.abs(u) <= radius))
    if category == "ring":
        r2 = u**2 + v**2
        return (r2 <= radius**2) & (r2 >= (0.55 * radius) ** 2)
    raise ConfigError(f"unknown shape category {category!r}; drawable shapes are {list(SHAPE_CATEGORIES)}")


class SyntheticShapes(Dataset):
    """Seeded synthetic panoptic segmentation with named categories (circle, square, ...); no download.

    The test bed of ODISE's open-vocabulary protocol (Xu et al., "Open-Vocabulary Panoptic Segmentation
    with Text-to-Image Diffusion Models", CVPR 2023) on synthetic data: the model is trained on the names
    of the seen categories and tested with every name, including ``unseen`` ones it never trained on.

    Args:
        num_cases: number of cases, >= 1.
        size: image size, int or (H, W), each side >= 16.
        channels: image channels, 1 or 3 (3: each object gets a random colour offset).
        categories: the vocabulary (names drawn by :func:`_shape_mask`), in the order of the class ids.
        unseen: names of ``categories`` never drawn in the ``train`` split.
        max_shapes: most objects per image (>= 1); the count is uniform in ``[min_shapes, max_shapes]``.
        min_shapes: fewest objects per image (>= 0).
        noise_std: standard deviation of the white noise (the objects' contrast is about 1).
        seed: base seed, >= 0.
        split: ``train`` | ``val`` | ``test`` | ``predict``.

    Items: ``image`` float32 (C, H, W) z-scored per channel; ``mask`` float32 (1, H, W) the union of the
    objects; ``masks`` (1, H, W) the same; ``label`` int64 (1 when an object is present); ``instances`` int64
    (H, W), 0 background and 1..N one id per object; ``semantic`` int64 (H, W), 0 background and ``k + 1``
    for an object of ``categories[k]``; ``case`` str; ``index`` int64.

    Raises:
        ValueError: a bad option (the message names it), e.g. an unseen name that is not a category.
    """

    def __init__(
        self,
        num_cases: int = 256,
        size: int | tuple[int, int] = 32,
        channels: int = 3,
        categories: Sequence[str] = SHAPE_CATEGORIES,
        unseen: Sequence[str] = ("triangle",),
        max_shapes: int = 3,
        min_shapes: int = 1,
        noise_std: float = 0.1,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        super().__init__()
        self.num_cases = check_int("num_cases", num_cases, 1)
        self.size = check_size(size)
        if min(self.size) < 16:
            raise ConfigError(f"SyntheticShapes: size must be at least 16 px per side, got {self.size}")
        if channels not in (1, 3):
            raise ConfigError(f"SyntheticShapes: channels must be 1 or 3, got {channels!r}")
        self.channels = int(channels)
        self.categories = [str(c) for c in categories]
        bad = [c for c in self.categories if c not in SHAPE_CATEGORIES]
        if bad or not self.categories or len(set(self.categories)) != len(self.categories):
            raise ConfigError(
                f"SyntheticShapes: categories must be distinct names from {list(SHAPE_CATEGORIES)}, "
                f"got {self.categories}"
            )
        self.unseen = [str(c) for c in unseen]
        if any(c not in self.categories for c in self.unseen) or len(self.unseen) >= len(self.categories):
            raise ConfigError(
                f"SyntheticShapes: unseen {self.unseen} must be a proper subset of categories {self.categories}"
            )
        self.max_shapes = check_int("max_shapes", max_shapes, 1)
        self.min_shapes = check_int("min_shapes", min_shapes, 0)
        if self.min_shapes > self.max_shapes:
            raise ConfigError(f"SyntheticShapes: min_shapes {min_shapes} > max_shapes {max_shapes}")
        if not noise_std >= 0:
            raise ConfigError(f"SyntheticShapes: noise_std must be >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)
        self.seed = check_int("seed", seed, 0)
        if split not in SPLITS:
            raise ConfigError(f"SyntheticShapes: split must be one of {sorted(SPLITS)}, got {split!r}")
        self.split = split
        self.split_id = SPLITS[split]
        # the categories this split draws from (their class ids stay those of the full vocabulary)
        self.drawn = [k for k, c in enumerate(self.categories) if split != "train" or c not in self.unseen]
        h, w = self.size
        sigma = max(1.5, min(h, w) / 8.0)
        self._field_h, self._field_w = lattice_matrix(h, sigma), lattice_matrix(w, sigma)

    def __len__(self) -> int:
        return self.num_cases

    def case_name(self, index: int) -> str:
        return f"shapes-{self.split}-{index:05d}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -self.num_cases <= index < self.num_cases:
            raise IndexError(f"SyntheticShapes: index {index} out of range for {self.num_cases} cases")
        index %= self.num_cases
        rng = np.random.default_rng((self.seed, self.split_id, index))
        h, w = self.size
        side = min(h, w)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        instances = np.zeros((h, w), np.int64)
        semantic = np.zeros((h, w), np.int64)
        occupied = np.zeros((h, w), bool)
        count = int(rng.integers(self.min_shapes, self.max_shapes + 1))
        colours = []
        for _ in range(count):
            category = int(rng.choice(self.drawn))
            for _attempt in range(20):  # rejection sampling of a free place (no overlap, 1 px apart)
                radius = rng.uniform(0.14, 0.24) * side
                cy, cx = rng.uniform(radius, h - radius), rng.uniform(radius, w - radius)
                shape = _shape_mask(
                    self.categories[category], yy - cy, xx - cx, radius, rng.uniform(0, np.pi)
                )
                grown = (
                    shape
                    | np.roll(shape, 1, 0)
                    | np.roll(shape, -1, 0)
                    | np.roll(shape, 1, 1)
                    | np.roll(shape, -1, 1)
                )
                if shape.sum() >= 6 and not (grown & occupied).any():
                    label = len(colours) + 1
                    instances[shape] = label
                    semantic[shape] = category + 1
                    occupied |= shape
                    colours.append(rng.uniform(0.6, 1.4, self.channels) * rng.choice([-1.0, 1.0]))
                    break
        lattice = rng.normal(size=(1, self._field_h.shape[1], self._field_w.shape[1])).astype(np.float32)
        background = unit_std(smooth_field(self._field_h, lattice, self._field_w))[0].astype(np.float64)
        image = np.repeat(0.4 * background[None], self.channels, axis=0)
        for label, colour in enumerate(colours, start=1):
            image += colour[:, None, None] * (instances == label)[None]
        image += self.noise_std * rng.normal(size=image.shape)
        image = (image - image.mean(axis=(1, 2), keepdims=True)) / (
            image.std(axis=(1, 2), keepdims=True) + 1e-6
        )
        mask = (instances > 0).astype(np.float32)[None]
        return {
            "image": torch.from_numpy(image.astype(np.float32)),
            "mask": torch.from_numpy(mask),
            "masks": torch.from_numpy(mask.copy()),
            "label": torch.tensor(int(count > 0 and mask.any()), dtype=torch.int64),
            "instances": torch.from_numpy(instances),
            "semantic": torch.from_numpy(semantic),
            "case": self.case_name(index),
            "index": torch.tensor(index, dtype=torch.int64),
        }


__all__ = ["SHAPE_CATEGORIES", "SyntheticShapes"]
