"""The segmentation module of the Diffusion Kinetic Model: KineticBlocks that fuse diffusion features.

Lv, Liu, Miao, Li & Pan, "Diffusion Kinetic Model for Breast Cancer Segmentation in Incomplete DCE-MRI",
MICCAI 2023. The segmentation module (SM) has four KineticBlocks followed by four up-blocks; KineticBlock
``i`` fuses the diffusion module's feature map ``f_dm^i`` into the SM's own features ``f_sm``::

    Fusion(f_dm, f_sm) = Concat(ReLU(BN(W * f_dm)); f_sm)

Plain ``nn.Module`` s (no Lightning, no Hydra, no kernel): the features come in as tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.basic_unet import TwoConv, UpCat
from torch import Tensor, nn

from diffseg_lightning.exceptions import ConfigError

__all__ = ["DKMSegNet", "KineticBlock", "KineticFusion", "group_by_block"]


def group_by_block(features: Tensor, block_channels: Sequence[int], num_timesteps: int) -> list[Tensor]:
    """Regroup extractor features ordered ``[t_1: b_1..b_N, t_2: b_1..b_N, ...]`` into one map per block.

    Args:
        features: (B, T * sum_b C_b, H, W), the layout of
            :class:`~diffseg_lightning.features.extractor.DiffusionFeatureExtractor` (timestep, then block).
        block_channels: ``C_b`` of each block, in the extractor's block order.
        num_timesteps: ``T``.

    Returns:
        N tensors, block ``b``'s (B, T * C_b, H, W): its maps at ``t_1, ..., t_T`` concatenated.

    Raises:
        ValueError: when the channel count does not match ``T * sum_b C_b``.
    """
    per_step = int(sum(block_channels))
    if features.ndim != 4 or features.shape[1] != num_timesteps * per_step:
        raise ConfigError(
            f"features of shape {tuple(features.shape)} do not hold {num_timesteps} timestep(s) x "
            f"blocks of {list(block_channels)} channels"
        )
    steps = features.unflatten(1, (num_timesteps, per_step))  # (B, T, sum C_b, H, W)
    groups = steps.split(list(block_channels), dim=2)  # each (B, T, C_b, H, W)
    return [g.flatten(1, 2) for g in groups]


class KineticFusion(nn.Module):
    """``Fusion(f_dm, f_sm) = Concat(ReLU(BN(W * f_dm)); f_sm)`` (Lv et al., MICCAI 2023, Sec. 2.2).

    ``W`` is a convolution (no bias: the batch norm that follows removes it) of ``kernel_size`` (the paper
    gives no size; ours defaults to 1, a per-pixel projection of the diffusion features, and odd sizes
    are padded to keep the resolution). The concatenation puts the projected diffusion features first.

    Args:
        dm_channels: channels of ``f_dm``.
        out_channels: channels of ``W * f_dm``.
        kernel_size: size of ``W`` (odd).

    Shapes:
        ``forward(f_dm, f_sm)``: f_dm (B, dm_channels, H, W), f_sm (B, C_sm, H, W) ->
        (B, out_channels + C_sm, H, W).
    """

    def __init__(self, dm_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"KineticFusion: kernel_size must be odd and >= 1, got {kernel_size}")
        self.conv = nn.Conv2d(dm_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()
        self.out_channels = out_channels

    def forward(self, f_dm: Tensor, f_sm: Tensor) -> Tensor:
        if f_dm.shape[0] != f_sm.shape[0] or f_dm.shape[-2:] != f_sm.shape[-2:]:
            raise ConfigError(
                f"KineticFusion: f_dm {tuple(f_dm.shape)} and f_sm {tuple(f_sm.shape)} must share batch and size"
            )
        return torch.cat([self.act(self.norm(self.conv(f_dm))), f_sm], dim=1)


class KineticBlock(nn.Module):
    """One encoder stage of the DKM segmentation module: down-sample, fuse ``f_dm``, convolve.

    ``out = TwoConv(Fusion(resize(f_dm), maxpool_2(f_sm)))``; without ``dm_channels`` (the paper's
    ablation "without f_dm") the fusion is skipped and the block is MONAI's ``BasicUNet`` ``Down``.
    ``f_dm`` is brought to the block's resolution by adaptive average pooling (when larger) or bilinear
    interpolation (when smaller): the diffusion module's stages need not match the SM's resolutions.

    Args:
        in_channels: channels of ``f_sm``.
        out_channels: channels of the block's output.
        dm_channels: channels of ``f_dm``; None = no fusion.
        fused_channels: channels of ``W * f_dm`` (default ``in_channels``).
        kernel_size: size of the fusion convolution ``W``.
        act: activation of the two convolutions (MONAI name).
        norm: normalisation of the two convolutions (MONAI name).
        dropout: dropout of the two convolutions.

    Shapes:
        ``forward(f_sm, f_dm)``: f_sm (B, in_channels, H, W), f_dm (B, dm_channels, h, w) or None ->
        (B, out_channels, H // 2, W // 2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dm_channels: int | None = None,
        fused_channels: int | None = None,
        kernel_size: int = 1,
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.fusion: KineticFusion | None = None
        conv_in = in_channels
        if dm_channels is not None:
            fused = fused_channels if fused_channels is not None else in_channels
            self.fusion = KineticFusion(dm_channels, fused, kernel_size)
            conv_in += fused
        self.convs = TwoConv(2, conv_in, out_channels, act, norm, bias=True, dropout=dropout)

    def forward(self, f_sm: Tensor, f_dm: Tensor | None = None) -> Tensor:
        x = self.pool(f_sm)
        if self.fusion is None:
            if f_dm is not None:
                raise ConfigError("KineticBlock: built without dm_channels, but given diffusion features")
            return self.convs(x)
        if f_dm is None:
            raise ConfigError("KineticBlock: built with dm_channels, so it needs diffusion features f_dm")
        size = x.shape[-2:]
        if f_dm.shape[-2:] != size:
            if f_dm.shape[-2] >= size[0] and f_dm.shape[-1] >= size[1]:
                f_dm = F.adaptive_avg_pool2d(f_dm, size)
            else:
                f_dm = F.interpolate(f_dm, size=size, mode="bilinear", align_corners=False)
        return self.convs(self.fusion(f_dm, x))


class DKMSegNet(nn.Module):
    """DKM's segmentation module: a stem, four KineticBlocks, four up-blocks (Lv et al., MICCAI 2023).

    A U-Net in the layout of MONAI's ``BasicUNet`` (its ``TwoConv`` and ``UpCat`` blocks): ``stem`` at full
    resolution, KineticBlocks 1..4 each halving the resolution and fusing one diffusion feature map
    (``f_dm^1..f_dm^4``, finest first), then four ``UpCat`` up-blocks with skip connections and a 1x1
    head. Without ``dm_channels`` it is the same network with plain encoder stages (the paper's
    ablation without f_dm; also the full-series baseline with ``in_channels = 1 + K`` phases).

    Args:
        in_channels: image channels (1: the pre-contrast image).
        out_channels: mask channels (logits).
        features: channels ``(c_0, c_1, c_2, c_3, c_4, c_out)``: stem, the four KineticBlocks, and the
            last up-block (as BasicUNet's ``features``).
        dm_channels: channels of ``f_dm^1..f_dm^4`` (four ints), or None for no fusion.
        fused_channels: channels of ``W * f_dm`` per block (four ints), default the block's input channels.
        kernel_size: size of the fusion convolution ``W``.
        act: activation (MONAI name, BasicUNet's default LeakyReLU 0.1).
        norm: normalisation of the convolutions (BasicUNet's default, affine instance norm); the fusion
            uses batch norm as the paper writes.
        dropout: dropout of the convolutions.

    Shapes:
        ``forward(image, f_dm)``: image (B, in_channels, H, W) with H and W multiples of 16 (and at least 32
        with instance norm, which needs more than one pixel at the 1/16 bottleneck in training); f_dm a
        sequence of four (B, dm_channels[i], h_i, w_i) maps or None -> logits (B, out_channels, H, W).
    """

    strides = (2, 2, 2, 2)  # read by UNetSegmentationModule's input-size check

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        dm_channels: Sequence[int] | None = None,
        fused_channels: Sequence[int] | None = None,
        kernel_size: int = 1,
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        fea = [int(c) for c in features]
        if len(fea) != 6:
            raise ConfigError(f"DKMSegNet: features must hold 6 channel counts, got {list(features)}")
        for name, value in (("dm_channels", dm_channels), ("fused_channels", fused_channels)):
            if value is not None and len(value) != 4:
                raise ConfigError(f"DKMSegNet: {name} must hold 4 values (one per KineticBlock), got {value}")
        if fused_channels is not None and dm_channels is None:
            raise ConfigError("DKMSegNet: fused_channels needs dm_channels")
        self.dm_channels = None if dm_channels is None else [int(c) for c in dm_channels]
        self.stem = TwoConv(2, in_channels, fea[0], act, norm, bias=True, dropout=dropout)
        self.kinetic = nn.ModuleList(
            KineticBlock(
                fea[i],
                fea[i + 1],
                None if dm_channels is None else int(dm_channels[i]),
                None if fused_channels is None else int(fused_channels[i]),
                kernel_size,
                act,
                norm,
                dropout,
            )
            for i in range(4)
        )
        self.up = nn.ModuleList(
            [
                UpCat(2, fea[4], fea[3], fea[3], act, norm, True, dropout, "deconv"),
                UpCat(2, fea[3], fea[2], fea[2], act, norm, True, dropout, "deconv"),
                UpCat(2, fea[2], fea[1], fea[1], act, norm, True, dropout, "deconv"),
                UpCat(2, fea[1], fea[0], fea[5], act, norm, True, dropout, "deconv", halves=False),
            ]
        )
        self.head = nn.Conv2d(fea[5], out_channels, kernel_size=1)

    def forward(self, image: Tensor, f_dm: Sequence[Tensor] | None = None) -> Tensor:
        h, w = image.shape[-2:]
        if h % 16 or w % 16:
            raise ConfigError(f"DKMSegNet down-samples 4 times: H and W must be multiples of 16, got {h}x{w}")
        if (f_dm is None) != (self.dm_channels is None):
            raise ConfigError(
                "DKMSegNet: diffusion features are needed exactly when the net was built with dm_channels "
                f"(dm_channels={self.dm_channels}, features given: {f_dm is not None})"
            )
        if f_dm is not None and len(f_dm) != 4:
            raise ConfigError(f"DKMSegNet: f_dm must hold 4 maps (one per KineticBlock), got {len(f_dm)}")
        skips = [self.stem(image)]
        for i, block in enumerate(self.kinetic):
            skips.append(block(skips[-1], None if f_dm is None else f_dm[i]))
        x = skips[4]
        for up, skip in zip(self.up, reversed(skips[:4]), strict=True):
            x = up(x, skip)
        return self.head(x)
