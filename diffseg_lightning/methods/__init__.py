"""LightningModules, one per paradigm: they orchestrate a kernel, a denoiser and an inference recipe."""

from diffseg_lightning.methods.base import SegmentationMethod
from diffseg_lightning.methods.darl import DARLModule
from diffseg_lightning.methods.dkm import DKMModule
from diffseg_lightning.methods.ei_ddpm import EIDDPMModule
from diffseg_lightning.methods.fedd import FEDDModule
from diffseg_lightning.methods.gland_diffusion import GlandDiffusionModule, UNetInstanceModule
from diffseg_lightning.methods.gradcam import GradCAMModule
from diffseg_lightning.methods.hovernet import HoVerNetModule
from diffseg_lightning.methods.image_ddpm import ImageDiffusionModule
from diffseg_lightning.methods.mask_diffusion import MaskDiffusionModule
from diffseg_lightning.methods.nuclei_aug import NucleiAugmentationModule, classifier_free_guidance
from diffseg_lightning.methods.odise import ODISEModule
from diffseg_lightning.methods.segmentation import DiceBCELoss, UNetSegmentationModule
from diffseg_lightning.methods.weak_cdm import WeakCDMModule

# ``diffseg_lightning.methods.warmup_cosine``: the name configs (and the configs stored in checkpoints) use
from diffseg_lightning.utils.schedules import warmup_cosine

__all__ = [
    "DARLModule",
    "DKMModule",
    "DiceBCELoss",
    "EIDDPMModule",
    "FEDDModule",
    "GlandDiffusionModule",
    "GradCAMModule",
    "HoVerNetModule",
    "ImageDiffusionModule",
    "MaskDiffusionModule",
    "NucleiAugmentationModule",
    "ODISEModule",
    "SegmentationMethod",
    "UNetInstanceModule",
    "UNetSegmentationModule",
    "WeakCDMModule",
    "classifier_free_guidance",
    "warmup_cosine",
]
