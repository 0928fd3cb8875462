"""The BerDiff denoiser: a diffusion U-Net on the noisy mask and the image, concatenated.

Chen, Wang and Shan, "BerDiff: Conditional Bernoulli Diffusion Model for Medical Image
Segmentation", MICCAI 2023.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import Tensor, nn

from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.nets.blocks import batch_timesteps, check_input


class BerDiffUNet(nn.Module):
    """BerDiff's denoiser ``f(y_t, t, I)``: a U-Net whose input is ``[y_t, I]`` concatenated on channels.

    Chen, Wang and Shan, MICCAI 2023. The paper conditions by concatenation and builds on the
    guided-diffusion U-Net; MONAI's ``DiffusionModelUNet`` is that architecture (residual blocks with
    timestep embedding, self-attention at chosen levels), so we use it rather than write another.
    The output is raw: the noise kernel decides what it means (logits of the Bernoulli noise for
    the Bernoulli kernel, epsilon or x_0 for the Gaussian one).

    Nothing of the image branch can be cached (the image enters the first convolution together
    with y_t), so ``encode_condition`` returns the (validated) image itself.

    Args:
        image_channels: channels of the conditioning image.
        mask_channels: channels of the noisy mask y_t.
        out_channels: output channels (default ``mask_channels``).
        channels: width of each level; ``len(channels) - 1`` downsamplings.
        num_res_blocks: residual blocks per level.
        attention_levels: self-attention per level.
        norm_num_groups: GroupNorm groups (must divide every width).
        num_head_channels: channels per attention head.
    """

    def __init__(
        self,
        image_channels: int = 1,
        mask_channels: int = 1,
        out_channels: int | None = None,
        channels: Sequence[int] = (32, 64, 128),
        num_res_blocks: int = 1,
        attention_levels: Sequence[bool] = (False, False, True),
        norm_num_groups: int = 8,
        num_head_channels: int = 32,
    ) -> None:
        super().__init__()
        if len(channels) != len(attention_levels):
            raise ConfigError(
                f"channels {list(channels)} and attention_levels {list(attention_levels)} differ in length"
            )
        self.image_channels = image_channels
        self.mask_channels = mask_channels
        self.out_channels = out_channels or mask_channels
        self.downsample_factor = 2 ** (len(channels) - 1)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=mask_channels + image_channels,
            out_channels=self.out_channels,
            channels=tuple(channels),
            attention_levels=tuple(bool(a) for a in attention_levels),
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
        )

    def encode_condition(self, image: Tensor) -> Tensor:
        """(B, image_channels, H, W) -> the same image (there is nothing to cache)."""
        return check_input(image, self.image_channels, "image")

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """(B, mask_channels, H, W), (B,), (B, image_channels, H, W) -> (B, out_channels, H, W)."""
        check_input(x_t, self.mask_channels, "x_t", self.downsample_factor)
        if cond.shape[0] != x_t.shape[0] or cond.shape[-2:] != x_t.shape[-2:]:
            raise ConfigError(f"condition {tuple(cond.shape)} does not match x_t {tuple(x_t.shape)}")
        t = batch_timesteps(t, x_t)
        return self.unet(torch.cat([x_t, cond], dim=1), t.long())
