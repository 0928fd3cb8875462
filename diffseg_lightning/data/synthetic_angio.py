"""Synthetic angiography: vessel trees darkened into background textures, plus the same backgrounds without them.

The data DARL (Kim, Oh & Ye, ICLR 2023) trains on, without a download: X-ray coronary angiography gives, per
sequence, a contrast-free frame (the background ``x^b``) and frames with contrast-filled vessels (the
angiogram ``x^a``), slightly misaligned by the patient's motion. Here each case draws a smooth multi-scale
background texture, a vessel tree (:func:`~diffseg_lightning.data.vessels.vessel_tree`) and darkens the tree
into the texture; the background item is the same texture shifted by a few pixels (the motion), with its own
sensor noise. Deterministic: case ``i`` of a split comes from ``np.random.default_rng((seed, split_id, i))``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from diffseg_lightning.data.synthetic import SPLITS, check_int, check_size
from diffseg_lightning.data.vessels import vessel_tree
from diffseg_lightning.exceptions import ConfigError

__all__ = ["SyntheticAngiography"]


class SyntheticAngiography(Dataset):
    """Seeded synthetic angiograms for self-supervised vessel segmentation (DARL, Kim et al., ICLR 2023).

    Image formation, per case: a background ``b`` = sum of Gaussian-smoothed white noise at three scales
    (sigma = size/4, size/12, size/40 with weights 1, 0.5, 0.25) plus a random linear shading ramp, min-max
    scaled to [0.3, 0.9]; a vessel tree ``v`` (bool); the angiogram ``a = b - contrast * blur(v, 0.7 px) +
    N(0, noise^2)``, clipped to [0, 1]. The training split's ``background`` is ``b`` shifted by up to
    ``motion`` pixels (reflect padding) plus its own noise: the same background without vessels, misaligned
    as a real pre-contrast frame is.

    Items:
        train split (no label reaches training): ``image`` float32 (1, H, W) the angiogram; ``background``
        float32 (1, H, W); ``fake_mask`` float32 (1, H, W) {0, 1}, an independent synthetic tree (another
        stream) for DARL's path B; ``case``; ``index``. Other splits: ``image``, ``mask`` float32 (1, H, W)
        {0, 1} (the tree that was darkened in), ``case``, ``index``.

    Args:
        num_cases: cases in the split.
        size: (H, W) or one int (>= 8).
        split: ``train``, ``val``, ``test`` or ``predict`` (mixed into the random stream: splits never share a
            case).
        seed: base seed.
        depth: generations of the vessel trees.
        width: trunk width in pixels.
        roots: trees per image.
        contrast: how much the vessels darken the background (0..1).
        noise: standard deviation of the sensor noise.
        motion: the largest shift (pixels) between an angiogram and its background.
        channels: must be 1 (grey angiograms); accepted so the data config composes like the others.
    """

    def __init__(
        self,
        num_cases: int,
        size: Any = 64,
        split: str = "train",
        seed: int = 0,
        depth: int = 5,
        width: float = 3.0,
        roots: int = 1,
        contrast: float = 0.35,
        noise: float = 0.02,
        motion: int = 2,
        channels: int = 1,
    ) -> None:
        self.num_cases = check_int("num_cases", num_cases, 1)
        self.size = check_size(size)
        if split not in SPLITS:
            raise ConfigError(f"SyntheticAngiography: split must be one of {tuple(SPLITS)}, got {split!r}")
        if channels != 1:
            raise ConfigError(
                f"SyntheticAngiography: angiograms are grey, channels must be 1, got {channels!r}"
            )
        if not 0.0 < contrast <= 1.0:
            raise ConfigError(f"SyntheticAngiography: contrast must be in (0, 1], got {contrast!r}")
        if noise < 0 or motion < 0:
            raise ConfigError(
                f"SyntheticAngiography: noise and motion must be >= 0, got {noise!r}, {motion!r}"
            )
        vessel_tree(self.size, 0, depth=depth, width=width, roots=roots)  # validates the tree options
        self.split, self.seed = split, int(seed)
        self.tree = {"depth": depth, "width": width, "roots": roots}
        self.contrast, self.noise, self.motion = float(contrast), float(noise), int(motion)
        self.deterministic_items = True

    def __len__(self) -> int:
        return self.num_cases

    def __repr__(self) -> str:
        return (
            f"SyntheticAngiography(split={self.split!r}, cases={self.num_cases}, size={self.size}, "
            f"seed={self.seed}, tree={self.tree}, contrast={self.contrast})"
        )

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.size
        field = np.zeros((h, w))
        for divisor, weight in ((4, 1.0), (12, 0.5), (40, 0.25)):
            layer = ndimage.gaussian_filter(rng.normal(size=(h, w)), max(h, w) / divisor, mode="wrap")
            field += weight * layer / (layer.std() + 1e-8)
        yy, xx = np.mgrid[:h, :w]
        field += rng.normal(0, 1.0) * (yy / h - 0.5) + rng.normal(0, 1.0) * (xx / w - 0.5)
        field = (field - field.min()) / (field.max() - field.min() + 1e-8)
        return 0.3 + 0.6 * field

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_cases:
            raise IndexError(f"SyntheticAngiography: index {index} out of range [0, {self.num_cases})")
        rng = np.random.default_rng((self.seed, SPLITS[self.split], index))
        background = self._background(rng)
        tree = vessel_tree(self.size, rng, **self.tree)
        darkening = self.contrast * ndimage.gaussian_filter(tree.astype(np.float64), 0.7)
        image = np.clip(background - darkening + rng.normal(0, self.noise, self.size), 0.0, 1.0)
        item: dict[str, Any] = {
            "image": torch.from_numpy(image.astype(np.float32))[None],
            "case": f"angio-{self.split}-{index:05d}",
            "index": torch.tensor(index),
        }
        if self.split != "train":
            item["mask"] = torch.from_numpy(tree.astype(np.float32))[None]
            return item
        shift = rng.integers(-self.motion, self.motion + 1, size=2) if self.motion else (0, 0)
        moved = ndimage.shift(background, shift, order=0, mode="reflect")
        moved = np.clip(moved + rng.normal(0, self.noise, self.size), 0.0, 1.0)
        # the unpaired synthetic mask s^f: a tree from a stream of its own (never the one darkened in)
        fake = vessel_tree(
            self.size, np.random.default_rng((self.seed, SPLITS[self.split], index, 1)), **self.tree
        )
        item["background"] = torch.from_numpy(moved.astype(np.float32))[None]
        item["fake_mask"] = torch.from_numpy(fake.astype(np.float32))[None]
        return item
