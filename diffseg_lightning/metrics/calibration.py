"""Calibration and uncertainty-error metrics of a probabilistic segmentation, per case.

All functions are batched over cases with torch (no loop over cases or pixels) and return a (B,)
float32 tensor on the inputs' device; aggregate with a nan-mean. The spatial part of every input may be
``(H, W)`` or any trailing shape (e.g. ``(1, H, W)`` or ``(D, H, W)``); it is flattened per case.

Empty-case policy (tested in ``tests/test_calibration.py``):

- ECE: defined for every case with at least one pixel, whatever the target holds (an all-background
  target is scored like any other); no special case.
- UEO: at a threshold where both the thresholded uncertainty and the error map are empty, the Dice is 1
  (Jungo & Reyes' released ``error_dice``); a case without error pixels therefore scores 1 when some
  threshold leaves no pixel above it, and 0 otherwise (``empty_error="one"``, default), or NaN
  (``empty_error="nan"``).
- Uncertainty-error AUROC: NaN when a case has no wrong pixel or no right pixel (one class missing).

References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (ECE). Jungo & Reyes, "Assessing
    Reliability and Challenges of Uncertainty Estimations for Medical Image Segmentation", MICCAI 2019
    (ECE of the foreground probability, uncertainty-error overlap; facts about their evaluation taken
    from the released code, github.com/alainjungo/reliability-challenges-uncertainty).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from diffseg_lightning.exceptions import ConfigError

__all__ = [
    "expected_calibration_error",
    "uncertainty_error_auroc",
    "uncertainty_error_overlap",
    "uncertainty_error_overlap_curve",
]


def _binary(mask: torch.Tensor, name: str) -> torch.Tensor:
    """Check that ``mask`` is binary (bool or values in {0, 1}) and return it as bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
        raise ConfigError(f"{name} must be a binary mask (bool or values in {{0, 1}}); got other values")
    return mask != 0


