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
  map: the shapes, each with its own "density" factor in ``[0.7, 1.3]``, blurred with
  sigma 0.6 px (partial volume). ``k_c`` is a per-case contrast whose sign and range
  depend on the channel ("modalities": same anatomy, different contrasts):

  ===========  =====================================================
  channel 0    bright lesion, ``k ~ U(0.4, 1.2)``
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
  pixels at ``+-0.5``). ``offset_a`` combines an annotator style (a fixed erode/dilate
  tendency from annotator 0 to annotator A-1, consistent across cases, like LIDC's
  readers), a per-case jitter and a smooth random field (elastic boundary jitter),
  scaled by the nearest shape's boundary uncertainty ``clip(0.2 r, 1.25, m)`` px (``r`` its
  equivalent radius, ``m = max(1.5, min(H, W) / 32)`` px, the ``max_shift`` attribute)
  and bounded by it. Annotators therefore disagree with each other and with the
  reference only within ``m + 0.5`` px of the reference boundary. No two annotators of
  a non-empty case are identical (a one-pixel tie-break on the boundary ring).

Difficulty: lesion contrast is often below the background texture's range and the bias
field moves intensities by up to +-30 %, so a single global threshold does badly (best
pooled Dice 0.53 on channel 0 over 200 default cases, see ``tests/test_synthetic.py``),
while the lesions' compact shapes and sharp edges against a smooth background make them
learnable: a 119k-parameter U-Net on channel 0 reached Dice 0.88 on the val split after
116 Adam steps (batch 32, about 4 minutes on a loaded 2-core CPU). Generation costs about
1 ms of CPU per 64x64 single-channel case (no caching; numpy + scipy, single-threaded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from diffseg_lightning.exceptions import ConfigError

__all__ = ["SPLITS", "SyntheticSegmentation"]

#: The splits and the id mixed into the random stream of each.
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "predict": 3}

_VALID_CHANNELS = (1, 3, 4)
_MIN_SIZE = 8
_GAP = 2  # dilation (Chebyshev radius) that a new shape may not touch: >= 3 px apart
_TRIES_PER_SHAPE = 30
PARTIAL_VOLUME_SIGMA = 0.6
_RIM_WIDTH = 2
_STRUCT4 = ndimage.generate_binary_structure(2, 1)


