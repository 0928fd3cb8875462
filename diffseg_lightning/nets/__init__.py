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
from diffseg_lightning.nets.dtunet import DiffusionTransformerUNet
from diffseg_lightning.nets.mbdiff import MBDiffUNet
from diffseg_lightning.nets.medsegdiff import MedSegDiffUNet
from diffseg_lightning.nets.medsegdiff_v2 import MedSegDiffV2UNet

__all__ = [
    "AttentionBlock",
    "BerDiffUNet",
    "DiffusionTransformerUNet",
    "Downsample",
    "DynamicConditionalEncoding",
    "FFParser",
    "MBDiffUNet",
    "MedSegDiffUNet",
    "MedSegDiffV2UNet",
    "ResBlock",
    "TimestepEmbedding",
    "Upsample",
    "conv3x3",
    "norm_groups",
    "zero_module",
]
