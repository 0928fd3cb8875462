"""Segmentation metrics shared by every method (one evaluation protocol)."""

from diffseg_lightning.metrics.segmentation import aggregate_cases, segmentation_metrics

__all__ = ["aggregate_cases", "segmentation_metrics"]
