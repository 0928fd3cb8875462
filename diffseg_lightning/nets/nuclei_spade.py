"""MONAI's SPADE diffusion U-Net with SPADE group norm in the middle block too (Yu et al., MICCAI 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import SPADEDiffusionModelUNet
from monai.networks.nets.spade_diffusion_model_unet import SPADEDiffResBlock
from torch import nn

from diffseg_lightning.exceptions import ConfigError


class _SegSlot:
    """The segmentation map of the current forward pass, shared by the middle block's SPADE blocks."""

    value: torch.Tensor | None = None


class _SpadeMiddleResnet(nn.Module):
    """A SPADE residual block with the ``(hidden_states, temb)`` call of MONAI's middle-block resnets."""

    def __init__(self, block: SPADEDiffResBlock, slot: _SegSlot) -> None:
        super().__init__()
        self.block = block
        self._slot = slot

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self._slot.value is None:
            raise RuntimeError("the SPADE middle block runs only inside SPADEMiddleDiffusionUNet.forward")
        return self.block(x, temb, self._slot.value)


class SPADEMiddleDiffusionUNet(SPADEDiffusionModelUNet):
    """A diffusion U-Net with spatially adaptive (SPADE) group norm in the middle and decoder blocks.

    Yu et al., "Diffusion-Based Data Augmentation for Nuclei Image Segmentation", MICCAI 2023, condition the
    image DDPM on the nuclei structure through SPADE (Park et al., "Semantic image synthesis with spatially-
    adaptive normalization", CVPR 2019) in the middle and decoder blocks, as the semantic diffusion model
    (Wang et al., 2022) does. MONAI's :class:`~monai.networks.nets.SPADEDiffusionModelUNet` has SPADE in its
    decoder blocks only; here the two residual blocks of its middle block (resnet, self-attention, resnet)
    are replaced by MONAI's own ``SPADEDiffResBlock`` (same channels, time embedding, groups and SPADE
    hidden width), fed the same ``seg`` as the decoder. Everything else is MONAI's network.

    Args:
        spatial_dims, in_channels, out_channels, label_nc, channels, norm_num_groups, norm_eps,
        spade_intermediate_channels: as :class:`~monai.networks.nets.SPADEDiffusionModelUNet`.
        **kwargs: the other options of :class:`~monai.networks.nets.SPADEDiffusionModelUNet`
            (``with_conditioning`` is not supported: the middle block must be the self-attention one).

    Shapes:
        ``forward(x, timesteps, seg)``: x (B, C_in, H, W), timesteps (B,), seg (B, label_nc, H', W') (resized
        by SPADE to each feature map) -> (B, C_out, H, W).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        label_nc: int,
        channels: Sequence[int] = (32, 64, 64, 64),
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        spade_intermediate_channels: int = 128,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("with_conditioning"):
            raise ConfigError("SPADEMiddleDiffusionUNet does not support with_conditioning=True")
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            label_nc=label_nc,
            channels=channels,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            spade_intermediate_channels=spade_intermediate_channels,
            **kwargs,
        )
        self._seg = _SegSlot()
        width = channels[-1]
        for name in ("resnet_1", "resnet_2"):
            block = SPADEDiffResBlock(
                spatial_dims=spatial_dims,
                in_channels=width,
                temb_channels=channels[0] * 4,  # MONAI's time-embedding width
                label_nc=label_nc,
                out_channels=width,
                norm_num_groups=norm_num_groups,
                norm_eps=norm_eps,
                spade_intermediate_channels=spade_intermediate_channels,
            )
            setattr(self.middle_block, name, _SpadeMiddleResnet(block, self._seg))

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, seg: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        self._seg.value = seg
        try:
            return super().forward(x, timesteps, seg, **kwargs)
        finally:
            self._seg.value = None


__all__ = ["SPADEMiddleDiffusionUNet"]
