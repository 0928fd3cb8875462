"""Synthetic four-modality tumour data with nested regions, for multi-modality fusion (EI-DDPM).

Each case is drawn from its own stream ``np.random.default_rng((seed, split_id, index))``, so an item is
the same whenever and wherever it is requested, and the splits never share a case.

A case (sizes scale with ``min(H, W)``; numbers for 32 px):

* **Regions** (nested, like BraTS): the whole tumour WT is an ellipse with random centre, radii and
  angle (semi-axes about 0.17-0.30 of the size), the tumour core TC an ellipse inside it (0.35-0.6 of
  WT's radii, shifted by at most a quarter of the free space), the enhancing tumour ET the rim of TC
  (TC minus TC eroded by about 1/16 of the size, at least one pixel). ``empty_fraction`` of the cases
  have no tumour.
* **Modalities** (M = 4, MRI-like, each showing a DIFFERENT region well)::

      t1     WT slightly dark            -0.3 * WT                (weak: little to see)
      t1ce   ET bright                   +1.0 * ET  - 0.3 * (TC - ET)
      t2     TC bright                   +1.0 * TC
      flair  WT bright                   +1.0 * WT

  plus, per modality, a smooth random texture (Gaussian-filtered white noise, sigma ``size / 16``,
  std ``texture``) and white noise (std ``noise_std``); each channel of each case is z-scored.
* **An unreliable modality** (``corrupt`` / ``corrupt_modality``): ``noise`` adds white noise of std
  ``corrupt_level`` (times the channel's lesion contrast) to that modality, ``missing`` removes its
  lesion signal (texture and noise only). It applies to every split, to a fraction ``corrupt_fraction``
  of the cases (chosen per case by its stream).

Items: ``image`` (4, H, W) float32 in the order of ``modalities``, ``mask`` (3, H, W) float32 {0, 1}
(WT, TC, ET), ``label`` (image-level tumour present), ``corrupted`` (bool), ``case``, ``index``,
``original_size``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from diffseg_lightning.data.synthetic import check_float, check_int
from diffseg_lightning.exceptions import ConfigError

MODALITIES = ("t1", "t1ce", "t2", "flair")
SPLITS = {"train": 0, "val": 1, "test": 2, "predict": 3}
CORRUPTIONS = (None, "noise", "missing")
# lesion contrast of each modality on (WT, TC, ET)
CONTRAST = {
    "t1": (-0.3, 0.0, 0.0),
    "t1ce": (0.0, -0.3, 1.3),  # ET bright, the rest of the core dark: -0.3 (TC - ET) + ET
    "t2": (0.0, 1.0, 0.0),
    "flair": (1.0, 0.0, 0.0),
}


class SyntheticMultiModal(Dataset):
    """Seeded four-modality images with nested WT / TC / ET masks; one modality optionally unreliable.

    See the module docstring for what a case looks like. Made for EI-DDPM (Zhao and Li, MICCAI 2023),
    whose learned per-modality reliabilities must single out the corrupted modality.

    Args:
        num_cases: cases in the split.
        size: H = W, pixels (>= 16).
        split: ``train``, ``val``, ``test`` or ``predict``.
        seed: base seed.
        modalities: the channel order, a permutation of (t1, t1ce, t2, flair) or a subset of it.
        texture: std of the smooth background texture.
        noise_std: std of the white noise.
        empty_fraction: share of cases without a tumour, in [0, 1].
        corrupt: None, ``noise`` or ``missing``.
        corrupt_modality: the name of the unreliable modality.
        corrupt_level: noise std in units of the lesion contrast (``noise``).
        corrupt_fraction: share of the cases in which the modality is corrupted, in [0, 1].

    Raises:
        ValueError: on an unknown option value.
    """

    def __init__(
        self,
        num_cases: int = 256,
        size: int = 32,
        split: str = "train",
        seed: int = 0,
        modalities: tuple[str, ...] | list[str] = MODALITIES,
        texture: float = 0.3,
        noise_std: float = 0.2,
        empty_fraction: float = 0.0,
        corrupt: str | None = None,
        corrupt_modality: str = "flair",
        corrupt_level: float = 2.0,
        corrupt_fraction: float = 1.0,
    ) -> None:
        self.num_cases = check_int("num_cases", num_cases, 0)
        self.size = check_int("size", size, 16)
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.modalities = tuple(str(m) for m in modalities)
        unknown = [m for m in self.modalities if m not in MODALITIES] + (
            ["(duplicates)"] if len(set(self.modalities)) != len(self.modalities) else []
        )
        if unknown or not self.modalities:
            raise ConfigError(
                f"modalities must be distinct names from {MODALITIES}, got {list(self.modalities)}"
            )
        if corrupt not in CORRUPTIONS:
            raise ConfigError(f"corrupt must be one of {list(CORRUPTIONS)}, got {corrupt!r}")
        if corrupt is not None and corrupt_modality not in self.modalities:
            raise ConfigError(
                f"corrupt_modality must be one of {list(self.modalities)}, got {corrupt_modality!r}"
            )
        self.split, self.seed = split, int(seed)
        self.texture = check_float("texture", texture, 0.0)
        self.noise_std = check_float("noise_std", noise_std, 0.0)
        self.empty_fraction = check_float("empty_fraction", empty_fraction, 0.0, 1.0)
        self.corrupt, self.corrupt_modality = corrupt, corrupt_modality
        self.corrupt_level = check_float("corrupt_level", corrupt_level, 0.0)
        self.corrupt_fraction = check_float("corrupt_fraction", corrupt_fraction, 0.0, 1.0)

    def __len__(self) -> int:
        return self.num_cases

    def case_name(self, index: int) -> str:
        return f"multimodal-{self.split}-{index:05d}"

    def _ellipse(self, rng: np.random.Generator, centre, radii) -> np.ndarray:
        n = self.size
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - centre[0], xx - centre[1]
        u = dy * np.cos(angle) + dx * np.sin(angle)
        v = -dy * np.sin(angle) + dx * np.cos(angle)
        return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 <= 1.0

    def _regions(self, rng: np.random.Generator) -> np.ndarray:
        n = self.size
        if rng.uniform() < self.empty_fraction:
            return np.zeros((3, n, n), bool)
        radii = rng.uniform(0.17, 0.30, 2) * n
        centre = rng.uniform(0.3, 0.7, 2) * n
        wt = self._ellipse(rng, centre, radii)
        scale = rng.uniform(0.35, 0.6)
        free = radii * (1 - scale)
        core_centre = centre + rng.uniform(-0.25, 0.25, 2) * free
        tc = self._ellipse(rng, core_centre, radii * scale) & wt
        rim = max(1, round(n / 16))
        et = tc & ~ndimage.binary_erosion(tc, iterations=rim)
        return np.stack([wt, tc, et])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_cases:
            raise IndexError(f"index {index} out of range for {self.num_cases} cases")
        rng = np.random.default_rng((self.seed, SPLITS[self.split], index))
        regions = self._regions(rng)
        n, sigma = self.size, self.size / 16
        draw = rng.uniform()  # always drawn: the corruption option does not shift a case's stream
        corrupted = self.corrupt is not None and draw < self.corrupt_fraction
        channels = []
        for name in MODALITIES:  # fixed draw order: a case does not depend on the channel order
            contrast = np.asarray(CONTRAST[name])
            lesion = np.tensordot(contrast, regions.astype(np.float64), axes=1)
            field = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma)
            field = field / max(field.std(), 1e-8) * self.texture
            noise = rng.standard_normal((n, n)) * self.noise_std
            extra = rng.standard_normal((n, n))
            if corrupted and name == self.corrupt_modality:
                if self.corrupt == "missing":
                    lesion = np.zeros_like(lesion)
                else:
                    noise = noise + extra * self.corrupt_level * np.abs(contrast).max()
            raw = 1.0 + lesion + field + noise
            channels.append((raw - raw.mean()) / max(raw.std(), 1e-8))
        image = np.stack([channels[MODALITIES.index(m)] for m in self.modalities]).astype(np.float32)
        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(regions.astype(np.float32)),
            "label": torch.tensor(int(regions[0].any())),
            "corrupted": torch.tensor(bool(corrupted)),
            "case": self.case_name(index),
            "index": torch.tensor(index),
            "original_size": torch.tensor([n, n]),
        }

    def __repr__(self) -> str:
        return (
            f"SyntheticMultiModal(split={self.split!r}, num_cases={self.num_cases}, size={self.size}, "
            f"modalities={list(self.modalities)}, corrupt={self.corrupt!r}, "
            f"corrupt_modality={self.corrupt_modality!r})"
        )


__all__ = ["MODALITIES", "SyntheticMultiModal"]
