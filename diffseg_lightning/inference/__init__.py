"""Multi-sample inference: batched sampling, fusion of the S samples, uncertainty maps."""

from diffseg_lightning.inference.fusion import Fusion, fuse_samples, staple
from diffseg_lightning.inference.sampler import DiffusionSampler, describe_samples, repeat_condition
from diffseg_lightning.inference.uncertainty import mutual_information, predictive_entropy, sample_std

__all__ = [
    "DiffusionSampler",
    "Fusion",
    "describe_samples",
    "fuse_samples",
    "mutual_information",
    "predictive_entropy",
    "repeat_condition",
    "sample_std",
    "staple",
]
