"""LightningModules, one per paradigm: they orchestrate a kernel, a denoiser and an inference recipe."""

from diffseg_lightning.methods.mask_diffusion import MaskDiffusionModule, warmup_cosine

__all__ = ["MaskDiffusionModule", "warmup_cosine"]
