"""Building blocks of the diffusion denoisers.

The blocks follow the MedSegDiff denoiser of Wu et al., "MedSegDiff: Medical Image
Segmentation with Diffusion Probabilistic Model", MIDL 2023, and are written to be
reused by the other U-Net denoisers of the package:

- :class:`TimestepEmbedding`: sinusoidal embedding (MONAI's ``get_timestep_embedding``)
  followed by a two-layer MLP.
- :class:`ResBlock`: pre-activation residual block, optionally conditioned on a timestep
  embedding (the condition encoder uses it without one).
- :class:`AttentionBlock`: spatial multi-head self-attention (MONAI's
  ``SpatialAttentionBlock``).
- :class:`Downsample` / :class:`Upsample`: factor-2 resampling (MONAI convolution and
  upsampling blocks).
- :class:`FFParser`: the paper's learnable frequency-domain filter.
- :class:`DynamicConditionalEncoding`: the paper's fusion of condition and mask features.
- :func:`batch_timesteps`, :func:`check_input`, :func:`check_divisible`: the input checks every
  denoiser does (timesteps to a (B,) tensor, a (B, C, H, W) tensor with C channels, H and W
  divisible by the downsampling factor), with the same error messages everywhere.
- :func:`output_head`: the GroupNorm, SiLU, zero-initialised 3x3 convolution head of the U-Nets.

All blocks are size-agnostic (no parameter depends on the spatial size, except the
FF-Parser map, which is resampled to the actual size) and use no Python loops over
batch elements or pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, SpatialAttentionBlock
from monai.networks.blocks import Upsample as MonaiUpsample
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import Tensor, nn

from diffseg_lightning.exceptions import ConfigError

__all__ = [
    "AttentionBlock",
    "Downsample",
    "DynamicConditionalEncoding",
    "FFParser",
    "ResBlock",
    "ResidualStage",
    "TimestepEmbedding",
    "Upsample",
    "batch_timesteps",
    "check_divisible",
    "check_input",
    "conv3x3",
    "decoder_stages",
    "norm_groups",
    "output_head",
    "zero_module",
]


def norm_groups(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups for ``channels``: the largest divisor of ``channels`` up to 32.

    Lets the networks use any width (e.g. the tiny widths of unit tests) with the usual
    32-group normalisation at standard widths.

    Args:
        channels: number of feature channels.
        max_groups: upper bound on the number of groups.

    Returns:
        ``gcd(channels, max_groups)``.
    """
    return math.gcd(int(channels), int(max_groups))


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (in place) and return it.

    Args:
        module: any module.

    Returns:
        The same module, with zeroed parameters.
    """
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    """A 2D 3x3 convolution with "same" padding (MONAI ``Convolution``, ``conv_only=True``).

    Args:
        in_channels: input channels C_in.
        out_channels: output channels C_out.
        stride: 1, or 2 to halve the spatial size.

    Returns:
        A module mapping (B, C_in, H, W) to (B, C_out, H / stride, W / stride).
    """
    return Convolution(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        strides=stride,
        kernel_size=3,
        padding=1,
        conv_only=True,
    )


def output_head(channels: int, out_channels: int) -> nn.Sequential:
    """The output head of the U-Net denoisers: ``GroupNorm``, ``SiLU``, zero-initialised 3x3 convolution.

    The convolution starts at zero, so that a fresh network outputs zeros (as in ADM / MedSegDiff).
    The layout (indices 0, 1, 2 of the ``Sequential``) is part of the state_dict keys of the networks
    that use it (``out.0.weight``, ``out.2.conv.weight``, ...).

    Args:
        channels: input channels C.
        out_channels: output channels C_out.

    Returns:
        A module mapping (B, C, H, W) to (B, C_out, H, W).
    """
    return nn.Sequential(
        nn.GroupNorm(norm_groups(channels), channels),
        nn.SiLU(),
        zero_module(conv3x3(channels, out_channels)),
    )


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def batch_timesteps(t: Tensor | int | float, x: Tensor, owner: str | None = None) -> Tensor:
    """Timesteps as a (B,) tensor on ``x``'s device, B the batch size of ``x``.

    Args:
        t: a Python or 0-dim scalar (broadcast to the batch) or a (B,) tensor.
        x: the (B, ...) network input whose batch size and device ``t`` must match.
        owner: name put in front of the error message (e.g. the network's class name).

    Returns:
        (B,) tensor of the dtype of ``t``, on ``x.device``.

    Raises:
        ValueError: if ``t`` is neither a scalar nor of shape (B,), naming the expected shape.
    """
    batch = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ConfigError(
            f"{_prefix(owner)}expected timesteps t of shape ({batch},) (or a scalar), got {tuple(t.shape)}"
        )
    return t


def check_divisible(
    height: int,
    width: int,
    factor: int,
    *,
    what: str = "input",
    why: str | None = None,
    multiple: int | None = None,
    owner: str | None = None,
) -> None:
    """Raise a ValueError naming the size and the factor unless ``factor`` divides ``height`` and ``width``.

    Args:
        height: input height H.
        width: input width W.
        factor: the downsampling factor of the network.
        what: name of the input in the message (``"image"``, ``"x_t"``, ...).
        why: how the factor comes about, shown in parentheses after it (e.g. ``"2**(levels-1)"``).
        multiple: the size multiple to advise (default ``factor``).
        owner: name put in front of the message (e.g. the network's class name).

    Raises:
        ValueError: ``"<what> size (H, W) = (h, w) is not divisible by the downsampling factor f
            (= why); pad or resize the input to a multiple of m"``.
    """
    if height % factor or width % factor:
        because = f" (= {why})" if why else ""
        raise ConfigError(
            f"{_prefix(owner)}{what} size (H, W) = ({height}, {width}) is not divisible by the downsampling "
            f"factor {factor}{because}; pad or resize the input to a multiple of "
            f"{multiple if multiple is not None else factor}"
        )


def check_input(
    x: object,
    channels: int,
    what: str,
    size_factor: int | None = None,
    *,
    why: str | None = None,
    owner: str | None = None,
) -> Tensor:
    """Check that ``x`` is a (B, channels, H, W) tensor, with H and W divisible by ``size_factor``.

    Args:
        x: the input to check.
        channels: the expected channel count C.
        what: name of the input in the messages (``"image"``, ``"x_t"``, ``"mask"``, ...).
        size_factor: the downsampling factor H and W must be divisible by (:func:`check_divisible`);
            ``None`` to skip the size check (for networks with more constraints, checked separately).
        why: how the factor comes about (see :func:`check_divisible`).
        owner: name put in front of the messages (e.g. the network's class name).

    Returns:
        ``x``.

    Raises:
        ValueError: ``"expected <what> of shape (B, C, H, W), got <shape>"`` for anything but a 4-D
            tensor, ``"expected C <what> channels, got N"`` for a wrong channel count, and the message
            of :func:`check_divisible` for a wrong size.
    """
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"{_prefix(owner)}expected {what} of shape (B, {channels}, H, W), got {shape}")
    if x.shape[1] != channels:
        raise ConfigError(f"{_prefix(owner)}expected {channels} {what} channels, got {x.shape[1]}")
    if size_factor is not None:
        check_divisible(x.shape[-2], x.shape[-1], size_factor, what=what, why=why, owner=owner)
    return x


class TimestepEmbedding(nn.Module):
    """Sinusoidal timestep embedding followed by an MLP (Ho et al. 2020; as in MedSegDiff).

    Used in every residual block of the MedSegDiff denoiser (Wu et al., "MedSegDiff:
    Medical Image Segmentation with Diffusion Probabilistic Model", MIDL 2023). The
    sinusoid is MONAI's ``get_timestep_embedding``.

    Args:
        base_dim: dimension of the sinusoidal embedding.
        embed_dim: output dimension (``4 * base_dim`` by convention); defaults to that.
    """

    def __init__(self, base_dim: int, embed_dim: int | None = None) -> None:
        super().__init__()
        self.base_dim = int(base_dim)
        self.embed_dim = int(embed_dim) if embed_dim is not None else 4 * self.base_dim
        self.mlp = nn.Sequential(
            nn.Linear(self.base_dim, self.embed_dim),
            nn.SiLU(),
            nn.Linear(self.embed_dim, self.embed_dim),
        )

    def forward(self, t: Tensor) -> Tensor:
        """Embed timesteps.

        Args:
            t: (B,) integer or float timesteps.

        Returns:
            (B, embed_dim) embedding, in the dtype of the MLP weights.
        """
        emb = get_timestep_embedding(t, self.base_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


class ResBlock(nn.Module):
    """Pre-activation residual block with an optional timestep embedding.

    ``h = norm(conv(act(norm(x))))``, ``h = h * (1 + s) + b`` with ``(s, b) = proj(act(emb))``,
    ``out = skip(x) + conv(drop(act(h)))``: the ADM / guided-diffusion block with
    ``use_scale_shift_norm`` that MedSegDiff builds on (Wu et al., "MedSegDiff: Medical Image
    Segmentation with Diffusion Probabilistic Model", MIDL 2023). Without an embedding
    the scale-shift step is skipped.

    Written here rather than taken from MONAI's ``DiffusionUNetResnetBlock`` because that
    block has no dropout, requires a timestep embedding (the condition encoder has none)
    and zero-initialises its second convolution, which together with the zero-initialised
    output convolution of the network would leave most parameters without a gradient for
    the first two optimiser steps.

    Args:
        in_channels: input channels C_in.
        out_channels: output channels C_out (default C_in).
        emb_channels: timestep-embedding dimension; ``None`` for a block without one.
        dropout: dropout probability before the second convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        emb_channels: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        out_channels = int(out_channels) if out_channels is not None else int(in_channels)
        self.in_channels = int(in_channels)
        self.out_channels = out_channels
        self.norm1 = nn.GroupNorm(norm_groups(in_channels), in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        # Scale-shift (FiLM) conditioning after the second norm: an additive embedding before a
        # GroupNorm with one channel per group (e.g. 32 channels, 32 groups) is removed by it.
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels) if emb_channels is not None else None
        self.norm2 = nn.GroupNorm(norm_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(float(dropout))
        self.conv2 = conv3x3(out_channels, out_channels)
        self.act = nn.SiLU()
        self.skip: nn.Module = (
            nn.Identity()
            if out_channels == in_channels
            else Convolution(2, in_channels, out_channels, kernel_size=1, padding=0, conv_only=True)
        )

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        """Apply the block.

        Args:
            x: (B, C_in, H, W) features.
            emb: (B, emb_channels) timestep embedding; required iff the block has one.

        Returns:
            (B, C_out, H, W) features.
        """
        h = self.norm2(self.conv1(self.act(self.norm1(x))))
        if self.emb_proj is not None:
            if emb is None:
                raise ConfigError("this ResBlock was built with a timestep embedding; pass `emb`")
            scale, shift = self.emb_proj(self.act(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(self.act(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over the spatial positions (MONAI ``SpatialAttentionBlock``).

    ``out = x + Attn(GroupNorm(x))`` with tokens the H*W positions; used at the configured
    levels of the MedSegDiff U-Net (Wu et al., "MedSegDiff: Medical Image Segmentation
    with Diffusion Probabilistic Model", MIDL 2023). PyTorch's fused
    ``scaled_dot_product_attention`` is used (MONAI's ``use_flash_attention``).

    Args:
        channels: feature channels C (divisible by ``num_heads``).
        num_heads: number of attention heads.

    Raises:
        ValueError: if ``channels`` is not divisible by ``num_heads``.
    """

    def __init__(self, channels: int, num_heads: int = 4) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads != 0:
            raise ConfigError(
                f"attention needs channels divisible by num_heads, got channels={channels}, num_heads={num_heads}"
            )
        self.attn = SpatialAttentionBlock(
            spatial_dims=2,
            num_channels=channels,
            num_head_channels=channels // num_heads,
            norm_num_groups=norm_groups(channels),
            norm_eps=1e-5,
            use_flash_attention=True,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply self-attention.

        Args:
            x: (B, C, H, W) features.

        Returns:
            (B, C, H, W) features (residual included).
        """
        return self.attn(x)


class Downsample(nn.Module):
    """Factor-2 downsampling by a strided 3x3 convolution (MONAI ``Convolution``).

    Args:
        channels: input channels C.
        out_channels: output channels (default C).
    """

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = conv3x3(channels, out_channels if out_channels is not None else channels, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """Downsample.

        Args:
            x: (B, C, H, W) with even H, W.

        Returns:
            (B, C_out, H/2, W/2).
        """
        return self.conv(x)


class Upsample(nn.Module):
    """Factor-2 nearest-neighbour upsampling followed by a 3x3 convolution (MONAI ``Upsample``).

    Args:
        channels: input channels C.
        out_channels: output channels (default C).
    """

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels if out_channels is not None else channels
        self.up = MonaiUpsample(
            spatial_dims=2,
            in_channels=channels,
            out_channels=channels,
            scale_factor=2,
            mode="nontrainable",
            pre_conv=None,
            post_conv=conv3x3(channels, out_channels),
            interp_mode="nearest",
            align_corners=None,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Upsample.

        Args:
            x: (B, C, H, W).

        Returns:
            (B, C_out, 2H, 2W).
        """
        return self.up(x)


class ResidualStage(nn.Module):
    """Residual blocks (with an optional timestep embedding), each optionally followed by self-attention: one
    level of the guided-diffusion U-Net (Dhariwal and Nichol, NeurIPS 2021) that MedSegDiff builds on.

    Args:
        in_channels: input channels of the first block.
        out_channels: channels of every block's output.
        emb_channels: timestep-embedding dimension, or None (no embedding: an image-branch stage).
        num_blocks: residual blocks.
        attention: self-attention after each residual block.
        num_heads: attention heads.
        dropout: residual-block dropout.

    Shapes:
        ``forward(x, emb)``: x (B, C_in, H, W), emb (B, E) or None -> (B, C_out, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int | None,
        num_blocks: int,
        attention: bool,
        num_heads: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, emb_channels, dropout)
            for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(
            AttentionBlock(out_channels, num_heads) if attention else nn.Identity() for _ in range(num_blocks)
        )

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        for res, attn in zip(self.res, self.attn, strict=True):
            x = attn(res(x, emb))
        return x


def decoder_stages(
    channels: Sequence[int],
    emb_channels: int,
    num_blocks: int,
    attention: Sequence[bool],
    num_heads: int,
    dropout: float,
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The decoder of a U-Net with levels of ``channels`` (level 0 = full resolution): per level k a
    :class:`ResidualStage` on [upsampled level k + 1 (or the bottleneck, with the lowest level's channels);
    skip k], and the upsamplings between levels.

    Returns:
        ``(stages, upsamples)``: stages indexed by level (run from the lowest level up), and
        ``upsamples[k - 1]`` from level k to k - 1 (channels of level k).
    """
    levels = len(channels)
    stages = nn.ModuleList(
        ResidualStage(
            channels[min(k + 1, levels - 1)] + channels[k],
            channels[k],
            emb_channels,
            num_blocks,
            attention[k],
            num_heads,
            dropout,
        )
        for k in range(levels)
    )
    upsamples = nn.ModuleList(Upsample(channels[k]) for k in range(1, levels))
    return stages, upsamples


def _as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return int(size), int(size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ConfigError(f"expected an int or a pair (H, W), got {size}")
    return size[0], size[1]


class FFParser(nn.Module):
    """Frequency-domain feature filter ("FF-Parser") of MedSegDiff.

    Wu et al., "MedSegDiff: Medical Image Segmentation with Diffusion Probabilistic
    Model", MIDL 2023, Sec. 2.2: ``M = FFT2(m)``, ``M' = A ⊙ M``, ``m' = IFFT2(M')`` with a
    learnable complex attentive map ``A`` of shape (C, H, W//2+1) (real FFT of a real
    feature map). Here ``torch.fft.rfft2`` / ``irfft2`` with ``norm="ortho"`` and
    ``s=(H, W)``; ``A`` is initialised to ``1 + 0j``, so that the block starts as the
    identity (an exact identity up to floating-point rounding).

    ``A`` is stored as a real parameter of shape (C, H_ref, W_ref//2+1, 2) (real and
    imaginary parts, used through ``torch.view_as_complex``): complex parameters are not
    supported everywhere (optimiser foreach kernels, DDP gradient buckets, gradient
    clipping, EMA copies).

    Size-agnostic: ``A`` is parameterised on the rfft grid of a reference feature size
    ``size = (H_ref, W_ref)``. For another input size (H, W) its real and imaginary parts
    are bilinearly resampled *in frequency coordinates*: output row ``i`` (frequency
    ``f = i/H`` wrapped to [-1/2, 1/2)) and column ``j`` (``f = j/W``) read the reference
    map at the same normalised frequency (rows are ``fftshift``-ed so that interpolation
    runs along monotone frequencies; frequencies outside the reference range take the
    nearest border value). The DC term maps exactly onto the DC term, a map linear in
    frequency is reproduced exactly, and at the reference size no resampling happens.

    The transform runs in float32 (half-precision FFTs are restricted to power-of-two
    sizes on CUDA) and the result is cast back to the input dtype.

    Args:
        channels: feature channels C.
        size: reference spatial size (H_ref, W_ref) of the features (an int for square).
    """

    def __init__(self, channels: int, size: int | Sequence[int]) -> None:
        super().__init__()
        self.channels = int(channels)
        self.size = _as_pair(size)
        h, w = self.size
        if h < 1 or w < 1:
            raise ConfigError(f"FFParser reference size must be positive, got {self.size}")
        weight = torch.zeros(self.channels, h, w // 2 + 1, 2)
        weight[..., 0] = 1.0
        self.weight = nn.Parameter(weight)

    def attentive_map(self, height: int, width: int) -> Tensor:
        """The complex attentive map on the rfft grid of a (height, width) feature map.

        Args:
            height: spatial height H of the features.
            width: spatial width W of the features.

        Returns:
            (C, H, W//2+1) complex64 tensor (the parameter itself, as complex, at the
            reference size; a frequency-consistent bilinear resampling otherwise).
        """
        h_ref, w_ref = self.size
        weight = self.weight.float()
        if (height, width) == (h_ref, w_ref):
            return torch.view_as_complex(weight)
        # Real and imaginary parts as 2C channels of one (1, 2C, H_ref, W_ref//2+1) image.
        img = weight.permute(0, 3, 1, 2).reshape(1, 2 * self.channels, h_ref, w_ref // 2 + 1)
        img = torch.fft.fftshift(img, dim=-2)  # rows: frequencies -H_ref//2 ... in increasing order
        device = weight.device
        # Target frequencies (shifted row order) -> fractional source indices.
        rows = torch.arange(height, device=device, dtype=torch.float32)
        f_rows = (rows - height // 2) / height
        src_rows = f_rows * h_ref + h_ref // 2
        cols = torch.arange(width // 2 + 1, device=device, dtype=torch.float32)
        src_cols = cols / width * w_ref
        # grid_sample with align_corners=True: index i <-> -1 + 2 i / (n - 1).
        gy = 2.0 * src_rows / max(h_ref - 1, 1) - 1.0
        gx = 2.0 * src_cols / max(w_ref // 2, 1) - 1.0
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]  # (1, H, W//2+1, 2)
        out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)
        out = torch.fft.ifftshift(out, dim=-2)
        out = out.reshape(self.channels, 2, height, width // 2 + 1).permute(0, 2, 3, 1).contiguous()
        return torch.view_as_complex(out)

    def forward(self, x: Tensor) -> Tensor:
        """Filter the features in the frequency domain.

        Args:
            x: (B, C, H, W) real features.

        Returns:
            (B, C, H, W) filtered features, same dtype as ``x``.
        """
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ConfigError(f"FFParser expects (B, {self.channels}, H, W) features, got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        spec = torch.fft.rfft2(x.float(), norm="ortho")
        spec = spec * self.attentive_map(height, width)
        return torch.fft.irfft2(spec, s=(height, width), norm="ortho").to(x.dtype)


class DynamicConditionalEncoding(nn.Module):
    """Dynamic conditional encoding of MedSegDiff: fuse mask features into the condition stream.

    Wu et al., "MedSegDiff: Medical Image Segmentation with Diffusion Probabilistic
    Model", MIDL 2023, Eq. (3): ``A(m_I, m_x) = (LN(m_I) ⊙ LN(m_x)) ⊙ m_I`` with element-wise
    products, ``m_I`` the condition (image) feature and ``m_x`` the mask-branch feature of
    the same stage. This module returns the fused condition feature
    ``h_I = m_I + A(m_I, m_x)`` (the paper integrates the attention into the condition
    stream).

    LN normalises over (C, H, W) per sample. ``GroupNorm(1, C)`` computes exactly that
    (one group = all of C, H, W) and, unlike ``nn.LayerNorm([C, H, W])``, its affine
    parameters are per channel, so the block works for any spatial size. The affine
    parameters start at weight 1, bias 0, i.e. at the plain layer norm of the paper.

    Args:
        channels: feature channels C of both inputs.
        eps: normalisation epsilon (that of ``torch.nn.functional.layer_norm``).
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm_cond = nn.GroupNorm(1, channels, eps=eps)
        self.norm_mask = nn.GroupNorm(1, channels, eps=eps)

    def attention(self, cond: Tensor, mask: Tensor) -> Tensor:
        """The attention term ``A(m_I, m_x) = (LN(m_I) ⊙ LN(m_x)) ⊙ m_I``.

        Args:
            cond: (B, C, H, W) condition features m_I.
            mask: (B, C, H, W) mask-branch features m_x.

        Returns:
            (B, C, H, W).
        """
        if cond.shape != mask.shape:
            raise ConfigError(
                f"condition and mask features must have the same shape, got {tuple(cond.shape)} "
                f"and {tuple(mask.shape)}"
            )
        return self.norm_cond(cond) * self.norm_mask(mask) * cond

    def forward(self, cond: Tensor, mask: Tensor) -> Tensor:
        """Fused condition feature ``m_I + A(m_I, m_x)``.

        Args:
            cond: (B, C, H, W) condition features m_I.
            mask: (B, C, H, W) mask-branch features m_x.

        Returns:
            (B, C, H, W).
        """
        return cond + self.attention(cond, mask)
