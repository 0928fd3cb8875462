"""LightningModules, one per paradigm: they orchestrate a kernel, a denoiser and an inference recipe."""

from diffseg_lightning.methods.mask_diffusion import MaskDiffusionModule, SegmentationMethod, warmup_cosine
from diffseg_lightning.methods.segmentation import DiceBCELoss, SegmentationModule

__all__ = ["DiceBCELoss", "MaskDiffusionModule", "SegmentationMethod", "SegmentationModule", "warmup_cosine"]