def check_int(name: str, value: Any, minimum: int) -> int:
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
        raise ConfigError(f"SyntheticSegmentation: {name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"SyntheticSegmentation: {name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, low: float, high: float = math.inf) -> float:
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
        raise ConfigError(f"SyntheticSegmentation: {name} must be a number in [{low}, {high}], got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"SyntheticSegmentation: {name} must be in [{low}, {high}], got {value!r}")
    return value


def check_size(size: Any) -> tuple[int, int]:
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
    elif (
        isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2
    ):  # also Hydra's ListConfig
        pair = tuple(size)
    else:
        raise ConfigError(
            f"SyntheticSegmentation: size must be a positive int or a pair (H, W) of them, got {size!r}"
        )
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < _MIN_SIZE:
            raise ConfigError(
                f"SyntheticSegmentation: size must be an int or a pair (H, W) of ints, each >= {_MIN_SIZE}, "
                f"got {size!r}"
            )
    return int(pair[0]), int(pair[1])


def unit_std(field: np.ndarray) -> np.ndarray:
    """Rescales each ``(H, W)`` plane of ``field`` to zero mean and unit standard deviation.

    Args:
        field: float32 ``(K, H, W)``.

    Returns:
        float32 ``(K, H, W)``.
    """
    flat = field.reshape(field.shape[0], -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    std = np.sqrt(np.einsum("ij,ij->i", flat, flat) / flat.shape[1])
    return (flat / (std[:, None] + 1e-6)).reshape(field.shape)


def blur_small(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes with a short kernel; zero boundary.

    Shifted slices and multiply-adds instead of ``scipy.ndimage.gaussian_filter`` or a
    dense matrix: for a kernel of radius 2 this is several times faster on small images
    and never enters a multi-threaded BLAS call.

    Args:
        image: ``(..., H, W)`` float array.
        sigma: Standard deviation in pixels (kernel radius ``ceil(4 sigma)``; meant for
            sigma below about 1).

    Returns:
        ``(..., H, W)``, same dtype.
    """
    radius = int(math.ceil(4.0 * sigma))
    taps = np.exp(-0.5 * (np.arange(radius + 1) / sigma) ** 2)
    taps = (taps / (taps[0] + 2.0 * taps[1:].sum())).astype(image.dtype)
    rows = image * taps[0]  # along H
    for s in range(1, radius + 1):
        rows[..., s:, :] += taps[s] * image[..., :-s, :]
        rows[..., :-s, :] += taps[s] * image[..., s:, :]
    out = rows * taps[0]  # along W
    for s in range(1, radius + 1):
        out[..., s:] += taps[s] * rows[..., :-s]
        out[..., :-s] += taps[s] * rows[..., s:]
    return out


def lattice_matrix(n: int, sigma: float) -> np.ndarray:
    """Gaussian bumps on a coarse lattice: maps lattice white noise to a smooth field.

    ``K_h @ Z @ K_w.T`` with ``Z`` white noise on the lattice is a smooth Gaussian random
    field of correlation length ``sigma``: a sum of Gaussian bumps of width ``sigma`` at
    lattice spacing ``sigma``. The lattice does not show (the bump's Fourier transform at
    the lattice frequency is ``exp(-2 pi^2) ~ 3e-9``), and the small matrices keep the
    matmuls cheap. The lattice extends ``3 sigma`` beyond the image so the field does not
    fade at the border.

    Args:
        n: Length of the image axis.
        sigma: Bump width in pixels.

    Returns:
        float32 ``(n, m)``, ``m`` the number of lattice nodes.
    """
    step = sigma
    nodes = np.arange(-3.0 * sigma, n - 1 + 3.0 * sigma + step, step)
    i = np.arange(n, dtype=np.float64)
    dist = np.abs(i[:, None] - nodes[None, :]) / sigma
    # Truncate at 4 sigma: besides sparsity, this keeps float32 denormals (very slow in BLAS) out.
    return np.where(dist <= 4.0, np.exp(-0.5 * dist**2), 0.0).astype(np.float32)


# OpenBLAS runs a GEMM multi-threaded above m * n * k = 4 * 65536; under load (and in
# DataLoader workers, where it multiplies the threads) that is several times slower
# for these small products, so larger products are cut into row blocks below it.
_GEMM_SINGLE_THREAD_MACS = 4 * 65536


def smooth_field(k_h: np.ndarray, noise: np.ndarray, k_w: np.ndarray) -> np.ndarray:
    """Computes ``k_h @ noise @ k_w.T`` in row blocks that each stay single-threaded.

    Args:
        k_h: float32 ``(H, m_h)`` lattice matrix of the rows.
        noise: float32 ``(K, m_h, m_w)`` white noise on the lattice.
        k_w: float32 ``(W, m_w)`` lattice matrix of the columns.

    Returns:
        float32 ``(K, H, W)``.
    """
    tmp = k_h @ noise
    kt = k_w.T
    h, (m_w, w) = tmp.shape[1], kt.shape
    rows = max(1, _GEMM_SINGLE_THREAD_MACS // (m_w * w))
    out = np.empty((noise.shape[0], h, w), dtype=np.float32)
    for r0 in range(0, h, rows):  # one block at 64 px, a handful at 256 px
        np.matmul(tmp[:, r0 : r0 + rows], kt, out=out[:, r0 : r0 + rows])
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a ``(2 radius + 1)`` square (Chebyshev ball); outside is background.

    Separable shifts and ORs: much cheaper than ``scipy.ndimage.binary_dilation`` on
    small arrays.

    Args:
        mask: bool ``(H, W)``.
        radius: Radius in pixels, >= 0.

    Returns:
        bool ``(H, W)``.
    """
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        view_out = out if axis == 0 else out.T
        view_src = src if axis == 0 else src.T
        for s in range(1, radius + 1):
            view_out[s:] |= view_src[:-s]
            view_out[:-s] |= view_src[s:]
    return out


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
        self.num_cases = check_int("num_cases", num_cases, 1)
        self.size = check_size(size)
        if (
            isinstance(channels, bool)
            or not isinstance(channels, (int, np.integer))
            or channels not in _VALID_CHANNELS
        ):
            raise ConfigError(
                f"SyntheticSegmentation: channels must be one of {_VALID_CHANNELS}, got {channels!r}"
            )
        self.channels = int(channels)
        self.num_annotators = check_int("num_annotators", num_annotators, 1)
        self.max_shapes = check_int("max_shapes", max_shapes, 1)
        self.empty_fraction = check_float("empty_fraction", empty_fraction, 0.0, 1.0)
        self.noise_std = check_float("noise_std", noise_std, 0.0)
        self.bias_field = check_float("bias_field", bias_field, 0.0)
        self.texture = check_float("texture", texture, 0.0)
        self.seed = check_int("seed", seed, 0)
        if not isinstance(split, str) or split not in SPLITS:
            raise ConfigError(f"SyntheticSegmentation: split must be one of {sorted(SPLITS)}, got {split!r}")
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
        # Precomputed linear operators (small matrices: a matmul beats scipy's filters here).
        self._tex_h, self._tex_w = (
            lattice_matrix(h, self.texture_sigma),
            lattice_matrix(w, self.texture_sigma),
        )
        self._jit_h, self._jit_w = (
            lattice_matrix(h, self.jitter_sigma),
            lattice_matrix(w, self.jitter_sigma),
        )
        # Annotator styles: a fixed erode (-) / dilate (+) tendency per annotator, in units
        # of the boundary uncertainty of the shape (see _draw_annotators).
        a = self.num_annotators
        self.annotator_styles = np.linspace(-0.5, 0.5, a) if a > 1 else np.zeros(1)
        yy = np.linspace(-1.0, 1.0, h)[:, None]
        xx = np.linspace(-1.0, 1.0, w)[None, :]
        # Quadratic monomials for the bias field: (6, H * W).
        self._monomials = (
            np.stack(np.broadcast_arrays(np.ones_like(yy * xx), yy, xx, yy * yy, xx * xx, yy * xx))
            .reshape(6, h * w)
            .astype(np.float32)
        )

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

    def case_stream(self, index: int | torch.Tensor) -> tuple[int, np.random.Generator]:
        """The non-negative index of case ``index`` (negative counts from the end) and its seeded random stream.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        index = int(index.item()) if isinstance(index, torch.Tensor) else int(index)
        if not -self.num_cases <= index < self.num_cases:
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {self.num_cases} cases")
        if index < 0:
            index += self.num_cases
        return index, np.random.default_rng((self.seed, self.split_id, index))

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
        index, rng = self.case_stream(index)

        # Order matters for reproducibility across options: anatomy first, then annotators,
        # then the image, so the masks do not depend on channels / noise / bias / texture.
        instances, densities = self._draw_shapes(rng)
        mask = instances > 0
        masks = self._draw_annotators(rng, instances) if self.num_annotators > 1 else mask[None]
        image = self._draw_image(rng, instances, densities)

        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "masks": torch.from_numpy(masks.astype(np.float32)),
            "label": torch.from_numpy(np.array(int(mask.any()), dtype=np.int64)),
            "instances": torch.from_numpy(instances),
            "case": self.case_name(index),
            "index": torch.from_numpy(np.array(index, dtype=np.int64)),
        }

    # ------------------------------------------------------------------ shapes
    def _rasterize(self, rng: np.random.Generator) -> tuple[tuple[slice, slice], np.ndarray]:
        """Draws one ellipse or blob and rasterizes it in its bounding box.

        Args:
            rng: The case's random stream.

        Returns:
            ``((rows, cols), crop)``: the bounding-box slices into the ``(H, W)`` image and
            the boolean shape inside them (not yet reduced to one component).
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
            amps *= rng.uniform(0.2, 0.55) / (amps.sum() + 1e-12)
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
            r_theta = radius * (
                1.0 + (amps[:, None, None] * np.cos(k * theta + phases[:, None, None])).sum(0)
            )
            crop = dy * dy + dx * dx <= r_theta * r_theta
        return (slice(y0, y1), slice(x0, x1)), crop

    def _draw_shapes(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Places ``0..max_shapes`` shapes that neither overlap nor touch.

        A drawn shape is rejected if it comes within ``_GAP`` px (Chebyshev) of a placed
        one or is smaller than ``min_area`` once clipped; up to 30 draws per shape.

        Args:
            rng: The case's random stream.

        Returns:
            ``(instances, densities)``: int64 ``(H, W)`` with ids ``1..N`` in placement order,
            and float32 ``(N + 1,)``, a lookup table of intensity factors (``0`` for the
            background, ``U(0.7, 1.3)`` per shape).
        """
        h, w = self.size
        instances = np.zeros((h, w), dtype=np.int64)
        if rng.random() < self.empty_fraction:
            return instances, np.zeros(1, dtype=np.float32)
        target = int(rng.integers(1, self.max_shapes + 1))
        occupied = np.zeros((h, w), dtype=bool)  # placed shapes dilated by _GAP
        n = 0
        for _ in range(target):
            for _ in range(_TRIES_PER_SHAPE):
                (rows, cols), crop = self._rasterize(rng)
                if (crop & occupied[rows, cols]).any():
                    continue
                labels, pieces = ndimage.label(crop, structure=_STRUCT4)
                if pieces > 1:  # keep the largest 4-connected piece
                    counts = np.bincount(labels.ravel())
                    counts[0] = 0
                    crop = labels == counts.argmax()
                if crop.sum() < self.min_area:
                    continue
                n += 1
                instances[rows, cols][crop] = n
                occupied |= _dilate(instances == n, _GAP)
                break
        if n == 0:  # not seen in practice; keeps "non-empty" exact whatever the options
            yy, xx = np.ogrid[:h, :w]
            rad = max(1.5, self.min_radius)
            instances[(yy - (h - 1) / 2.0) ** 2 + (xx - (w - 1) / 2.0) ** 2 <= rad * rad] = 1
            n = 1
        densities = np.concatenate([[0.0], rng.uniform(0.7, 1.3, n)]).astype(np.float32)
        return instances, densities

    # -------------------------------------------------------------- annotators
    def _draw_annotators(self, rng: np.random.Generator, instances: np.ndarray) -> np.ndarray:
        """Perturbs the reference boundary once per annotator (level set of a shifted SDF).

        Annotator ``a`` draws ``sdf + amp * clip(style_a + jitter_a + 0.35 field_a, -1, 1) > 0``:
        ``sdf`` is the reference's signed distance (+ inside, boundary pixels at +-0.5),
        ``style_a`` runs from -0.5 (annotator 0, erodes) to +0.5 (annotator A-1, dilates),
        ``jitter_a ~ U(-0.15, 0.15)`` per case and ``field_a`` a smooth unit random field
        (elastic boundary jitter). ``amp`` is the boundary uncertainty of the nearest shape,
        ``clip(0.2 r, 1.25, max_shift)`` px for a shape of equivalent radius ``r``, so small
        shapes are not wiped out and large ones vary by up to ``max_shift`` px.

        Args:
            rng: The case's random stream.
            instances: int64 ``(H, W)`` instance map of the reference.

        Returns:
            bool ``(A, H, W)``; differs from the reference only where ``|sdf| < max_shift``,
            i.e. within ``max_shift + 0.5`` px of its boundary, and no two annotators are
            identical (see the tie-break below). All empty when the reference is empty (no
            stream consumed).
        """
        a = self.num_annotators
        h, w = self.size
        mask = instances > 0
        if not mask.any():
            return np.zeros((a, h, w), dtype=bool)
        m = self.max_shift
        noise = rng.standard_normal((a, self._jit_h.shape[1], self._jit_w.shape[1]), dtype=np.float32)
        field = unit_std(smooth_field(self._jit_h, noise, self._jit_w))
        unit = self.annotator_styles[:, None, None] + rng.uniform(-0.15, 0.15, (a, 1, 1)) + 0.35 * field
        np.clip(unit, -1.0, 1.0, out=unit)
        # Signed distance and nearest shape on the mask's bounding box grown by ceil(m) + 2
        # px: every pixel that can change lies inside it.
        pad = int(math.ceil(m)) + 2
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        ys = slice(max(0, rows[0] - pad), min(h, rows[-1] + pad + 1))
        xs = slice(max(0, cols[0] - pad), min(w, cols[-1] + pad + 1))
        crop, inst = mask[ys, xs], instances[ys, xs]
        dist_out, (iy, ix) = ndimage.distance_transform_edt(~crop, return_indices=True)
        sdf = np.full((h, w), -np.inf)
        sdf[ys, xs] = np.where(crop, ndimage.distance_transform_edt(crop) - 0.5, 0.5 - dist_out)
        radius = np.sqrt(np.bincount(inst.ravel()) / math.pi)
        amp_of_id = np.clip(0.2 * radius, 1.25, m)
        amp = np.zeros((h, w))
        amp[ys, xs] = amp_of_id[inst[iy, ix]]
        level = sdf[None] + amp * unit
        masks = level > 0.0
        # Distinct annotators (tie-break): on a small shape two level sets can fall between
        # the same lattice distances and coincide. Then the later annotator flips the pixel
        # of the boundary rings (|sdf| = 0.5) where it was least sure (smallest |level|),
        # skipping pixels whose flip would make it equal to another earlier annotator.
        ring = np.flatnonzero(np.abs(sdf.ravel()) < 0.75)
        for i in range(1, a):
            diffs = masks[:i] != masks[i]  # (i, H, W)
            counts = diffs.sum(axis=(1, 2))
            if counts.min() > 0:
                continue
            taken = diffs[counts == 1].any(axis=0).ravel()  # flips that would copy another one
            order = ring[np.argsort(np.abs(level[i].ravel()[ring]), kind="stable")]
            free = order[~taken[order]]
            if free.size:  # always, unless a shape of a few pixels has more annotators than ring pixels
                flat = masks[i].reshape(-1)
                flat[free[0]] = not flat[free[0]]
        return masks

    # ------------------------------------------------------------------- image
    def _draw_image(
        self, rng: np.random.Generator, instances: np.ndarray, densities: np.ndarray
    ) -> np.ndarray:
        """Renders the multi-channel image of the anatomy.

        Args:
            rng: The case's random stream.
            instances: int64 ``(H, W)`` instance map.
            densities: float32 ``(N + 1,)`` intensity factor per instance id.

        Returns:
            float32 ``(C, H, W)``, each channel z-scored.
        """
        h, w = self.size
        c = self.channels
        # Texture: smooth random fields, half of the variance shared by the channels.
        k = c + 1 if c > 1 else 1
        fields = rng.standard_normal((k, self._tex_h.shape[1], self._tex_w.shape[1]), dtype=np.float32)
        fields = unit_std(smooth_field(self._tex_h, fields, self._tex_w))
        tex = (fields[:1] + fields[1:]) * np.float32(math.sqrt(0.5)) if c > 1 else fields

        # Lesion maps (per-shape density; a rim / core map for channel 3), partial-volume blur.
        density = densities[instances]
        contrast = np.empty((min(c, 3), 1, 1), dtype=np.float32)
        contrast[0] = rng.uniform(0.4, 1.2)
        if c >= 3:
            contrast[1] = -rng.uniform(0.3, 1.0)
            contrast[2] = rng.uniform(0.1, 0.4)
        if c == 4:
            mask = instances > 0
            rim = mask & _dilate(~mask, _RIM_WIDTH)
            rim_map = density * np.where(rim, rng.uniform(0.5, 1.2), -rng.uniform(0.1, 0.4) * mask)
            maps = blur_small(np.stack([density, rim_map.astype(np.float32)]), PARTIAL_VOLUME_SIGMA)
            lesion, rim_map = maps[0], maps[1]
        else:
            lesion = blur_small(density, PARTIAL_VOLUME_SIGMA)

        image = 1.0 + self.texture * tex
        image[: contrast.shape[0]] += contrast * lesion
        if c == 4:
            image[3] += rim_map

        coeffs = rng.uniform(-1.0, 1.0, (c, self._monomials.shape[0])).astype(np.float32)
        poly = coeffs @ self._monomials  # (C, H * W)
        poly /= np.abs(poly).max(axis=1, keepdims=True) + 1e-6
        poly = poly.reshape(c, h, w)
        image *= np.exp(self.bias_field * poly)
        image += self.noise_std * rng.standard_normal((c, h, w), dtype=np.float32)
        return unit_std(image).astype(np.float32, copy=False)
