"""Image-level labelled crops of Kvasir-SEG: polyp crops (label 1) and polyp-free crops (label 0).

Every Kvasir-SEG image holds a polyp, so a weakly supervised method (CDM, Grad-CAM) has no negative class
in the release. :class:`KvasirPolypCrops` makes one from the same images: square windows cut from each
image (resized to ``context`` px), one centred on the polyp and one that holds no polyp pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diffseg_lightning.data.kvasir import KvasirSEG
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

INCLUDE = ("both", "positives", "negatives")


class KvasirPolypCrops(Dataset):
    """Kvasir-SEG (Jha et al., MMM 2020) as ``size`` x ``size`` crops with image-level labels, the real-data
    setting of the CDM experiments (Hu et al., MICCAI 2023 use BraTS slices with and without tumour;
    Kvasir-SEG has no polyp-free image, so the negatives are cut out of the polyp images).

    Each image of the :class:`~diffseg_lightning.data.kvasir.KvasirSEG` split is resized to ``context`` x
    ``context`` (aspect ratio not kept, as every Kvasir config does) and gives

    - a positive crop (``label`` 1): the ``size`` window centred on the centroid of the polyp mask,
      shifted to lie inside the image; its ``mask`` is the polyp mask in the window (a polyp larger than the
      window is cut);
    - a negative crop (``label`` 0, ``mask`` all zero): among the windows on a grid of stride ``size // 4``,
      those without a single polyp pixel, the one whose centre is farthest from the polyp's centroid (ties:
      the first in row-major order). An image with no polyp-free window gives no negative (counted in
      ``without_negative``).

    Known confounds, stated rather than hidden: negatives come more often from the image borders (the
    endoscope's dark frame, the green position box of some images) than positives, so an image-level
    classifier can partly separate them by position cues; both classes share the images, scale and colour.

    Args:
        root: the Kvasir-SEG root (see :class:`KvasirSEG`).
        split: ``train``, ``val`` or ``test`` (the seeded split of :class:`KvasirSEG`).
        size: crop side in pixels (the model's input size).
        context: side the image is resized to before cropping (> ``size``); ``context / size`` sets how
            much of the image a crop sees (2: a quarter of the area).
        include: ``both`` (positives then negatives), ``positives`` or ``negatives``.
        channels, fractions, seed, on_bad_case, folds, fold: passed to :class:`KvasirSEG`.

    Items: ``image`` float32 (C, size, size) 0..255, ``mask`` float32 (1, size, size), ``label`` int64,
    ``case`` (``<image path>#pos`` or ``#neg``), ``index`` int64.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int = 64,
        context: int = 128,
        include: str = "both",
        channels: int | None = 3,
        fractions: Sequence[float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        on_bad_case: str = "error",
        folds: int | None = None,
        fold: int = 0,
    ) -> None:
        super().__init__()
        if include not in INCLUDE:
            raise ConfigError(f"KvasirPolypCrops: include must be one of {list(INCLUDE)}, got {include!r}")
        if not (isinstance(size, int) and isinstance(context, int) and 8 <= size < context):
            raise ConfigError(
                f"KvasirPolypCrops needs integers 8 <= size < context, got size={size}, context={context}"
            )
        self.base = KvasirSEG(root, split, context, channels, fractions, seed, on_bad_case, folds, fold)
        self.size, self.context, self.include, self.split = size, context, include, split
        stride = max(1, size // 4)
        starts = list(range(0, context - size + 1, stride))
        if starts[-1] != context - size:
            starts.append(context - size)
        positives: list[tuple[int, int, int]] = []
        negatives: list[tuple[int, int, int]] = []
        self.without_negative = 0
        for i in range(len(self.base)):
            mask = self.base[i]["mask"][0].numpy() > 0
            if not mask.any():
                continue  # no polyp: no positive window and no centroid to stay away from
            cy, cx = np.argwhere(mask).mean(0)
            clamp = context - size
            positives.append(
                (
                    i,
                    int(np.clip(round(cy - size / 2), 0, clamp)),
                    int(np.clip(round(cx - size / 2), 0, clamp)),
                )
            )
            # polyp pixels per window from the summed-area table, all windows at once
            table = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
            ys, xs = np.meshgrid(np.array(starts), np.array(starts), indexing="ij")
            inside = table[ys + size, xs + size] - table[ys, xs + size] - table[ys + size, xs] + table[ys, xs]
            free = inside == 0
            if not free.any():
                self.without_negative += 1
                continue
            dist = (ys + size / 2 - cy) ** 2 + (xs + size / 2 - cx) ** 2
            best = np.argmax(np.where(free, dist, -1.0))
            negatives.append((i, int(ys.flat[best]), int(xs.flat[best])))
        self.entries = [(*e, 1) for e in positives] if include != "negatives" else []
        if include != "positives":
            self.entries += [(*e, 0) for e in negatives]
        if not self.entries:
            raise DiffSegError(
                f"KvasirPolypCrops: no {include} crop in the {split} split of {self.base.root}"
            )

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return (
            f"KvasirPolypCrops(split={self.split!r}, crops={len(self)}, size={self.size}, "
            f"context={self.context}, include={self.include!r})"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, y, x, label = self.entries[int(index)]
        item = self.base[i]
        window = (slice(None), slice(y, y + self.size), slice(x, x + self.size))
        mask = item["mask"][window] if label else torch.zeros(1, self.size, self.size)
        return {
            "image": item["image"][window].contiguous(),
            "mask": mask.contiguous(),
            "label": torch.tensor(label, dtype=torch.int64),
            "case": f"{item['case']}#{'pos' if label else 'neg'}",
            "index": torch.tensor(int(index)),
        }


__all__ = ["KvasirPolypCrops"]
