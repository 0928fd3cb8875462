"""One evaluation protocol: every metric that applies to a case, and the summary over cases.

Per case (``case_metrics``):
- always (inside ``batch["fov"]`` when the dataset has a field of view, e.g. DRIVE): Dice, IoU, HD95 of the fused mask (``segmentation.py``'s empty-mask policy); ECE of the
  fused probability; UEO and AUROC of the predictive entropy against the error map of the fused mask;
  the mean sample std, entropy and mutual information.
- with several annotators (``batch["masks"]``, A > 1, one mask channel): GED over the S samples
  (and over the first 1, 4, 16 samples where S allows), HM-IoU, soft Dice of the fused probability
  against the annotators' mean, and the sample diversity.

Summary (``summarize``): nan-means over cases, bootstrap 95% intervals of the means (cases
resampled with replacement, 1000 draws, seeded), the case count and the package versions.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch

from diffseg_lightning.metrics.calibration import (
    expected_calibration_error,
    uncertainty_error_auroc,
    uncertainty_error_overlap,
)
from diffseg_lightning.metrics.multi_annotator import (
    ged_by_sample_count,
    hungarian_matched_iou,
    sample_diversity,
    soft_dice,
)
from diffseg_lightning.metrics.segmentation import METRIC_NAMES, segmentation_metrics

GED_SAMPLE_COUNTS = (1, 4, 16)
HIGHER_IS_BETTER = ("dice", "iou", "hm_iou", "soft_dice", "ueo", "auroc")


def _per_case(values: torch.Tensor) -> list[float]:
    """(B, ...) -> B floats: the nan-mean over the remaining axes (NaN when none is defined)."""
    flat = values.detach().float().cpu().reshape(values.shape[0], -1)
    defined = ~flat.isnan()
    sums = torch.where(defined, flat, 0).sum(1)
    counts = defined.sum(1)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan).tolist()


def calibration_metrics(
    probability: torch.Tensor,
    uncertainty: torch.Tensor,
    prediction: torch.Tensor,
    reference: torch.Tensor,
    fov: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """ECE of the probability; UEO and AUROC of the uncertainty against the error map; all (B,).

    With a field of view (B, C, H, W) only its pixels count: each case's pixels are selected, so
    this loops over the cases (not pixels), as their pixel counts differ.
    """
    if fov is None:
        error = (prediction > 0.5) != (reference > 0.5)
        return {
            "ece": expected_calibration_error(probability, reference),
            "ueo": uncertainty_error_overlap(uncertainty, error),
            "auroc": uncertainty_error_auroc(uncertainty, error),
        }
    rows = [
        calibration_metrics(p[m][None], u[m][None], y[m][None], r[m][None])
        for p, u, y, r, m in zip(probability, uncertainty, prediction, reference, fov, strict=True)
    ]
    return {name: torch.cat([row[name] for row in rows]) for name in ("ece", "ueo", "auroc")}


def case_metrics(
    out: dict[str, torch.Tensor], batch: dict, spacing: Sequence[float] | None = None
) -> list[dict]:
    """Every metric that applies, one row per case of the batch.

    Args:
        out: the sampler's output: ``samples`` (B, S, C, H, W), ``probability`` and ``mask``
            (B, C, H, W), ``std``, ``entropy`` and ``mutual_information`` (B, C, H, W).
        batch: ``mask`` (B, C, H, W) reference, ``case``, ``index``, optionally ``masks`` (B, A, H, W)
            and ``fov`` (B, 1, H, W), a field of view outside which nothing is scored.
        spacing: pixel spacing for HD95 in physical units (also reported: ``hd95`` stays in pixels).
    """
    reference = batch["mask"].float()
    prediction = out["mask"]
    fov = batch.get("fov")
    if fov is not None:  # score inside the field of view only (DRIVE): nothing outside counts
        fov = (fov > 0.5).expand_as(reference)
        prediction, reference = prediction * fov, reference * fov
    scores = segmentation_metrics(prediction, reference)
    columns: dict[str, torch.Tensor] = dict(scores)
    if spacing is not None:
        columns["hd95_mm"] = segmentation_metrics(prediction, reference, spacing)["hd95"]
    columns.update(
        calibration_metrics(out["probability"].float(), out["entropy"].float(), prediction, reference, fov)
    )
    for name in ("std", "entropy", "mutual_information"):
        if name in out:
            columns[f"mean_{name}"] = out[name].flatten(1).mean(1)

    masks = batch.get("masks")
    if masks is not None and masks.shape[1] > 1 and reference.shape[1] == 1:
        samples = out["samples"][:, :, 0] > 0.5
        annotators = masks > 0.5
        for count, ged in ged_by_sample_count(
            samples, annotators, GED_SAMPLE_COUNTS + (samples.shape[1],)
        ).items():
            columns["ged" if count == samples.shape[1] else f"ged_{count}"] = ged
        columns["hm_iou"] = hungarian_matched_iou(samples, annotators)
        columns["soft_dice"] = soft_dice(out["probability"][:, 0].float(), annotators)
        columns["diversity"] = sample_diversity(samples)

    per_case = {name: _per_case(values) for name, values in columns.items()}
    rows = []
    for i, (case, index) in enumerate(zip(batch["case"], batch["index"].tolist(), strict=True)):
        rows.append({"case": case, "index": index, **{name: values[i] for name, values in per_case.items()}})
    return rows


def bootstrap_interval(values: np.ndarray, draws: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of the nan-mean of ``values`` ([nan, nan] if none is defined)."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(draws, values.size))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("diffseg_lightning", "torch", "lightning", "monai", "torchmetrics", "hydra-core"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def summarize(rows: list[dict], exclude: Sequence[str] = ()) -> dict:
    """``mean`` and ``ci95`` of every numeric per-case metric (not of the columns in ``exclude``: per-case
    attributes such as a subgroup id), plus the case count and package versions."""
    names = [k for k in (rows[0] if rows else {}) if k not in ("case", "index", *exclude)]
    means, intervals = {}, {}
    for name in names:
        values = np.array([row.get(name, np.nan) for row in rows], dtype=np.float64)
        defined = values[~np.isnan(values)]
        means[name] = float(defined.mean()) if defined.size else float("nan")
        intervals[name] = bootstrap_interval(values)
    return {"mean": means, "ci95": intervals, "num_cases": len(rows), "versions": package_versions()}


__all__ = ["GED_SAMPLE_COUNTS", "METRIC_NAMES", "bootstrap_interval", "case_metrics", "summarize"]
