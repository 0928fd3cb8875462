"""Synthetic vessel trees, and DARL's unpaired training set built around any image dataset.

DARL (Kim, Oh & Ye, ICLR 2023) learns vessel segmentation without labels: the masks ``s^f`` it trains with are
synthetic vessel trees (the released code, like SSVS, Ma et al. ICCV 2021, reads fractal masks from disk). This
module draws them: :func:`vessel_tree` is a seeded fractal (binary-branching) tree with tortuous segments whose
length and width shrink at every generation. :class:`UnpairedVessels` wraps an image dataset (e.g. DRIVE's
training images) into DARL's training items: the image, a vessel-free background and a synthetic mask, and
drops every label the wrapped dataset carries, so no annotation reaches training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from skimage.draw import line
from skimage.morphology import disk
from torch.utils.data import Dataset

from diffseg_lightning.exceptions import ConfigError

__all__ = ["UnpairedVessels", "vessel_background", "vessel_tree"]


def _check_tree_options(size: Sequence[int], depth: int, width: float, roots: int) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 8 or w < 8:
        raise ConfigError(f"vessel_tree: size must be at least 8x8, got {h}x{w}")
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 12:
        raise ConfigError(f"vessel_tree: depth must be an int in [1, 12], got {depth!r}")
    if not width > 0:
        raise ConfigError(f"vessel_tree: width must be > 0 pixels, got {width!r}")
    if isinstance(roots, bool) or not isinstance(roots, int) or roots < 1:
        raise ConfigError(f"vessel_tree: roots must be an int >= 1, got {roots!r}")
    return int(h), int(w)


def vessel_tree(
    size: int | Sequence[int],
    seed: int | np.random.Generator = 0,
    depth: int = 5,
    width: float = 4.0,
    roots: int = 1,
    length: float = 0.35,
    length_ratio: float = 0.75,
    width_ratio: float = 0.7,
    branch_angle: tuple[float, float] = (15.0, 45.0),
    tortuosity: float = 0.25,
    min_width: float = 1.0,
) -> np.ndarray:
    """A fractal vessel tree as a boolean (H, W) mask, deterministic under ``seed``.

    Each tree starts on a random image border and heads inwards; a segment of length ``L`` and width ``w`` is a
    polyline of 8 pieces whose direction turns by N(0, ``tortuosity``) radians per piece; at its end it splits
    into two children turned by +-U(``branch_angle``) degrees (asymmetrically), of length ``L * length_ratio``
    and width ``max(w * width_ratio, min_width)``, until ``depth`` generations are drawn. Widths are full
    widths in pixels: a pixel belongs to a segment when its distance to the centre line is at most
    ``(w - 1) / 2`` (so ``w = 1`` is the one-pixel centre line).

    Args:
        size: (H, W) or one int.
        seed: an int seed or a ``numpy.random.Generator``.
        depth: generations of the tree (1 = the trunk only).
        width: trunk width in pixels.
        roots: independent trees in the image (coronary angiograms show 1-2 main trees).
        length: trunk length as a fraction of the image diagonal.
        length_ratio: child length / parent length.
        width_ratio: child width / parent width.
        branch_angle: range of the branching angle in degrees.
        tortuosity: standard deviation of the turn between polyline pieces, radians.
        min_width: the thinnest width in pixels.

    Returns:
        bool (H, W).

    Raises:
        ValueError: a size under 8x8, a depth outside [1, 12], a width <= 0 or roots < 1.
    """
    h, w = _check_tree_options(size, depth, width, roots)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    diagonal = math.hypot(h, w)
    # centre lines per distinct half-width (few: one per generation), dilated once each by a distance transform
    centre: dict[float, np.ndarray] = {}
    for _ in range(roots):
        side = rng.integers(4)
        along = rng.uniform(0.2, 0.8)
        y, x = {0: (0.0, along * w), 1: (h - 1.0, along * w), 2: (along * h, 0.0), 3: (along * h, w - 1.0)}[
            side
        ]
        heading = {0: math.pi / 2, 1: -math.pi / 2, 2: 0.0, 3: math.pi}[side] + rng.normal(0, 0.3)
        stack = [(y, x, heading, length * diagonal, float(width), 1)]
        while stack:
            y0, x0, angle, seg_len, seg_width, generation = stack.pop()
            radius = max(seg_width, min_width)
            canvas = centre.setdefault(round((radius - 1.0) / 2.0, 3), np.zeros((h, w), bool))
            piece = seg_len / 8
            for _ in range(8):
                angle += rng.normal(0, tortuosity)
                y1, x1 = y0 + piece * math.sin(angle), x0 + piece * math.cos(angle)
                rr, cc = line(int(round(y0)), int(round(x0)), int(round(y1)), int(round(x1)))
                keep = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
                canvas[rr[keep], cc[keep]] = True
                y0, x0 = y1, x1
            if generation < depth:
                low, high = branch_angle
                turn = math.radians(rng.uniform(low, high))
                share = rng.uniform(0.3, 0.7)  # asymmetric split of the turn between the two children
                child_len = seg_len * length_ratio
                child_width = max(seg_width * width_ratio, min_width)
                stack.append((y0, x0, angle + turn * share * 2, child_len, child_width, generation + 1))
                stack.append((y0, x0, angle - turn * (1 - share) * 2, child_len, child_width, generation + 1))
    mask = np.zeros((h, w), bool)
    for half_width, canvas in centre.items():
        if not canvas.any():
            continue
        if half_width <= 0:
            mask |= canvas
        else:
            mask |= ndimage.distance_transform_edt(~canvas) <= half_width
    return mask


def vessel_background(image: torch.Tensor, radius: int) -> torch.Tensor:
    """A label-free vessel-free background: the grey-level closing of each channel by a disk of ``radius``.

    Vessels darker than their surroundings (contrast-filled arteries in X-ray angiograms, vessels in the green
    channel of fundus photographs) narrower than the disk are filled in by the closing (dilation then
    erosion); wider structures are kept. Used when a dataset has no contrast-free frames (DRIVE).

    Args:
        image: (C, H, W) float.
        radius: disk radius in pixels (> 0): wider than half the widest vessel.

    Returns:
        (C, H, W) float32.
    """
    if radius < 1:
        raise ConfigError(f"vessel_background: radius must be >= 1, got {radius}")
    footprint = disk(radius).astype(bool)
    array = image.detach().cpu().float().numpy()
    closed = np.stack(
        [ndimage.grey_closing(channel, footprint=footprint, mode="reflect") for channel in array]
    )
    return torch.from_numpy(closed.astype(np.float32))


class UnpairedVessels(Dataset):
    """DARL's unpaired training items around an image dataset: image, vessel-free background, synthetic mask.

    DARL (Kim et al., ICLR 2023) trains on unpaired angiograms ``x^a``, backgrounds ``x^b`` and synthetic masks
    ``s^f``. For a dataset with no contrast-free frames (DRIVE) the background is
    :func:`vessel_background` of the image (a grey-level closing, label-free); the mask is a fresh
    :func:`vessel_tree`, drawn with the seed ``(seed, index)`` so that every item is reproducible. Every label
    of the wrapped items (``mask``, ``masks``, ``fov``, ``label``, ``instances``) is dropped: nothing annotated
    reaches training.

    Items: ``image`` (C, H, W) as the wrapped dataset gives it; ``background`` (C, H, W); ``fake_mask``
    float32 (1, H, W) in {0, 1}; ``case`` (str); ``index`` int64.

    Args:
        images: the wrapped dataset (items with ``image`` and ``case``).
        repeats: each image appears ``repeats`` times per epoch, each time with another synthetic tree.
        closing_radius: the background's closing radius in pixels, at the items' size.
        seed: seed of the synthetic trees.
        depth, width, roots: :func:`vessel_tree` options (width in pixels at the items' size).
        crop: train on random ``crop`` x ``crop`` windows (position drawn with the seed ``(seed, index)``) of
            the images instead of whole images; the background and the tree are made at the crop's size.
            None uses whole images.
    """

    LABEL_KEYS = ("mask", "masks", "fov", "label", "instances")

    def __init__(
        self,
        images: Dataset,
        repeats: int = 1,
        closing_radius: int = 4,
        seed: int = 0,
        depth: int = 6,
        width: float = 3.0,
        roots: int = 2,
        crop: int | None = None,
    ) -> None:
        if repeats < 1:
            raise ConfigError(f"UnpairedVessels: repeats must be >= 1, got {repeats}")
        self.images = images
        self.repeats = int(repeats)
        self.closing_radius = int(closing_radius)
        self.seed = int(seed)
        self.tree = {"depth": depth, "width": width, "roots": roots}
        _check_tree_options(16, depth, width, roots)
        if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop < 8):
            raise ConfigError(f"UnpairedVessels: crop must be an int >= 8 or None, got {crop!r}")
        self.crop = crop
        self.deterministic_items = True

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, index: int) -> dict:
        item = self.images[index % len(self.images)]
        image = item["image"]
        rng = np.random.default_rng((self.seed, index))
        if self.crop is not None:
            h, w = image.shape[-2:]
            if self.crop > min(h, w):
                raise ConfigError(f"UnpairedVessels: crop {self.crop} is larger than the image ({h}x{w})")
            top, left = int(rng.integers(h - self.crop + 1)), int(rng.integers(w - self.crop + 1))
            image = image[..., top : top + self.crop, left : left + self.crop]
        fake = vessel_tree(tuple(image.shape[-2:]), rng, **self.tree)
        return {
            "image": image,
            "background": vessel_background(image, self.closing_radius),
            "fake_mask": torch.from_numpy(fake.astype(np.float32))[None],
            "case": item["case"],
            "index": torch.tensor(index),
        }
