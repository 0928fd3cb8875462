"""Auxiliary segmentation heads: a direct segmentation of the image branch, beside the diffusion.

MedSegDiff's release trains its condition branch with a direct segmentation loss and blends that branch's
output into the final mask (``loss + 10 * loss_cal``, ``cal + 0.25 * sample``); MedSegDiff-V2's anchor loss
is the same idea. :class:`~diffseg_lightning.methods.MaskDiffusionModule` adds the loss and the blend
(``model.aux_seg``); the networks here give the logits:

- :class:`MultiScaleSegHead` reads a denoiser's own image features (one map per level) and is what a
  denoiser's ``aux_logits(cond, size)`` uses (MedSegDiff, MB-Diff);
- :class:`ImageSegHead` is a small network of its own on the image, for a denoiser without an image-only
  branch (BerDiff concatenates the image with x_t) or without an ``aux_logits`` of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.nets.blocks import Downsample, ResBlock, conv3x3, norm_groups

__all__ = ["ImageSegHead", "MultiScaleSegHead"]


class MultiScaleSegHead(nn.Module):
    """Segmentation logits from a feature pyramid: a light FPN (top-down sum of 1x1 laterals) and a 3x3 readout.

    ``p_{L-1} = lat_{L-1}(f_{L-1})``, ``p_k = up2(p_{k+1}) + lat_k(f_k)`` (nearest upsampling to f_k's size),
    ``logits = conv3x3(SiLU(GroupNorm(p_0)))``, resized bilinearly to the requested size when ``f_0`` is
    smaller (a patch-resolution feature). The readout convolution keeps PyTorch's default initialisation, so
    the head's first gradients reach the features it reads.

    Args:
        level_channels: channels of the features, finest first (level k is half the size of level k-1).
        out_channels: C, logits channels (one per mask channel).
        width: channels of the pyramid (default ``level_channels[0]``).

    Raises:
        ValueError: no level, or a non-positive width.
    """

    def __init__(self, level_channels: Sequence[int], out_channels: int, width: int | None = None) -> None:
        super().__init__()
        chans = [int(c) for c in level_channels]
        width = int(width) if width is not None else (chans[0] if chans else 0)
        if not chans or min(chans) < 1 or width < 1 or int(out_channels) < 1:
            raise ConfigError(
                f"MultiScaleSegHead needs positive level_channels, width and out_channels, got {chans}, "
                f"{width}, {out_channels}"
            )
        self.laterals = nn.ModuleList(nn.Conv2d(c, width, kernel_size=1) for c in chans)
        self.readout = nn.Sequential(
            nn.GroupNorm(norm_groups(width), width), nn.SiLU(), conv3x3(width, int(out_channels))
        )

    def forward(self, features: Sequence[Tensor], size: Sequence[int] | None = None) -> Tensor:
        """Logits from the features.

        Args:
            features: one (B, C_k, H_k, W_k) map per level, finest first.
            size: (H, W) of the logits (default: the finest feature's).

        Returns:
            (B, out_channels, H, W) logits.
        """
        if len(features) != len(self.laterals):
            raise ConfigError(
                f"MultiScaleSegHead expects {len(self.laterals)} feature maps, got {len(features)}"
            )
        p = self.laterals[-1](features[-1])
        for k in reversed(range(len(features) - 1)):
            lateral = self.laterals[k](features[k])
            p = F.interpolate(p, size=lateral.shape[-2:], mode="nearest") + lateral
        logits = self.readout(p)
        if size is not None and tuple(logits.shape[-2:]) != tuple(int(s) for s in size):
            logits = F.interpolate(
                logits, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False
            )
        return logits


class ImageSegHead(nn.Module):
    """A small segmentation network of its own on the image: a residual pyramid and a :class:`MultiScaleSegHead`.

    Level 0: ``conv3x3(image)`` and one residual block; level k > 0: strided-conv downsampling and one
    residual block (no timestep); the logits come from the pyramid. Used where a denoiser has no image-only
    branch to put a head on (BerDiff enters the image with x_t in its first convolution) or no
    ``aux_logits`` of its own; it then trains only itself and reaches the prediction through the blend.

    Args:
        image_channels: channels of the image.
        out_channels: C, logits channels.
        channels: width of every level; ``len(channels) - 1`` downsamplings (H and W must be divisible by
            ``2 ** (len(channels) - 1)``).
    """

    def __init__(
        self, image_channels: int, out_channels: int, channels: Sequence[int] = (16, 32, 64)
    ) -> None:
        super().__init__()
        chans = [int(c) for c in channels]
        if not chans or min(chans) < 1 or int(image_channels) < 1:
            raise ConfigError(
                f"ImageSegHead needs image_channels >= 1 and positive channels, got {image_channels}, {chans}"
            )
        self.stem = conv3x3(int(image_channels), chans[0])
        self.downs = nn.ModuleList(Downsample(chans[k - 1]) for k in range(1, len(chans)))
        self.blocks = nn.ModuleList(ResBlock(chans[max(k - 1, 0)], chans[k], None) for k in range(len(chans)))
        self.head = MultiScaleSegHead(chans, out_channels)

    def forward(self, image: Tensor) -> Tensor:
        """(B, image_channels, H, W) -> (B, out_channels, H, W) logits."""
        h = self.stem(image)
        features = []
        for k, block in enumerate(self.blocks):
            if k > 0:
                h = self.downs[k - 1](h)
            h = block(h)
            features.append(h)
        return self.head(features, image.shape[-2:])
