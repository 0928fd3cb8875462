"""Embedded synthetic segmentation dataset: seeded, deterministic, no download.

`SyntheticSegmentation` is the default dataset of DiffSeg. Every case is drawn on
the fly from its own random stream, ``np.random.default_rng((seed, split_id, index))``,
so item ``i`` is the same whenever, in whatever order and in whichever process
(DataLoader worker, DDP rank) it is requested, and the four splits never share a case.

What a case looks like (all sizes scale with ``min(H, W)``; the numbers are for 64 px):

* **Anatomy.** ``0`` foreground shapes with probability ``empty_fraction``, otherwise
  ``1..max_shapes`` of them (uniform count). Each shape is an ellipse or an irregular
  star-shaped blob (a radius with random harmonics 2..5), with a log-uniform size from
  about 3 to 16 px, placed anywhere (border touching and clipping allowed), kept as one
  4-connected component, and kept at least 3 px (Chebyshev) away from every other shape,
  so that the shapes never overlap nor touch and the instance ids are clean.
* **Image.** Per channel ``c``::

      raw_c = (1 + texture * T_c + k_c * L_c) * exp(bias_field * P_c) + noise_std * N_c

  ``T_c`` is a smoothed Gaussian random field (sigma ``min(H, W) / 20`` px, unit std;
  half of its variance is shared by the channels, like the anatomy it stands for), so
  the background is full of lesion-sized bright and dark spots. ``L_c`` is the lesion
  map: the shapes, each with its own "density" factor in ``[0.6, 1.4]``, blurred with
  sigma 0.6 px (partial volume). ``k_c`` is a per-case contrast whose sign and range
  depend on the channel ("modalities": same anatomy, different contrasts):

  ===========  =====================================================
  channel 0    bright lesion, ``k ~ U(0.3, 1.2)``
  channel 1    dark lesion, ``k ~ -U(0.3, 1.0)``
  channel 2    low contrast, bright, ``k ~ U(0.1, 0.4)``
  channel 3    rim enhancing: a bright 2 px rim ``U(0.5, 1.2)`` around a slightly
               dark core ``-U(0.1, 0.4)``
  ===========  =====================================================

  ``P_c`` is a random quadratic polynomial of the normalised coordinates scaled to
  ``max |P_c| = 1`` (a smooth multiplicative bias field, as in MRI), ``N_c`` white noise.
  ``channels=1`` uses channel 0, ``channels=3`` channels 0-2, ``channels=4`` all four.
* **Normalisation.** Each channel of each case is z-scored on its own (zero mean, unit
  standard deviation over the image, the nnU-Net default for MRI), so the image is
  roughly zero mean / unit scale whatever the options.
* **Annotators.** With ``num_annotators = A > 1`` each annotator's mask is the level set
  ``sdf + offset_a > 0`` of the reference's signed distance (``+`` inside, boundary
  pixels at ``+-0.5``), where ``offset_a`` is an annotator style (a fixed
  dilate/erode tendency from ``-m/2`` for annotator 0 to ``+m/2`` for annotator A-1,
  consistent across cases, like LIDC's readers), a per-case jitter and a smooth random
  field (elastic boundary jitter), clipped to ``[-m, m]`` with
  ``m = max(1.5, min(H, W) / 32)`` px. Annotators therefore disagree with each other
  and with the reference only within ``m + 0.5`` px of the reference boundary.

Difficulty: lesion contrast is often below the background texture's range and the bias
field moves intensities by up to +-30 %, so a single global threshold does badly (best
Dice about 0.5 on channel 0 with the defaults, see ``tests/test_synthetic.py``), while
the lesions' compact shapes and sharp edges against a smooth background make them
learnable by a small network. Generation costs well under a millisecond per 64x64 case.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

__all__ = ["SPLITS", "SyntheticSegmentation"]

#: The splits and the id mixed into the random stream of each.
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "predict": 3}

_VALID_CHANNELS = (1, 3, 4)
_MIN_SIZE = 8
_GAP = 2  # dilation (Chebyshev radius) that a new shape may not touch: >= 3 px apart
_TRIES_PER_SHAPE = 30
_STRUCT8 = np.ones((3, 3), dtype=bool)


def _check_int(name: str, value: Any, minimum: int) -> int:
    """Validates an integer option.

    Args:
        name: The option's name, used in the error message.
        value: The value given.
        minimum: The smallest accepted value.

    Returns:
        The value as a Python ``int``.

    Raises:
        ValueError: If ``value`` is not an integer (bools rejected) or is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"SyntheticSegmentation: {name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"SyntheticSegmentation: {name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, low: float, high: float = math.inf) -> float:
    """Validates a real option in the closed interval ``[low, high]``.

    Args:
        name: The option's name, used in the error message.
        value: The value given.
        low: The smallest accepted value.
        high: The largest accepted value.

    Returns:
        The value as a Python ``float``.

    Raises:
        ValueError: If ``value`` is not a finite real number in ``[low, high]``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"SyntheticSegmentation: {name} must be a number in [{low}, {high}], got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"SyntheticSegmentation: {name} must be in [{low}, {high}], got {value!r}")
    return value


def _check_size(size: Any) -> tuple[int, int]:
    """Validates ``size``: an int (square) or a pair ``(H, W)``.

    Args:
        size: The value given.

    Returns:
        ``(H, W)``.

    Raises:
        ValueError: If ``size`` is not one or two integers, each >= 8.
    """
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        pair: tuple[Any, ...] = (size, size)
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        pair = tuple(size)
    else:
        raise ValueError(
            f"SyntheticSegmentation: size must be a positive int or a pair (H, W) of them, got {size!r}"
        )
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < _MIN_SIZE:
            raise ValueError(
                f"SyntheticSegmentation: size must be an int or a pair (H, W) of ints, each >= {_MIN_SIZE}, "
                f"got {size!r}"
            )
    return int(pair[0]), int(pair[1])


def _unit_std(field: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Rescales ``field`` to zero mean and unit standard deviation over ``axes``."""
    field = field - field.mean(axis=axes, keepdims=True)
    return field / (field.std(axis=axes, keepdims=True) + 1e-8)


