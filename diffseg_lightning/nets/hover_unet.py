"""A small Hover-Net-style network: one MONAI U-Net with the NP and HV outputs of Hover-Net as channels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn


class HoVerUNet(nn.Module):
    """MONAI's U-Net with Hover-Net's two instance branches as output channels (a light stand-in for HoVerNet).

    Graham et al., "HoVer-Net", MedIA 58, 2019 predict per pixel nucleus / background logits (NP branch) and
    the horizontal and vertical distance maps (HV branch, no activation). MONAI's
    :class:`~monai.networks.nets.HoVerNet` does it with a 33.6M-parameter pre-activation ResNet-50 encoder and
    three decoders and only takes 256 x 256 inputs in its fast mode; this module gives the same outputs
    (the dict keys of MONAI's ``HoVerNetBranch``, so MONAI's ``HoVerNetLoss`` and the post-processing apply
    unchanged) from one :class:`~monai.networks.nets.UNet` with 4 output channels, for any input size
    divisible by the product of ``strides``: for CPU-budget runs and tests. It is not the paper's network.

    Args:
        in_channels: image channels.
        channels: U-Net channels per level.
        strides: U-Net strides between levels.
        num_res_units: residual units per block.

    Shapes:
        ``forward(x)``: x (B, C, H, W) -> ``{"nucleus_prediction": (B, 2, H, W) logits,
        "horizontal_vertical": (B, 2, H, W)}``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 2,
    ) -> None:
        super().__init__()
        self.strides = list(strides)
        self.unet = UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=4,
            channels=list(channels),
            strides=self.strides,
            num_res_units=num_res_units,
            norm="batch",
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.unet(x)
        return {"nucleus_prediction": out[:, :2], "horizontal_vertical": out[:, 2:]}


__all__ = ["HoVerUNet"]
