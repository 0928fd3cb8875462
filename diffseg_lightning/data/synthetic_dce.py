"""Synthetic DCE-MRI: a pre-contrast image and post-contrast phases that follow a kinetic curve.

The test bed of the Diffusion Kinetic Model (Lv et al., "Diffusion Kinetic Model for Breast Cancer
Segmentation in Incomplete DCE-MRI", MICCAI 2023): the lesion is barely visible before contrast and
stands out after it, because its enhancement washes in fast and washes out (the malignant "type III"
curve of breast DCE-MRI), while normal tissue enhances slowly and persistently ("type I").

Generative model (all sizes scale with the image side; ``t`` in minutes after injection):

* **Anatomy** is drawn exactly as in :class:`~diffseg_lightning.data.synthetic.SyntheticSegmentation`
  (same shape sampler, reused): ``0..max_shapes`` non-touching ellipses / blobs, each with a density
  factor ``d in [0.7, 1.3]``, and empty cases with probability ``empty_fraction``.
* **Enhancement curve**: the gamma variate (Thompson, Starmer, Whalen & McIntosh, "Indicator transit
  time considered as a gamma variate", Circ. Res. 14:502-515, 1964), written with its peak time and
  peak value (Madsen, Phys. Med. Biol. 37:1597, 1992)::

      g(t; A, t_p, alpha) = A * (t / t_p)^alpha * exp(alpha * (1 - t / t_p))   for t > 0, else 0

  It rises from 0, peaks at ``t = t_p`` with value ``A`` and decays after it; ``alpha`` sets how sharp
  the bolus is (:func:`gamma_variate`, pinned in ``tests/test_dkm.py``). Per case:

  ==============  ======================  ===================  ===============
  tissue          amplitude ``A``         peak ``t_p`` (min)   ``alpha``
  ==============  ======================  ===================  ===============
  lesion          ``U(0.8, 1.6) * d``     ``U(1.0, 2.0)``      ``U(1.5, 3.0)``
  normal tissue   ``U(0.2, 0.5) * h(x)``  ``U(6.0, 12.0)``     ``U(1.0, 2.0)``
  ==============  ======================  ===================  ===============

  With the default phase times ``(1.5, 3.0, 4.5)`` min the lesion has peaked by the first or second
  phase and washes out by the last, while normal tissue, peaking well after the series ends, keeps
  rising (persistent). ``h(x) = max(0, 1 + 0.5 T_2(x))`` is a smooth unit random field ``T_2``
  (heterogeneous background parenchymal enhancement).
* **Images**: with ``T`` the tissue texture (smooth unit random field), ``L`` the partial-volume lesion
  map (the shapes blurred with sigma 0.6 px) and ``B = exp(bias_field * P)`` a quadratic bias field::

      base   = 1 + texture * T + k_pre * d * L        k_pre ~ U(pre_contrast)   (faint before contrast)
      pre    = base * B + noise_std * N_0
      post_k = (base + E(t_k)) * B + noise_std * N_k  E = g_lesion(t) L + g_normal(t) (1 - L)

* **Scale**: every phase is mapped with the pre-contrast image's mean and standard deviation
  (``(x - mean(pre)) / std(pre)``), so the pre-contrast image is z-scored and the post-contrast phases
  keep their enhancement relative to it (what a radiologist's subtraction image shows).

An item carries ``image`` = the pre-contrast image (1, H, W) (``phases="pre"``: what DKM sees at
inference) or all phases (1 + K, H, W) (``phases="all"``: the full-series upper bound), and always
``post`` (K, H, W), the post-contrast phases (the target of DKM's diffusion module), plus the keys of
:class:`SyntheticSegmentation` (``mask``, ``masks``, ``label``, ``instances``, ``case``, ``index``).
``SegmentationDataModule(normalize="zscore")`` z-scores ``image`` per channel again in its collate
(a no-op for the pre-contrast image; each phase on its own for ``phases="all"``), and leaves
``post`` as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffseg_lightning.data.synthetic import (
    PARTIAL_VOLUME_SIGMA,
    SyntheticSegmentation,
    blur_small,
    check_float,
    smooth_field,
    unit_std,
)
from diffseg_lightning.exceptions import ConfigError

__all__ = ["PHASES", "SyntheticDCE", "gamma_variate"]

#: Valid values of the ``phases`` option: which phases form ``image``.
PHASES: tuple[str, ...] = ("pre", "all")

# (low, high) of the uniform draws of the table in the module docstring
_LESION = {"amplitude": (0.8, 1.6), "t_peak": (1.0, 2.0), "alpha": (1.5, 3.0)}
_NORMAL = {"amplitude": (0.2, 0.5), "t_peak": (6.0, 12.0), "alpha": (1.0, 2.0)}


def gamma_variate(t: Any, amplitude: Any, t_peak: Any, alpha: Any) -> np.ndarray:
    """The gamma-variate bolus curve ``A (t / t_p)^alpha exp(alpha (1 - t / t_p))``, 0 for ``t <= 0``.

    Thompson et al., Circ. Res. 14:502 (1964), in the peak-time / peak-value form of Madsen, Phys. Med.
    Biol. 37:1597 (1992): ``g(t_p) = A`` is the maximum, ``g' > 0`` before ``t_p`` and ``< 0`` after.
    Up to the factor it is the gamma density of shape ``alpha + 1`` and scale ``t_p / alpha``.

    Args:
        t: times (any shape, broadcast with the others), in the unit of ``t_peak``.
        amplitude: peak value ``A`` (>= 0).
        t_peak: time of the peak ``t_p`` (> 0).
        alpha: sharpness ``alpha`` (> 0).

    Returns:
        float64 array of the broadcast shape.

    Raises:
        ValueError: if a ``t_peak`` or ``alpha`` is not positive, or an ``amplitude`` is negative.
    """
    t, amplitude, t_peak, alpha = (np.asarray(v, dtype=np.float64) for v in (t, amplitude, t_peak, alpha))
    if np.any(t_peak <= 0) or np.any(alpha <= 0) or np.any(amplitude < 0):
        raise ConfigError(
            f"gamma_variate needs t_peak > 0, alpha > 0 and amplitude >= 0; got t_peak={t_peak}, "
            f"alpha={alpha}, amplitude={amplitude}"
        )
    r = np.maximum(t, 0.0) / t_peak
    with np.errstate(divide="ignore"):
        log_g = alpha * (np.log(r) + 1.0 - r)  # -inf at r = 0 gives exp(-inf) = 0
    return np.where(t > 0, amplitude * np.exp(log_g), 0.0)


def _check_phase_times(times: Any) -> tuple[float, ...]:
    if isinstance(times, str) or not isinstance(times, Sequence) or len(times) < 1:
        raise ConfigError(f"SyntheticDCE: phase_times must be a non-empty list of minutes, got {times!r}")
    out = tuple(check_float("phase_times", v, 1e-6) for v in times)
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ConfigError(f"SyntheticDCE: phase_times must increase strictly, got {list(out)}")
    return out


def _check_range(name: str, value: Any) -> tuple[float, float]:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise ConfigError(f"SyntheticDCE: {name} must be a pair [low, high], got {value!r}")
    low, high = (check_float(name, v, 0.0) for v in value)
    if high < low:
        raise ConfigError(f"SyntheticDCE: {name} must have low <= high, got {list(value)}")
    return low, high


class SyntheticDCE(SyntheticSegmentation):
    """Seeded synthetic DCE-MRI lesions: pre-contrast image, K post-contrast phases, lesion mask.

    A test bed for the Diffusion Kinetic Model (Lv et al., MICCAI 2023); the generative model (gamma-variate
    kinetics, fast wash-in and wash-out in the lesion, slow persistent enhancement elsewhere) is in the
    module docstring. Case ``i`` of a split is drawn from ``np.random.default_rng((seed, split_id, i))``
    (deterministic in any order, process or worker), with the anatomy drawn first by the shape sampler of
    :class:`SyntheticSegmentation`.

    Args:
        num_cases: number of cases, >= 1.
        size: image size, an int (square) or ``(H, W)``; each side >= 8.
        phases: ``"pre"`` (``image`` is the pre-contrast image, 1 channel) or ``"all"`` (pre-contrast then
            the K post-contrast phases, 1 + K channels).
        phase_times: acquisition times of the post-contrast phases in minutes after injection, strictly
            increasing; K = their number.
        pre_contrast: ``(low, high)`` of the lesion's contrast before injection, ``k_pre``.
        num_phases: K, checked against ``len(phase_times)`` when given (the configs pass it to the model).
        max_shapes: largest number of lesions in a non-empty case.
        empty_fraction: probability of a case without lesion.
        noise_std: std of the additive noise of every phase (units of the background intensity).
        bias_field: strength of the multiplicative bias field (shared by the phases: same coil).
        texture: std of the tissue texture.
        seed: base seed.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``.

    Raises:
        ValueError: an invalid option; the message names it.

    Example:
        >>> ds = SyntheticDCE(num_cases=4, size=32, phases="all")
        >>> ds[0]["image"].shape, ds[0]["post"].shape, ds[0]["mask"].shape
        (torch.Size([4, 32, 32]), torch.Size([3, 32, 32]), torch.Size([1, 32, 32]))
    """

    def __init__(
        self,
        num_cases: int = 512,
        size: int | tuple[int, int] = 64,
        phases: str = "pre",
        phase_times: Sequence[float] = (1.5, 3.0, 4.5),
        pre_contrast: Sequence[float] = (0.05, 0.25),
        num_phases: int | None = None,
        max_shapes: int = 3,
        empty_fraction: float = 0.1,
        noise_std: float = 0.1,
        bias_field: float = 0.3,
        texture: float = 0.3,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        super().__init__(
            num_cases=num_cases,
            size=size,
            channels=1,
            num_annotators=1,
            max_shapes=max_shapes,
            empty_fraction=empty_fraction,
            noise_std=noise_std,
            bias_field=bias_field,
            texture=texture,
            seed=seed,
            split=split,
        )
        if phases not in PHASES:
            raise ConfigError(f"SyntheticDCE: phases must be one of {PHASES}, got {phases!r}")
        self.phases = phases
        self.phase_times = _check_phase_times(phase_times)
        self.pre_contrast = _check_range("pre_contrast", pre_contrast)
        self.num_phases = len(self.phase_times)
        if num_phases is not None and num_phases != self.num_phases:
            raise ConfigError(
                f"SyntheticDCE: num_phases={num_phases} but phase_times has {self.num_phases} entries "
                f"{list(self.phase_times)}"
            )
        self.channels = 1 if phases == "pre" else 1 + self.num_phases

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_cases={self.num_cases}, size={self.size}, phases={self.phases!r}, "
            f"phase_times={list(self.phase_times)}, pre_contrast={list(self.pre_contrast)}, "
            f"max_shapes={self.max_shapes}, empty_fraction={self.empty_fraction}, noise_std={self.noise_std}, "
            f"bias_field={self.bias_field}, texture={self.texture}, seed={self.seed}, split={self.split!r})"
        )

    def case_name(self, index: int) -> str:
        """The case identifier, e.g. ``"dce-train-00017"``."""
        return f"dce-{self.split}-{index:05d}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Case ``index``: the keys of :class:`SyntheticSegmentation` plus ``post`` (K, H, W) float32.

        ``image`` is (1, H, W) (``phases="pre"``) or (1 + K, H, W) (``phases="all"``), float32, in the
        pre-contrast image's z-score scale (see the module docstring).
        """
        index, rng = self.case_stream(index)
        instances, densities = self._draw_shapes(rng)
        mask = instances > 0
        series = self._draw_series(rng, instances, densities)  # (1 + K, H, W)
        image = series if self.phases == "all" else series[:1]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "post": torch.from_numpy(np.ascontiguousarray(series[1:])),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "masks": torch.from_numpy(mask[None].astype(np.float32)),
            "label": torch.from_numpy(np.array(int(mask.any()), dtype=np.int64)),
            "instances": torch.from_numpy(instances),
            "case": self.case_name(index),
            "index": torch.from_numpy(np.array(index, dtype=np.int64)),
        }

    def kinetics(self, rng: np.random.Generator) -> dict[str, dict[str, float]]:
        """Draws the per-case kinetic parameters of the lesion and of normal tissue (module docstring)."""
        return {
            tissue: {name: float(rng.uniform(*bounds)) for name, bounds in table.items()}
            for tissue, table in (("lesion", _LESION), ("normal", _NORMAL))
        }

    def _draw_series(
        self, rng: np.random.Generator, instances: np.ndarray, densities: np.ndarray
    ) -> np.ndarray:
        """Renders the pre-contrast image and the K post-contrast phases, float32 (1 + K, H, W)."""
        h, w = self.size
        k = self.num_phases
        kin = self.kinetics(rng)
        k_pre = rng.uniform(*self.pre_contrast)
        fields = rng.standard_normal((2, self._tex_h.shape[1], self._tex_w.shape[1]), dtype=np.float32)
        tissue, parenchyma = unit_std(smooth_field(self._tex_h, fields, self._tex_w))
        density = densities[instances]
        # partial volume: the density-weighted map (pre-contrast contrast, lesion amplitude) and the
        # lesion fraction L in [0, 1] (which curve a pixel follows)
        blurred = blur_small(np.stack([density, (instances > 0).astype(np.float32)]), PARTIAL_VOLUME_SIGMA)
        lesion_density, fraction = blurred[0], np.clip(blurred[1], 0.0, 1.0)

        times = np.asarray(self.phase_times)
        g_lesion = gamma_variate(
            times, kin["lesion"]["amplitude"], kin["lesion"]["t_peak"], kin["lesion"]["alpha"]
        )
        g_normal = gamma_variate(
            times, kin["normal"]["amplitude"], kin["normal"]["t_peak"], kin["normal"]["alpha"]
        )
        hetero = np.maximum(0.0, 1.0 + 0.5 * parenchyma)
        enhancement = (
            g_lesion[:, None, None] * lesion_density[None]
            + g_normal[:, None, None] * (hetero * (1.0 - fraction))[None]
        ).astype(np.float32)  # (K, H, W)

        base = 1.0 + self.texture * tissue + np.float32(k_pre) * lesion_density
        series = np.concatenate([base[None], base[None] + enhancement])  # (1 + K, H, W)
        coeffs = rng.uniform(-1.0, 1.0, self._monomials.shape[0]).astype(np.float32)
        poly = coeffs @ self._monomials
        poly = (poly / (np.abs(poly).max() + 1e-6)).reshape(h, w)
        series *= np.exp(self.bias_field * poly)[None]
        series += self.noise_std * rng.standard_normal((1 + k, h, w), dtype=np.float32)
        mean, std = float(series[0].mean()), float(series[0].std())
        return ((series - mean) / (std + 1e-6)).astype(np.float32)
