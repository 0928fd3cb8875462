"""DARL's generation module and discriminators (Kim, Oh & Ye, "Diffusion Adversarial Representation Learning
for Self-supervised Vessel Segmentation", ICLR 2023).

Plain ``nn.Module``s: the generator ``G`` of ResNet blocks with switchable SPADE (instance norm when no mask is
given, SPADE with the one-hot mask ``s^f`` otherwise), and the least-squares PatchGAN discriminators ``D_s``
(masks) and ``D_a`` (angiograms). The diffusion module ``epsilon_theta`` is MONAI's ``DiffusionModelUNet``
(configured in ``conf/model/darl.yaml``); the method (``diffseg_lightning.methods.darl``) wires them together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import SPADE
from monai.networks.nets import PatchDiscriminator
from torch import nn
from torch.nn.utils import spectral_norm as apply_spectral_norm

from diffseg_lightning.exceptions import ConfigError

__all__ = [
    "DARLGenerator",
    "LSGANDiscriminator",
    "SwitchableSPADE",
    "SwitchableSPADEResBlock",
    "one_hot_mask",
]


def one_hot_mask(mask: torch.Tensor) -> torch.Tensor:
    """A binary mask (B, 1, H, W) in {0, 1} (or kernel space {-1, 1}) as the one-hot map (B, 2, H, W).

    Channel 0 is the background, channel 1 the vessels (foreground = ``mask > 0.5`` for {0, 1} masks; for
    masks in {-1, 1} pass ``(mask + 1) / 2``).
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ConfigError(f"one_hot_mask expects a (B, 1, H, W) mask, got {tuple(mask.shape)}")
    foreground = (mask > 0.5).to(torch.get_default_dtype() if not mask.is_floating_point() else mask.dtype)
    return torch.cat([1.0 - foreground, foreground], dim=1)


class SwitchableSPADE(nn.Module):
    """Switchable spatially-adaptive denormalisation (DARL, Kim et al. ICLR 2023, Sec. 3.2 / Eq. 4-5).

    Without a mask (path A): a plain affine instance norm, ``v = w_c (v - mu_c) / sigma_c + b_c``, equal to
    ``torch.nn.InstanceNorm2d(C, affine=True)`` with the same ``weight`` and ``bias``. With a mask (path B):
    SPADE (Park et al., "Semantic Image Synthesis with Spatially-Adaptive Normalization", CVPR 2019),
    ``v = (1 + gamma_{c,h,w}(s)) (v - mu_c) / sigma_c + beta_{c,h,w}(s)``, from MONAI's
    :class:`monai.networks.blocks.SPADE` (its parameter-free instance norm and its shared 3x3 conv ->
    LeakyReLU -> gamma / beta convs). Both branches share the parameter-free normalisation; the affine
    ``weight`` / ``bias`` belong to the instance-norm branch only (the SPADE branch has its own
    spatial scale and shift), as in the released code's switchable layer.

    Args:
        channels: C, channels of the normalised features.
        label_channels: channels of the one-hot mask (2: background, vessel).
        hidden_channels: width of SPADE's shared convolution (MONAI's default 64; the released code 128).
        kernel_size: kernel of SPADE's convolutions.

    Shapes:
        ``forward(x, segmap=None)``: x (B, C, H, W); segmap (B, label_channels, h, w) or None (resized to
        (H, W) by nearest interpolation inside MONAI's SPADE); returns (B, C, H, W).
    """

    def __init__(
        self, channels: int, label_channels: int = 2, hidden_channels: int = 64, kernel_size: int = 3
    ) -> None:
        super().__init__()
        self.spade = SPADE(
            label_nc=label_channels,
            norm_nc=channels,
            kernel_size=kernel_size,
            spatial_dims=2,
            hidden_channels=hidden_channels,
            norm="INSTANCE",
        )
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.label_channels = label_channels

    def forward(self, x: torch.Tensor, segmap: torch.Tensor | None = None) -> torch.Tensor:
        if segmap is None:
            normalized = self.spade.param_free_norm(x.contiguous())
            return normalized * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if segmap.shape[1] != self.label_channels or segmap.shape[0] != x.shape[0]:
            raise ConfigError(
                f"SwitchableSPADE: the mask must be (B={x.shape[0]}, {self.label_channels}, H, W) one-hot, "
                f"got {tuple(segmap.shape)}"
            )
        return self.spade(x, segmap.to(x.dtype))


