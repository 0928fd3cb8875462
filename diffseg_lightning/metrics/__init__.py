"""Segmentation metrics shared by every method (one evaluation protocol)."""

from diffseg_lightning.metrics.calibration import (
    expected_calibration_error,
    uncertainty_error_auroc,
    uncertainty_error_overlap,
)
from diffseg_lightning.metrics.fairness import subgroup_report
from diffseg_lightning.metrics.instances import (
    aggregated_jaccard_index,
    f1_at_iou,
    glas_f1,
    hungarian_match,
    object_dice,
    object_hausdorff,
    panoptic_quality,
)
from diffseg_lightning.metrics.multi_annotator import (
    ged_by_sample_count,
    generalized_energy_distance,
    hungarian_matched_iou,
    iou_distance_matrix,
    sample_diversity,
    soft_dice,
)
from diffseg_lightning.metrics.report import case_metrics, summarize
from diffseg_lightning.metrics.segmentation import aggregate_cases, segmentation_metrics

__all__ = [
    "aggregate_cases",
    "aggregated_jaccard_index",
    "case_metrics",
    "expected_calibration_error",
    "f1_at_iou",
    "ged_by_sample_count",
    "generalized_energy_distance",
    "glas_f1",
    "hungarian_match",
    "hungarian_matched_iou",
    "iou_distance_matrix",
    "object_dice",
    "object_hausdorff",
    "panoptic_quality",
    "sample_diversity",
    "segmentation_metrics",
    "soft_dice",
    "subgroup_report",
    "summarize",
    "uncertainty_error_auroc",
    "uncertainty_error_overlap",
]
