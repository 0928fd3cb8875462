"""Diffusion features as representations (issue 8): a hooked, frozen backbone and a disk cache."""

from diffseg_lightning.features.cache import FeatureCache, dataset_identity, extractor_setting, state_digest
from diffseg_lightning.features.extractor import DiffusionFeatureExtractor

__all__ = [
    "DiffusionFeatureExtractor",
    "FeatureCache",
    "dataset_identity",
    "extractor_setting",
    "state_digest",
]
