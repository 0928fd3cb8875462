"""An ensemble of per-pixel MLP classifiers, all members in one pass (grouped 1x1 convolutions)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from diffseg_lightning.exceptions import ConfigError

__all__ = ["PixelMLPEnsemble"]


class PixelMLPEnsemble(nn.Module):
    """``S`` independent per-pixel MLPs on a feature map, evaluated together.

    Baranchuk, Rubachev, Voynov, Khrulkov & Babenko (ICLR 2022), "Label-Efficient Semantic
    Segmentation with Diffusion Models", Sec. 4: each pixel's concatenated DDPM features go through
    an MLP ``Linear(F, 128) -> ReLU -> BatchNorm -> Linear(128, 32) -> ReLU -> BatchNorm ->
    Linear(32, K)``, and an ensemble of independently initialised MLPs (10 in the paper) is
    averaged. FEDD (Carrion & Norouzi, MICCAI 2023) uses these per-pixel probes on its DDPM features.

    A per-pixel linear layer is a 1x1 convolution, and ``S`` of them reading the same input are one
    1x1 convolution with ``S x`` the output channels; the later layers are grouped (``groups=S``),
    so member ``s`` only sees its own hidden units: one pass computes ``S`` independent MLPs.
    ``BatchNorm2d`` over the hidden channels is the per-member, per-unit BatchNorm over pixels.

    Args:
        in_channels: F, feature channels.
        out_channels: K, logits per pixel and member (1 for a binary mask, C for C sigmoid channels).
        num_members: S, ensemble size.
        hidden: widths of the hidden layers (Baranchuk et al.: 128, 32).

    Shapes:
        ``forward(features)``: (B, F, H, W) -> logits (B, S, K, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 1,
        num_members: int = 10,
        hidden: Sequence[int] = (128, 32),
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or num_members < 1 or any(int(h) < 1 for h in hidden):
            raise ConfigError(
                f"PixelMLPEnsemble needs positive sizes; got in_channels={in_channels}, "
                f"out_channels={out_channels}, num_members={num_members}, hidden={list(hidden)}"
            )
        self.in_channels, self.out_channels, self.num_members = (
            int(in_channels),
            int(out_channels),
            int(num_members),
        )
        S = self.num_members
        layers: list[nn.Module] = []
        width, groups = self.in_channels, 1
        for h in hidden:
            layers += [nn.Conv2d(width, S * int(h), 1, groups=groups), nn.ReLU(), nn.BatchNorm2d(S * int(h))]
            width, groups = S * int(h), S
        layers.append(nn.Conv2d(width, S * self.out_channels, 1, groups=groups))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        logits = self.layers(features)
        return logits.reshape(features.shape[0], self.num_members, self.out_channels, *features.shape[-2:])
