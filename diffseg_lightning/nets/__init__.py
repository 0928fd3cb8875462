"""Denoising networks (plain ``nn.Module``s: no Lightning, no Hydra, no diffusion kernels).

A denoiser is called as ``forward(x_t, t, cond)`` with ``cond = denoiser.encode_condition(image)``.
"""

from __future__ import annotations

from diffseg_lightning.nets.berdiff import BerDiffUNet
from diffseg_lightning.nets.blocks import (
    AttentionBlock,
    Downsample,
    DynamicConditionalEncoding,
    FFParser,
    ResBlock,
    TimestepEmbedding,
    Upsample,
    conv3x3,
    norm_groups,
    zero_module,
)
from diffseg_lightning.nets.darl import DARLGenerator, LSGANDiscriminator, SwitchableSPADE
from diffseg_lightning.nets.dkm import DKMSegNet, KineticBlock, KineticFusion
from diffseg_lightning.nets.dtunet import DiffusionTransformerUNet
from diffseg_lightning.nets.ei_ddpm import ParallelDenoisers
from diffseg_lightning.nets.gland_diffusion import DynamicMaskHead, GlandDiffusionNet, MaskBranch, ResNetFPN
from diffseg_lightning.nets.hover_unet import HoVerUNet
from diffseg_lightning.nets.mbdiff import MBDiffUNet
from diffseg_lightning.nets.medsegdiff import MedSegDiffUNet
from diffseg_lightning.nets.medsegdiff_v2 import MedSegDiffV2UNet
from diffseg_lightning.nets.nuclei_spade import SPADEMiddleDiffusionUNet
from diffseg_lightning.nets.odise import ImplicitCaptioner, MaskQueryDecoder, ODISEBackbone, ODISENet
from diffseg_lightning.nets.pixel_mlp import PixelMLPEnsemble
from diffseg_lightning.nets.weak_cdm import ClassConditionalUNet, MixableClassEmbedding

__all__ = [
    "AttentionBlock",
    "BerDiffUNet",
    "ClassConditionalUNet",
    "DARLGenerator",
    "DKMSegNet",
    "DiffusionTransformerUNet",
    "Downsample",
    "DynamicConditionalEncoding",
    "DynamicMaskHead",
    "FFParser",
    "GlandDiffusionNet",
    "HoVerUNet",
    "ImplicitCaptioner",
    "KineticBlock",
    "KineticFusion",
    "LSGANDiscriminator",
    "MBDiffUNet",
    "MaskBranch",
    "MaskQueryDecoder",
    "MedSegDiffUNet",
    "MedSegDiffV2UNet",
    "MixableClassEmbedding",
    "ODISEBackbone",
    "ODISENet",
    "ParallelDenoisers",
    "PixelMLPEnsemble",
    "ResBlock",
    "ResNetFPN",
    "SPADEMiddleDiffusionUNet",
    "SwitchableSPADE",
    "TimestepEmbedding",
    "Upsample",
    "conv3x3",
    "norm_groups",
    "zero_module",
]