class SyntheticSegmentation(Dataset):
    """Seeded synthetic lesion segmentation, the embedded default dataset (no download).

    Not a method from a paper: a test bed with the traits of medical segmentation
    (textured background, bias field, noise, varied lesion count / size / contrast,
    empty cases, several modalities, several annotators). The generative model is
    described in the module docstring.

    Args:
        num_cases: Number of cases (``len(dataset)``), >= 1.
        size: Image size, an int (square) or ``(H, W)``; each side >= 8.
        channels: Number of channels ("modalities" with the same anatomy and different
            lesion contrast): 1, 3 or 4.
        num_annotators: Number of annotators ``A`` >= 1; with ``A > 1`` each gets a
            boundary-perturbed copy of the reference mask.
        max_shapes: Largest number of foreground shapes in a non-empty case, >= 1.
        empty_fraction: Probability that a case has no foreground, in ``[0, 1]``.
        noise_std: Standard deviation of the additive Gaussian noise (in units of the
            background intensity, before normalisation), >= 0.
        bias_field: Strength of the multiplicative bias field ``exp(bias_field * P)``
            with ``max |P| = 1``, >= 0.
        texture: Standard deviation of the background texture (units of the background
            intensity), >= 0.
        seed: Base seed, >= 0.
        split: One of ``"train"``, ``"val"``, ``"test"``, ``"predict"``; mixed into the
            random stream so that splits never share a case.

    Raises:
        ValueError: If an option is invalid; the message names the option.

    Example:
        >>> ds = SyntheticSegmentation(num_cases=8, size=(48, 64), channels=3, num_annotators=4)
        >>> item = ds[0]
        >>> item["image"].shape, item["mask"].shape, item["masks"].shape
        (torch.Size([3, 48, 64]), torch.Size([1, 48, 64]), torch.Size([4, 48, 64]))
    """

    def __init__(
        self,
        num_cases: int = 512,
        size: int | tuple[int, int] = 64,
        channels: int = 1,
        num_annotators: int = 1,
        max_shapes: int = 3,
        empty_fraction: float = 0.1,
        noise_std: float = 0.1,
        bias_field: float = 0.3,
        texture: float = 0.3,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        super().__init__()
        self.num_cases = _check_int("num_cases", num_cases, 1)
        self.size = _check_size(size)
        if isinstance(channels, bool) or channels not in _VALID_CHANNELS:
            raise ValueError(
                f"SyntheticSegmentation: channels must be one of {_VALID_CHANNELS}, got {channels!r}"
            )
        self.channels = int(channels)
        self.num_annotators = _check_int("num_annotators", num_annotators, 1)
        self.max_shapes = _check_int("max_shapes", max_shapes, 1)
        self.empty_fraction = _check_float("empty_fraction", empty_fraction, 0.0, 1.0)
        self.noise_std = _check_float("noise_std", noise_std, 0.0)
        self.bias_field = _check_float("bias_field", bias_field, 0.0)
        self.texture = _check_float("texture", texture, 0.0)
        self.seed = _check_int("seed", seed, 0)
        if not isinstance(split, str) or split not in SPLITS:
            raise ValueError(f"SyntheticSegmentation: split must be one of {sorted(SPLITS)}, got {split!r}")
        self.split = split
        self.split_id = SPLITS[split]

        h, w = self.size
        side = min(h, w)
        self.min_radius = max(2.0, 0.05 * side)
        self.max_radius = max(self.min_radius + 1.0, 0.25 * side)
        self.min_area = max(4, int(0.3 * math.pi * self.min_radius**2))
        self.texture_sigma = max(1.5, side / 20.0)
        self.jitter_sigma = max(2.0, side / 16.0)
        self.max_shift = max(1.5, side / 32.0)
        # Annotator styles: a fixed dilate (+) / erode (-) tendency per annotator.
        a = self.num_annotators
        self.annotator_styles = (
            np.linspace(-0.5, 0.5, a) * self.max_shift if a > 1 else np.zeros(1, dtype=np.float64)
        )
        yy = np.linspace(-1.0, 1.0, h)[:, None]
        xx = np.linspace(-1.0, 1.0, w)[None, :]
        # Quadratic monomials for the bias field: (6, H, W).
        self._monomials = np.stack(
            np.broadcast_arrays(np.ones_like(yy * xx), yy, xx, yy * yy, xx * xx, yy * xx)
        ).astype(np.float64)

    def __len__(self) -> int:
        """Returns the number of cases."""
        return self.num_cases

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_cases={self.num_cases}, size={self.size}, channels={self.channels}, "
            f"num_annotators={self.num_annotators}, max_shapes={self.max_shapes}, "
            f"empty_fraction={self.empty_fraction}, noise_std={self.noise_std}, bias_field={self.bias_field}, "
            f"texture={self.texture}, seed={self.seed}, split={self.split!r})"
        )

    def case_name(self, index: int) -> str:
        """Returns the case identifier, e.g. ``"synthetic-train-00017"``."""
        return f"synthetic-{self.split}-{index:05d}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Generates case ``index`` (negative indices count from the end).

        Args:
            index: The case index in ``[-len(self), len(self))``.

        Returns:
            A dict with

            * ``"image"``: float32 ``(C, H, W)``, each channel z-scored over the image;
            * ``"mask"``: float32 ``(1, H, W)`` in ``{0, 1}``, the reference (union of the shapes);
            * ``"masks"``: float32 ``(A, H, W)`` in ``{0, 1}``, the annotators' masks
              (equal to ``mask`` when ``A == 1``);
            * ``"label"``: int64 scalar, 1 if the reference has foreground, else 0;
            * ``"instances"``: int64 ``(H, W)``, 0 background and ``1..N`` one id per shape;
            * ``"case"``: str, e.g. ``"synthetic-train-00017"``;
            * ``"index"``: int64 scalar, the (non-negative) dataset index.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        if isinstance(index, torch.Tensor):
            index = int(index.item())
        index = int(index)
        if not -self.num_cases <= index < self.num_cases:
            raise IndexError(f"SyntheticSegmentation: index {index} out of range for {self.num_cases} cases")
        if index < 0:
            index += self.num_cases
        rng = np.random.default_rng((self.seed, self.split_id, index))

        instances, densities = self._draw_shapes(rng)
        mask = instances > 0
        image = self._draw_image(rng, instances, densities)
        if self.num_annotators > 1:
            masks = self._draw_annotators(rng, mask)
        else:
            masks = mask[None]

        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "masks": torch.from_numpy(masks.astype(np.float32)),
            "label": torch.tensor(int(mask.any()), dtype=torch.int64),
            "instances": torch.from_numpy(instances),
            "case": self.case_name(index),
            "index": torch.tensor(index, dtype=torch.int64),
        }

    # ------------------------------------------------------------------ shapes
    def _rasterize(
        self, rng: np.random.Generator
    ) -> tuple[tuple[slice, slice], np.ndarray]:
        """Draws one ellipse or blob and rasterizes it in its bounding box.

        Args:
            rng: The case's random stream.

        Returns:
            ``((rows, cols), crop)``: the bounding-box slices into the ``(H, W)`` image and
            the boolean shape inside them (one 4-connected component, possibly empty).
        """
        h, w = self.size
        radius = math.exp(rng.uniform(math.log(self.min_radius), math.log(self.max_radius)))
        cy = rng.uniform(0.05, 0.95) * (h - 1)
        cx = rng.uniform(0.05, 0.95) * (w - 1)
        is_ellipse = bool(rng.random() < 0.5)
        if is_ellipse:
            aspect = rng.uniform(0.45, 1.0)
            angle = rng.uniform(0.0, math.pi)
            semi_a, semi_b = radius, max(1.0, radius * aspect)
            extent = semi_a
        else:  # irregular star-shaped blob: r(theta) = radius * (1 + sum_k a_k cos(k theta + phi_k))
            amps = rng.uniform(0.0, 1.0, 4) / np.arange(2, 6) ** 0.5
            amps *= rng.uniform(0.2, 0.55) / amps.sum()
            phases = rng.uniform(0.0, 2.0 * math.pi, 4)
            extent = radius * (1.0 + amps.sum())
        y0, y1 = max(0, int(cy - extent - 1)), min(h, int(cy + extent + 2))
        x0, x1 = max(0, int(cx - extent - 1)), min(w, int(cx + extent + 2))
        dy = np.arange(y0, y1, dtype=np.float64)[:, None] - cy
        dx = np.arange(x0, x1, dtype=np.float64)[None, :] - cx
        if is_ellipse:
            cos, sin = math.cos(angle), math.sin(angle)
            u = dx * cos + dy * sin
            v = -dx * sin + dy * cos
            crop = (u / semi_a) ** 2 + (v / semi_b) ** 2 <= 1.0
        else:
            theta = np.arctan2(dy, dx)
            k = np.arange(2, 6, dtype=np.float64)[:, None, None]
            r_theta = radius * (1.0 + (amps[:, None, None] * np.cos(k * theta + phases[:, None, None])).sum(0))
            crop = dy * dy + dx * dx <= r_theta * r_theta
        labels, n = ndimage.label(crop)
        if n > 1:  # keep the largest 4-connected piece
            counts = np.bincount(labels.ravel())
            counts[0] = 0
            crop = labels == counts.argmax()
        return (slice(y0, y1), slice(x0, x1)), crop

    def _draw_shapes(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Places ``0..max_shapes`` non-touching shapes.

        Args:
            rng: The case's random stream.

        Returns:
            ``(instances, densities)``: int64 ``(H, W)`` with ids ``1..N`` in placement order,
            and float64 ``(N,)``, each shape's intensity factor in ``[0.6, 1.4]``.
        """
        h, w = self.size
        instances = np.zeros((h, w), dtype=np.int64)
        if rng.random() < self.empty_fraction:
            return instances, np.zeros(0)
        target = int(rng.integers(1, self.max_shapes + 1))
        occupied = np.zeros((h, w), dtype=bool)  # shapes dilated by _GAP
        n = 0
        for _ in range(target):
            for _ in range(_TRIES_PER_SHAPE):
                (rows, cols), crop = self._rasterize(rng)
                if crop.sum() < self.min_area or (crop & occupied[rows, cols]).any():
                    continue
                n += 1
                instances[rows, cols][crop] = n
                # Mark the shape grown by _GAP px as occupied (on a padded window only).
                py0, py1 = max(0, rows.start - _GAP), min(h, rows.stop + _GAP)
                px0, px1 = max(0, cols.start - _GAP), min(w, cols.stop + _GAP)
                grown = ndimage.binary_dilation(
                    instances[py0:py1, px0:px1] == n, structure=_STRUCT8, iterations=_GAP
                )
                occupied[py0:py1, px0:px1] |= grown
                break
        if n == 0:  # never happens in practice; keeps "non-empty" exact for tiny images
            cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
            yy, xx = np.ogrid[:h, :w]
            rad = max(1.5, self.min_radius)
            instances[(yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad] = 1
            n = 1
        return instances, rng.uniform(0.6, 1.4, n)

    # ------------------------------------------------------------------- image
    def _draw_image(self, rng: np.random.Generator, instances: np.ndarray, densities: np.ndarray) -> np.ndarray:
        """Renders the multi-channel image of the anatomy.

        Args:
            rng: The case's random stream.
            instances: int64 ``(H, W)`` instance map.
            densities: float64 ``(N,)`` per-shape intensity factors.

        Returns:
            float32 ``(C, H, W)``, each channel z-scored.
        """
        h, w = self.size
        c = self.channels
        # Texture: shared + per-channel smoothed random fields, unit std.
        fields = rng.standard_normal((c + 1, h, w)) if c > 1 else rng.standard_normal((1, h, w))
        fields = ndimage.gaussian_filter(fields, sigma=(0.0, self.texture_sigma, self.texture_sigma), mode="reflect")
        fields = _unit_std(fields, (1, 2))
        tex = (fields[:1] + fields[1:]) * math.sqrt(0.5) if c > 1 else fields

        # Lesion map with per-shape density and partial-volume blur.
        lut = np.concatenate([[0.0], densities])
        lesion = ndimage.gaussian_filter(lut[instances], sigma=0.6, mode="constant")

        contrast = np.empty(c)
        contrast[0] = rng.uniform(0.3, 1.2)
        if c >= 3:
            contrast[1] = -rng.uniform(0.3, 1.0)
            contrast[2] = rng.uniform(0.1, 0.4)
        tissue = 1.0 + self.texture * tex
        tissue[: min(c, 3)] += contrast[: min(c, 3), None, None] * lesion
        if c == 4:
            mask = instances > 0
            rim = mask & ~ndimage.binary_erosion(mask, structure=_STRUCT8, iterations=2, border_value=1)
            core = mask & ~rim
            rim_map = ndimage.gaussian_filter(
                lut[instances] * (rng.uniform(0.5, 1.2) * rim - rng.uniform(0.1, 0.4) * core),
                sigma=0.6,
                mode="constant",
            )
            tissue[3] += rim_map

        coeffs = rng.uniform(-1.0, 1.0, (c, self._monomials.shape[0]))
        poly = np.tensordot(coeffs, self._monomials, axes=1)
        poly /= np.abs(poly).max(axis=(1, 2), keepdims=True) + 1e-8
        image = tissue * np.exp(self.bias_field * poly)
        image += self.noise_std * rng.standard_normal((c, h, w))
        return _unit_std(image, (1, 2)).astype(np.float32)

    # -------------------------------------------------------------- annotators
    def _draw_annotators(self, rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
        """Perturbs the reference boundary once per annotator.

        Args:
            rng: The case's random stream.
            mask: bool ``(H, W)`` reference.

        Returns:
            bool ``(A, H, W)``; differs from ``mask`` only within ``max_shift + 0.5`` px of
            its boundary. All empty when ``mask`` is empty.
        """
        a = self.num_annotators
        h, w = self.size
        if not mask.any():
            return np.zeros((a, h, w), dtype=bool)
        # Signed distance, + inside; boundary pixels at +-0.5.
        inside = ndimage.distance_transform_edt(mask)
        outside = ndimage.distance_transform_edt(~mask)
        sdf = np.where(mask, inside - 0.5, 0.5 - outside)
        m = self.max_shift
        field = rng.standard_normal((a, h, w))
        field = ndimage.gaussian_filter(field, sigma=(0.0, self.jitter_sigma, self.jitter_sigma), mode="reflect")
        field = _unit_std(field, (1, 2))
        offset = self.annotator_styles[:, None, None] + rng.uniform(-0.2, 0.2, (a, 1, 1)) * m + 0.4 * m * field
        np.clip(offset, -m, m, out=offset)
        return sdf[None] + offset > 0.0
