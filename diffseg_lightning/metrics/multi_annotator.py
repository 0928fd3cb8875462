"""Metrics of a set of sampled masks against a set of annotators' masks, per case.

Every function here is batched over cases ``B``, samples ``S`` and annotators ``A`` with torch (the
pixel-level work is one ``einsum``); the only Python loop is the one over cases around
``scipy.optimize.linear_sum_assignment`` in :func:`hungarian_matched_iou`. Every function returns a
per-case float32 tensor on the inputs' device; aggregate with a nan-mean.

Inputs are binary masks: ``bool`` tensors, or integer / floating tensors holding only 0 and 1 (anything
else raises ``ValueError``). The spatial part may be ``(H, W)`` or any trailing shape (e.g. ``(D, H, W)``).

Empty-mask policy (tested in ``tests/test_multi_annotator.py``), the LIDC convention of the Probabilistic
U-Net and PHiSeg evaluation code:

- Two empty masks have IoU 1, so their distance ``d = 1 - IoU`` is 0; an empty mask against a non-empty
  one has IoU 0 (``d = 1``). This enters the GED, HM-IoU and sample diversity alike, so a method that
  correctly predicts "no lesion" where every annotator drew none scores GED 0 and HM-IoU 1.
- Soft Dice: at a threshold where both the binarised probability and the binarised annotator mean are
  empty, the Dice is 1 (``both_empty="one"``, default) or that threshold is left out of the average
  (``both_empty="skip"``; NaN when every threshold is left out).
- Sample diversity: NaN for ``S = 1`` (no pair of distinct samples).

References:
    Kohl et al., "A Probabilistic U-Net for Segmentation of Ambiguous Images", NeurIPS 2018 (GED with
    ``d = 1 - IoU``). Baumgartner et al., "PHiSeg: Capturing Uncertainty in Medical Image
    Segmentation", MICCAI 2019 (the LIDC GED code and the empty-mask convention). Kohl et al., "A
    Hierarchical Probabilistic U-Net for Modeling Multi-Scale Ambiguities", arXiv:1905.13077, 2019
    (Hungarian-matched IoU). Menze et al., QUBIQ challenge, MICCAI 2020/2021 (thresholded soft Dice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from diffseg_lightning.exceptions import ConfigError

__all__ = [
    "generalized_energy_distance",
    "ged_by_sample_count",
    "hungarian_matched_iou",
    "iou_distance_matrix",
    "sample_diversity",
    "soft_dice",
]

QUBIQ_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _binary(mask: torch.Tensor, name: str, ndim: int = 4) -> torch.Tensor:
    """Check that ``mask`` is a binary ``(B, N, *spatial)`` tensor and return it as bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.ndim < ndim:
        raise ConfigError(
            f"{name} must have at least {ndim} dims (B, N, H, W), got shape {tuple(mask.shape)}"
        )
    if mask.shape[1] == 0:
        raise ConfigError(f"{name} must hold at least one mask per case, got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
        raise ConfigError(f"{name} must be a binary mask (bool or values in {{0, 1}}); got other values")
    return mask != 0


def _check_pair(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ConfigError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must agree in the batch and spatial dims"
        )


def _count_dtype(num_pixels: int) -> torch.dtype:
    """float32 counts are exact below 2**24 pixels per mask; use float64 beyond that."""
    return torch.float32 if num_pixels < 2**24 else torch.float64


def _iou_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - IoU`` between every mask of ``a`` (B, N, P) and of ``b`` (B, M, P), bool; (B, N, M) float64."""
    dtype = _count_dtype(a.shape[-1])
    af, bf = a.to(dtype), b.to(dtype)
    inter = torch.einsum("bnp,bmp->bnm", af, bf).double()
    union = af.sum(-1).double()[:, :, None] + bf.sum(-1).double()[:, None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(inter))  # both empty -> IoU 1
    return 1.0 - iou


def iou_distance_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise distance ``d = 1 - IoU`` between two sets of binary masks, per case.

    Two empty masks have distance 0 (IoU 1), the convention of the LIDC evaluation of the Probabilistic
    U-Net (Kohl et al., NeurIPS 2018) and PHiSeg (Baumgartner et al., MICCAI 2019); an empty mask and a
    non-empty one have distance 1.

    Args:
        a: (B, N, H, W) binary masks (bool or {0, 1}).
        b: (B, M, H, W) binary masks, same B and spatial shape.

    Returns:
        (B, N, M) float32, ``out[k, i, j] = 1 - IoU(a[k, i], b[k, j])`` in [0, 1].
    """
    a, b = _binary(a, "a"), _binary(b, "b")
    _check_pair(a, b, "a", "b")
    return _iou_distance(a.flatten(2), b.flatten(2)).float()


def _flat_pair(samples: torch.Tensor, annotators: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated bool (B, S, P) samples and (B, A, P) annotators."""
    s, y = _binary(samples, "samples"), _binary(annotators, "annotators")
    _check_pair(s, y, "samples", "annotators")
    return s.flatten(2), y.flatten(2)


def _distance_matrices(
    samples: torch.Tensor, annotators: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated (B,S,A), (B,S,S), (B,A,A) float64 distance matrices ``d_SY, d_SS, d_YY``."""
    s, y = _flat_pair(samples, annotators)
    return _iou_distance(s, y), _iou_distance(s, s), _iou_distance(y, y)


def _ged(d_sy: torch.Tensor, d_ss: torch.Tensor, d_yy: torch.Tensor) -> torch.Tensor:
    # Means over all ordered pairs, diagonal (d = 0) included: the V-statistic of PHiSeg's
    # utils.generalised_energy_distance and the Probabilistic U-Net's calc_energy_distances.
    return 2.0 * d_sy.mean((1, 2)) - d_ss.mean((1, 2)) - d_yy.mean((1, 2))


def generalized_energy_distance(samples: torch.Tensor, annotators: torch.Tensor) -> torch.Tensor:
    """Squared generalized energy distance (GED) between sampled masks and annotators' masks, per case.

    ``D^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]`` with ``d = 1 - IoU`` (two empty masks: d = 0), the
    quantity the LIDC-IDRI leaderboards report as "GED" (Kohl et al., NeurIPS 2018, eq. 4; Baumgartner et
    al., MICCAI 2019).

    Expectations over pairs: each expectation is the plain mean over **all** ordered pairs, the diagonal
    ``i = j`` (where ``d = 0``) included::

        D^2 = 2/(S*A) sum_ij d(s_i, y_j) - 1/S^2 sum_ij d(s_i, s_j) - 1/A^2 sum_ij d(y_i, y_j)

    This is what the released evaluation code does: PHiSeg's ``utils.generalised_energy_distance``
    divides the double sums over ``i, j in range(N)`` by ``N**2``, and the Probabilistic U-Net's
    ``evaluation/eval_cityscapes.py::calc_energy_distances`` takes ``np.mean`` over the full ``SS`` and
    ``YY`` matrices. It is the V-statistic of the energy distance, defined for ``S = 1`` and ``A = 1``
    (the self term is then 0); the U-statistic (diagonal excluded) would give larger self terms and a
    smaller GED, so numbers from the two are not comparable.

    Args:
        samples: (B, S, H, W) binary sampled masks.
        annotators: (B, A, H, W) binary annotator masks, same B and spatial shape.

    Returns:
        (B,) float32 squared GED; 0 when the two sets are identical multisets.
    """
    return _ged(*_distance_matrices(samples, annotators)).float()


def ged_by_sample_count(
    samples: torch.Tensor, annotators: torch.Tensor, counts: Sequence[int] = (1, 4, 16)
) -> dict[int, torch.Tensor]:
    """GED from the first ``n`` samples of one sample set, for each ``n`` in ``counts``.

    The distance matrices are computed once for all ``S`` samples and sliced to the first ``n`` (as the
    Probabilistic U-Net's ``calc_energy_distances(num_samples=n)`` does), so the numbers for different
    ``n`` come from nested subsets of the same draws. Equal to
    ``generalized_energy_distance(samples[:, :n], annotators)``.

    Args:
        samples: (B, S, H, W) binary sampled masks.
        annotators: (B, A, H, W) binary annotator masks.
        counts: sample counts ``n >= 1``; counts above ``S`` are left out of the result.

    Returns:
        ``{n: (B,) float32 GED}`` for each ``n <= S`` in ``counts``, in the order given.

    Raises:
        ValueError: if a count is not a positive integer.
    """
    for n in counts:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ConfigError(f"counts must be positive integers, got {list(counts)}")
    d_sy, d_ss, d_yy = _distance_matrices(samples, annotators)
    num_samples = d_ss.shape[1]
    return {
        int(n): _ged(d_sy[:, :n], d_ss[:, :n, :n], d_yy).float()
        for n in dict.fromkeys(counts)
        if n <= num_samples
    }


def hungarian_matched_iou(samples: torch.Tensor, annotators: torch.Tensor) -> torch.Tensor:
    """Hungarian-matched IoU (HM-IoU) between sampled masks and annotators' masks, per case.

    Kohl et al., "A Hierarchical Probabilistic U-Net for Modeling Multi-Scale Ambiguities" (2019): the
    annotator set is replicated to the size of the sample set, samples and annotators are matched
    one-to-one by the Hungarian algorithm with cost ``1 - IoU``, and the score is the mean IoU of the
    matched pairs (higher is better). Two empty masks have IoU 1.

    Tiling: the annotators are tiled cyclically to ``S`` entries, entry ``k`` being annotator
    ``k mod A``. When ``S`` is a multiple of ``A`` every annotator appears ``S / A`` times (LIDC: 16
    samples, 4 annotators, each 4 times). Otherwise the first ``S mod A`` annotators appear once more
    than the others (e.g. ``S = 5, A = 4``: annotators 0, 1, 2, 3, 0), and for ``S < A`` only the first
    ``S`` annotators take part. Choose ``S`` as a multiple of ``A`` to weigh all annotators equally.

    Args:
        samples: (B, S, H, W) binary sampled masks.
        annotators: (B, A, H, W) binary annotator masks.

    Returns:
        (B,) float32 mean matched IoU in [0, 1].
    """
    d_sy = _iou_distance(*_flat_pair(samples, annotators))  # (B, S, A)
    num_samples, num_annot = d_sy.shape[1], d_sy.shape[2]
    tiled = torch.arange(num_samples, device=d_sy.device) % num_annot
    cost = d_sy[:, :, tiled].cpu().numpy()  # (B, S, S): rows samples, columns tiled annotators
    matched = np.empty(cost.shape[0], dtype=np.float64)
    # scipy's linear_sum_assignment has no batched form, so loop over the cases (B small S x S problems).
    for k in range(cost.shape[0]):
        rows, cols = linear_sum_assignment(cost[k])
        matched[k] = 1.0 - cost[k][rows, cols].mean()
    return torch.from_numpy(matched).to(device=samples.device, dtype=torch.float32)


def soft_dice(
    probability: torch.Tensor,
    annotators: torch.Tensor,
    thresholds: Sequence[float] = QUBIQ_THRESHOLDS,
    both_empty: Literal["one", "skip"] = "one",
) -> torch.Tensor:
    """QUBIQ-style soft Dice of a probability map against the annotators' mean, per case.

    For each threshold ``tau``: ``Dice(probability > tau, mean_a(annotators) > tau)``, then the mean over
    the thresholds (QUBIQ challenge, MICCAI 2020/2021: thresholds 0.1, 0.2, ..., 0.9). Both maps are
    binarised with a strict ``>``; the annotator mean is ``(number of annotators marking the pixel) / A``
    computed in the probability's dtype with ``tau`` cast to it, so ``3/10 > 0.3`` is False as intended.

    Empty masks: at a threshold where both binarised maps are empty, the Dice is 1 (``both_empty="one"``,
    the convention that two empty masks agree, as for the IoU above) or the threshold is left out of the
    mean (``"skip"``; the case is NaN when every threshold is left out). One empty and one non-empty map
    give Dice 0.

    Args:
        probability: (B, H, W) foreground probability in [0, 1] (floating).
        annotators: (B, A, H, W) binary annotator masks.
        thresholds: the thresholds ``tau`` (each in [0, 1)).
        both_empty: ``"one"`` or ``"skip"``, see above.

    Returns:
        (B,) float32 mean Dice over the thresholds.

    Raises:
        ValueError: on a non-floating or out-of-range probability, mismatched shapes, an empty or
            out-of-range ``thresholds``, or an unknown ``both_empty``.
    """
    if both_empty not in ("one", "skip"):
        raise ConfigError(f"both_empty must be 'one' or 'skip', got {both_empty!r}")
    if not isinstance(probability, torch.Tensor) or not probability.is_floating_point():
        raise ConfigError(
            "probability must be a floating torch.Tensor of shape (B, H, W) with values in [0, 1]"
        )
    y = _binary(annotators, "annotators")
    if (
        probability.ndim != y.ndim - 1
        or probability.shape[0] != y.shape[0]
        or probability.shape[1:] != y.shape[2:]
    ):
        raise ConfigError(
            f"probability {tuple(probability.shape)} must be (B, H, W) matching annotators {tuple(y.shape)}"
        )
    if not ((probability >= 0) & (probability <= 1)).all():
        raise ConfigError("probability must lie in [0, 1] (apply a sigmoid to logits first)")
    taus = [float(t) for t in thresholds]
    if not taus or not all(0.0 <= t < 1.0 for t in taus):
        raise ConfigError(
            f"thresholds must be a non-empty sequence of values in [0, 1), got {list(thresholds)}"
        )

    dtype = probability.dtype
    p = probability.flatten(1)  # (B, P)
    mean = y.flatten(2).to(dtype).sum(1) / y.shape[1]  # (B, P), count / A
    tau = torch.tensor(taus, dtype=dtype, device=p.device)[None, :, None]  # (1, T, 1)
    pred = p[:, None, :] > tau  # (B, T, P)
    ref = mean[:, None, :] > tau
    count = torch.float64
    inter = (pred & ref).sum(-1, dtype=torch.int64).to(count)
    total = (pred.sum(-1, dtype=torch.int64) + ref.sum(-1, dtype=torch.int64)).to(count)
    empty_value = 1.0 if both_empty == "one" else float("nan")
    dice = torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), torch.full_like(total, empty_value))
    return dice.nanmean(1).float()


def sample_diversity(samples: torch.Tensor) -> torch.Tensor:
    """Mean pairwise distance ``d = 1 - IoU`` over the distinct pairs of samples, per case.

    ``2 / (S (S - 1)) * sum_{i < j} d(s_i, s_j)`` (two empty masks: d = 0): the spread of the sample
    set, the U-statistic form of the GED's ``E[d(S, S')]`` (which, with the diagonal included, equals
    ``(S - 1) / S`` times this). 0 when all samples are equal; NaN when ``S = 1``.

    Args:
        samples: (B, S, H, W) binary sampled masks.

    Returns:
        (B,) float32 mean pairwise distance in [0, 1], NaN for ``S = 1``.
    """
    s = _binary(samples, "samples").flatten(2)
    num_samples = s.shape[1]
    if num_samples < 2:
        return torch.full((s.shape[0],), float("nan"), device=s.device)
    d_ss = _iou_distance(s, s)  # diagonal is 0
    return (d_ss.sum((1, 2)) / (num_samples * (num_samples - 1))).float()