class SwitchableSPADEResBlock(nn.Module):
    """SPADE ResNet block (Park et al. 2019) with :class:`SwitchableSPADE` norms: ``x_s + conv(act(norm(
    conv(act(norm(x))))))``, the shortcut ``x_s`` a learned 1x1 conv (after a norm) when the width changes.

    Args:
        in_channels: input width.
        out_channels: output width (the middle width is the smaller of the two).
        label_channels: channels of the one-hot mask.
        hidden_channels: SPADE hidden width.
        spectral_norm: spectral normalisation of the convolutions (the released code's ``spectralinstance``).

    Shapes:
        ``forward(x, segmap=None)``: (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        label_channels: int = 2,
        hidden_channels: int = 64,
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        middle = min(in_channels, out_channels)
        wrap = apply_spectral_norm if spectral_norm else (lambda m: m)
        self.conv_0 = wrap(nn.Conv2d(in_channels, middle, 3, padding=1))
        self.conv_1 = wrap(nn.Conv2d(middle, out_channels, 3, padding=1))
        self.norm_0 = SwitchableSPADE(in_channels, label_channels, hidden_channels)
        self.norm_1 = SwitchableSPADE(middle, label_channels, hidden_channels)
        self.learned_shortcut = in_channels != out_channels
        if self.learned_shortcut:
            self.conv_s = wrap(nn.Conv2d(in_channels, out_channels, 1, bias=False))
            self.norm_s = SwitchableSPADE(in_channels, label_channels, hidden_channels)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, segmap)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, segmap), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, segmap), 0.2))
        return shortcut + dx


class DARLGenerator(nn.Module):
    """The generation module G of DARL (Kim et al., ICLR 2023, Sec. 3.2): ResNet blocks with switchable SPADE.

    Input: two channels, the noisy image ``x_t`` and the diffusion module's noise prediction
    ``epsilon_theta(x_t, t)``. Path A (no mask): the vessel segmentation ``s^v`` in [-1, 1]; path B (the
    one-hot synthetic vessel mask ``s^f``): a synthetic angiogram in [-1, 1]. One network, two behaviours,
    switched by the normalisation layers only.

    Layout (the released code's, widths scaled by ``base_channels``, which the paper does not give):
    reflection pad 3, 7x7 conv -> instance norm -> ReLU; ``num_downsamplings`` stride-2 3x3 convs (width
    doubling) with instance norm and ReLU; ``num_middle_blocks`` switchable-SPADE ResNet blocks; for each
    downsampling a nearest x2 upsampling and a switchable-SPADE ResNet block halving the width; LeakyReLU
    0.2, reflection pad 3, 7x7 conv to ``out_channels``, tanh. The encoder has plain instance norms (it sees
    no mask); only the ResNet blocks switch.

    Args:
        in_channels: 2 (image and noise prediction) for single-channel images.
        out_channels: 1.
        base_channels: width of the first layer (the released code: 64).
        num_downsamplings: stride-2 stages (released: 2); H and W must be divisible by 2**num_downsamplings.
        num_middle_blocks: ResNet blocks at the bottom (released: 2).
        label_channels: channels of the one-hot mask (2).
        spade_hidden_channels: SPADE hidden width.
        spectral_norm: spectral norm on the ResNet blocks' convolutions (released: yes).

    Shapes:
        ``forward(x, segmap=None)``: x (B, in_channels, H, W); segmap (B, label_channels, H, W) one-hot or
        None; returns (B, out_channels, H, W) in [-1, 1] (after tanh).
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 1,
        base_channels: int = 64,
        num_downsamplings: int = 2,
        num_middle_blocks: int = 2,
        label_channels: int = 2,
        spade_hidden_channels: int = 64,
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        if num_downsamplings < 0 or num_middle_blocks < 0 or base_channels < 1:
            raise ConfigError(
                "DARLGenerator needs base_channels >= 1, num_downsamplings >= 0 and num_middle_blocks >= 0; got "
                f"{base_channels}, {num_downsamplings}, {num_middle_blocks}"
            )
        nf = base_channels
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, nf, 7),
            nn.InstanceNorm2d(nf),
            nn.ReLU(),
        ]
        for i in range(num_downsamplings):
            layers += [
                nn.Conv2d(nf * 2**i, nf * 2 ** (i + 1), 3, stride=2, padding=1),
                nn.InstanceNorm2d(nf * 2 ** (i + 1)),
                nn.ReLU(),
            ]
        self.encoder = nn.Sequential(*layers)
        width = nf * 2**num_downsamplings
        block = dict(
            label_channels=label_channels, hidden_channels=spade_hidden_channels, spectral_norm=spectral_norm
        )
        self.middle = nn.ModuleList(
            SwitchableSPADEResBlock(width, width, **block) for _ in range(num_middle_blocks)
        )
        self.up = nn.ModuleList()
        for _ in range(num_downsamplings):
            self.up.append(SwitchableSPADEResBlock(width, width // 2, **block))
            width //= 2
        self.head = nn.Sequential(nn.LeakyReLU(0.2), nn.ReflectionPad2d(3), nn.Conv2d(width, out_channels, 7))
        self.in_channels = in_channels
        self.label_channels = label_channels
        self.size_factor = 2**num_downsamplings

    def forward(self, x: torch.Tensor, segmap: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        if x.shape[1] != self.in_channels:
            raise ConfigError(
                f"DARLGenerator expects {self.in_channels} input channels, got {tuple(x.shape)}"
            )
        if h % self.size_factor or w % self.size_factor:
            raise ConfigError(
                f"DARLGenerator downsamples by {self.size_factor}: the input size must be divisible by it, "
                f"got {h}x{w}"
            )
        v = self.encoder(x)
        for block in self.middle:
            v = block(v, segmap)
        for block in self.up:
            v = block(F.interpolate(v, scale_factor=2.0, mode="nearest"), segmap)
        return torch.tanh(self.head(v))


class LSGANDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al., pix2pix, CVPR 2017) for DARL's least-squares adversarial losses.

    MONAI's :class:`monai.networks.nets.PatchDiscriminator` with instance norm (the released code's choice)
    and bias; ``forward`` returns its last map only (MONAI returns every intermediate feature map too).

    Args:
        in_channels: 1 for masks (``D_s``) and grey angiograms (``D_a``).
        channels: width of the first layer (released: 64).
        num_layers: stride-2 layers (released: 3).

    Shapes:
        ``forward(x)``: (B, in_channels, H, W) -> (B, 1, h, w) patch scores (no sigmoid: LSGAN).
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        self.net = PatchDiscriminator(
            spatial_dims=2,
            channels=channels,
            in_channels=in_channels,
            out_channels=1,
            num_layers_d=num_layers,
            norm="INSTANCE",
            bias=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]