def _floating(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ConfigError(f"{name} must be a floating torch.Tensor")
    if not torch.isfinite(x).all():
        raise ConfigError(f"{name} must be finite (found NaN or inf)")
    return x


def _check_shapes(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape or a.ndim < 2:
        raise ConfigError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must both be (B, H, W)")


def expected_calibration_error(
    probability: torch.Tensor,
    target: torch.Tensor,
    num_bins: int = 10,
    convention: Literal["foreground", "top_label"] = "foreground",
) -> torch.Tensor:
    """Binary expected calibration error (ECE) with equal-width bins, per case.

    ``ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|`` over ``num_bins`` equal-width bins of [0, 1]
    (Guo et al., ICML 2017), the pixels of one case being the population. Two conventions:

    - ``"foreground"`` (default): confidence = the foreground probability ``p``, "accuracy" = the target
      (the fraction of foreground pixels in a bin): a reliability diagram of ``p`` against the observed
      foreground frequency. This is what torchmetrics' ``binary_calibration_error`` computes (its
      ``_binary_calibration_error_update`` returns ``preds, target`` unchanged; it is **not** the top-label
      convention) and what Jungo & Reyes (MICCAI 2019) use for segmentation (``ece_binary`` in their
      released code).
    - ``"top_label"``: confidence = ``max(p, 1 - p)``, accuracy = whether the predicted label
      ``p > 0.5`` equals the target (at ``p = 0.5`` the label is background, as ``argmax`` picks it). This
      is Guo et al.'s top-1 ECE, and equals torchmetrics' ``multiclass_calibration_error`` on the stacked
      ``[1 - p, p]``. Its confidences lie in [0.5, 1], so only the upper half of the bins is used.

    The two agree on a bin holding only ``p`` on one side of 0.5 (e.g. a constant 0.8 with 50 %
    foreground gives 0.3 in both), and differ when the top-label convention pools ``p`` and ``1 - p`` in
    one bin, where errors of opposite sign cancel.

    Bins are ``[m/M, (m+1)/M)`` (torchmetrics' ``bucketize(..., right=True)`` edges), except that the last
    bin is closed, ``[(M-1)/M, 1]``, so that ``p = 1`` falls in the last bin (torchmetrics puts it in an
    extra bin of its own; Jungo & Reyes' code closes the last bin as here).

    Empty masks: no special case; an all-background (or all-foreground) target is scored like any other.

    Args:
        probability: (B, H, W) foreground probability in [0, 1] (floating).
        target: (B, H, W) binary reference mask.
        num_bins: number of equal-width bins ``M >= 1``.
        convention: ``"foreground"`` or ``"top_label"``, see above.

    Returns:
        (B,) float32 ECE in [0, 1].

    Raises:
        ValueError: on an out-of-range probability, a non-binary target, mismatched shapes, a bad
            ``num_bins`` or an unknown ``convention``.
    """
    if convention not in ("foreground", "top_label"):
        raise ConfigError(f"convention must be 'foreground' or 'top_label', got {convention!r}")
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ConfigError(f"num_bins must be a positive integer, got {num_bins!r}")
    p = _floating(probability, "probability")
    t = _binary(target, "target")
    _check_shapes(p, t, "probability", "target")
    if not ((p >= 0) & (p <= 1)).all():
        raise ConfigError("probability must lie in [0, 1] (apply a sigmoid to logits first)")

    p, t = p.flatten(1), t.flatten(1)
    if convention == "foreground":
        confidence, correct = p, t
    else:
        label = p > 0.5
        confidence, correct = torch.where(label, p, 1 - p), label == t
    edges = torch.linspace(0, 1, num_bins + 1, dtype=confidence.dtype, device=confidence.device)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, num_bins - 1)
    batch, num_pixels = confidence.shape
    index = index + num_bins * torch.arange(batch, device=index.device)[:, None]  # one set of bins per case
    conf_sum = torch.zeros(batch * num_bins, dtype=torch.float64, device=p.device)
    acc_sum = torch.zeros_like(conf_sum)
    conf_sum.scatter_add_(0, index.flatten(), confidence.double().flatten())
    acc_sum.scatter_add_(0, index.flatten(), correct.double().flatten())
    # |B_m|/N * |acc_m - conf_m| = |sum_acc_m - sum_conf_m| / N; empty bins contribute 0.
    return ((acc_sum - conf_sum).abs().view(batch, num_bins).sum(1) / num_pixels).float()


def _ueo_thresholds(
    thresholds: int | Sequence[float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if isinstance(thresholds, bool):
        raise ConfigError(f"thresholds must be an int or a sequence of floats, got {thresholds!r}")
    if isinstance(thresholds, int):
        if thresholds < 1:
            raise ConfigError(f"thresholds must be a positive number of thresholds, got {thresholds}")
        return torch.arange(thresholds, dtype=torch.float64, device=device).div(thresholds).to(dtype)
    taus = [float(t) for t in thresholds]
    if not taus or not all(0.0 <= t < 1.0 for t in taus):
        raise ConfigError(
            f"thresholds must be a non-empty sequence of values in [0, 1), got {list(thresholds)}"
        )
    return torch.tensor(taus, dtype=dtype, device=device)


def uncertainty_error_overlap_curve(
    uncertainty: torch.Tensor,
    error: torch.Tensor,
    thresholds: int | Sequence[float] = 100,
    normalize: Literal["none", "minmax"] = "none",
    empty_error: Literal["one", "nan"] = "one",
) -> torch.Tensor:
    """Dice between the thresholded uncertainty and the error map, at each threshold, per case.

    ``UEO_tau = 2 |U_tau & E| / (|U_tau| + |E|)`` with ``U_tau = {u > tau}`` (strict, as in Jungo &
    Reyes' released ``UncertaintyAndCorrectionEvalNumpy``) and ``E`` the wrong pixels. This is the curve
    that :func:`uncertainty_error_overlap` maximises per case; Jungo & Reyes instead fix one threshold
    per method, the one maximising the mean over cases (take ``curve.mean(0).argmax()`` for that).

    Args:
        uncertainty: (B, H, W) uncertainty, higher = less certain. With ``normalize="none"`` it must lie
            in [0, 1] (e.g. binary entropy divided by ``log 2``, or the std of Bernoulli samples).
        error: (B, H, W) binary map of the wrong pixels (``prediction != reference``).
        thresholds: an int ``n`` for the ``n`` thresholds ``0, 1/n, ..., (n-1)/n``, or explicit
            thresholds in [0, 1) (Jungo & Reyes used 0.05, 0.1, 0.2, ..., 0.9, 0.95).
        normalize: ``"none"``, or ``"minmax"`` to rescale each case's map to [0, 1] by its own minimum and
            maximum first (a constant map becomes 0), as Jungo & Reyes do for unbounded uncertainties.
        empty_error: for a case without error pixels, ``"one"`` (Dice 1 at thresholds where nothing is
            uncertain either, 0 elsewhere; Jungo & Reyes' ``error_dice``) or ``"nan"`` (the whole row).

    Returns:
        (B, T) float32 Dice per threshold.
    """
    if normalize not in ("none", "minmax"):
        raise ConfigError(f"normalize must be 'none' or 'minmax', got {normalize!r}")
    if empty_error not in ("one", "nan"):
        raise ConfigError(f"empty_error must be 'one' or 'nan', got {empty_error!r}")
    u = _floating(uncertainty, "uncertainty")
    e = _binary(error, "error")
    _check_shapes(u, e, "uncertainty", "error")
    u, e = u.flatten(1), e.flatten(1)
    if normalize == "minmax":
        low, high = u.amin(1, keepdim=True), u.amax(1, keepdim=True)
        u = torch.where(high > low, (u - low) / (high - low).clamp_min(torch.finfo(u.dtype).tiny), 0.0)
    elif not ((u >= 0) & (u <= 1)).all():
        raise ConfigError("uncertainty must lie in [0, 1] with normalize='none' (or pass normalize='minmax')")
    batch, num_pixels = u.shape
    tau = _ueo_thresholds(thresholds, u.dtype, u.device).expand(batch, -1).contiguous()  # (B, T)

    # counts of {u > tau} and {u > tau} & E for all thresholds at once, by binary search in sorted maps
    uncertain = num_pixels - torch.searchsorted(u.sort(1).values, tau, right=True)
    on_error = torch.where(e, u, torch.full_like(u, -torch.inf)).sort(1).values  # non-errors never count
    overlap = num_pixels - torch.searchsorted(on_error, tau, right=True)
    num_error = e.sum(1, keepdim=True)
    total = (uncertain + num_error).double()
    dice = torch.where(total > 0, 2.0 * overlap.double() / total.clamp_min(1.0), torch.ones_like(total))
    if empty_error == "nan":
        dice = torch.where(num_error > 0, dice, torch.full_like(dice, float("nan")))
    return dice.float()


def uncertainty_error_overlap(
    uncertainty: torch.Tensor,
    error: torch.Tensor,
    thresholds: int | Sequence[float] = 100,
    normalize: Literal["none", "minmax"] = "none",
    empty_error: Literal["one", "nan"] = "one",
) -> torch.Tensor:
    """Uncertainty-error overlap (UEO), maximised over thresholds, per case.

    Jungo & Reyes (MICCAI 2019) define the U-E overlap as the Dice between the thresholded (normalised,
    [0, 1]) uncertainty map and the binary error map, ``2 |U_tau & E| / (|U_tau| + |E|)``, ``U_tau = {u >
    tau}``, evaluated over a set of thresholds. Our choice: the best threshold per case (a threshold-free
    per-case score; Jungo & Reyes' tables instead fix, per method, the threshold with the best mean over
    cases, which :func:`uncertainty_error_overlap_curve` supports). 1 when the uncertainty marks exactly
    the wrong pixels. See :func:`uncertainty_error_overlap_curve` for the arguments and the per-threshold
    values (for a dataset-level choice of threshold as in Jungo & Reyes' tables).

    Empty error map: ``empty_error="one"`` gives 1 when some threshold leaves no pixel above it (i.e.
    ``max(u) <= max(thresholds)``) and 0 otherwise; ``"nan"`` gives NaN.

    Args:
        uncertainty: (B, H, W) uncertainty in [0, 1] (or any range with ``normalize="minmax"``).
        error: (B, H, W) binary map of the wrong pixels.
        thresholds: number of thresholds ``n`` (``0, 1/n, ..., (n-1)/n``) or explicit thresholds.
        normalize: ``"none"`` or ``"minmax"`` (per case).
        empty_error: ``"one"`` or ``"nan"``, see above.

    Returns:
        (B,) float32 UEO in [0, 1] (NaN per the empty-error policy).
    """
    curve = uncertainty_error_overlap_curve(uncertainty, error, thresholds, normalize, empty_error)
    return curve.amax(1)  # NaN rows (empty_error="nan") stay NaN


def uncertainty_error_auroc(uncertainty: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """AUROC of the uncertainty as a detector of wrong pixels, per case.

    The probability that a wrong pixel has a higher uncertainty than a right one, ties counting one half
    (Mann-Whitney U / (n_wrong n_right), computed from tie-averaged ranks in exact int64 arithmetic),
    which equals the trapezoidal area under the ROC curve that torchmetrics' ``binary_auroc`` (exact,
    ``thresholds=None``) and sklearn's ``roc_auc_score`` compute. 1 for perfect separation, 0.5 for an
    uninformative (e.g. constant) map. Any monotone rescaling of the uncertainty leaves it unchanged.

    Args:
        uncertainty: (B, H, W) uncertainty, higher = less certain (any finite range).
        error: (B, H, W) binary map of the wrong pixels.

    Returns:
        (B,) float32 AUROC in [0, 1]; NaN for a case with no wrong pixel or no right pixel.
    """
    u = _floating(uncertainty, "uncertainty")
    e = _binary(error, "error")
    _check_shapes(u, e, "uncertainty", "error")
    u, e = u.flatten(1), e.flatten(1)
    batch, num_pixels = u.shape
    values, order = u.sort(1)
    # tie groups of the sorted values: a running group id per case, made unique across cases
    new_group = torch.ones_like(values, dtype=torch.bool)
    new_group[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new_group.long().cumsum(1) - 1 + num_pixels * torch.arange(batch, device=u.device)[:, None]
    position = torch.arange(num_pixels, device=u.device).expand(batch, -1)
    first = torch.full((batch * num_pixels,), num_pixels, dtype=torch.long, device=u.device)
    last = torch.full_like(first, -1)
    first.scatter_reduce_(0, group.flatten(), position.flatten(), reduce="amin")
    last.scatter_reduce_(0, group.flatten(), position.flatten(), reduce="amax")
    twice_rank = (first + last + 2)[group]  # 2 x (1-based tie-averaged rank), an integer
    wrong = e.gather(1, order)
    rank_sum_x2 = (twice_rank * wrong).sum(1)
    num_wrong = e.sum(1)
    num_right = num_pixels - num_wrong
    u_statistic = rank_sum_x2.double() / 2 - num_wrong.double() * (num_wrong.double() + 1) / 2
    pairs = (num_wrong * num_right).double()
    auroc = torch.where(pairs > 0, u_statistic / pairs.clamp_min(1.0), torch.full_like(pairs, float("nan")))
    return auroc.float()
