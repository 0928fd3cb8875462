"""The MB-Diff denoiser: a diffusion U-Net on the noisy mask, guided by image features at every scale.

Wang, Yang, Zhou & Wang, "Medical Boundary Diffusion Model for Skin Lesion Segmentation" (MB-Diff),
MICCAI 2023. The paper's second part, the evolution-uncertainty fusion of several evolutions, is an
inference recipe: ``sampler.fusion=evolution``
(:func:`~diffseg_lightning.inference.fusion.evolution_fusion`); it needs the learned variance of improved
DDPM, i.e. ``noise=gaussian noise.learn_variance=true`` and a denoiser with ``2 * mask_channels`` outputs,
which the model config derives from the noise config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import Tensor, nn

from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.nets.aux_seg import MultiScaleSegHead
from diffseg_lightning.nets.blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepEmbedding,
    Upsample,
    batch_timesteps,
    check_input,
    conv3x3,
    norm_groups,
    output_head,
)

__all__ = ["MBDiffUNet", "MultiScaleImageGuidance"]


def _conv1x1(in_channels: int, out_channels: int) -> nn.Module:
    return Convolution(2, in_channels, out_channels, kernel_size=1, padding=0, conv_only=True)


class MultiScaleImageGuidance(nn.Module):
    """MB-Diff's multi-scale image guidance module: image features at every scale of the denoiser.

    Wang et al., "Medical Boundary Diffusion Model for Skin Lesion Segmentation", MICCAI 2023: an efficient
    image branch whose features at several scales constrain the boundary evolution of the denoiser. The
    paper describes the module only at this level (we could not consult its implementation details, and no
    code was released), so the layout is ours: a light convolutional pyramid with one output per U-Net level,

    - level 0: ``stem = conv3x3(image)``, then ``num_blocks`` residual blocks (no timestep) -> ``f^0``;
    - level k > 0: strided-conv downsampling of ``f^{k-1}``, then ``num_blocks`` residual blocks -> ``f^k``;
    - guidance head per level: ``g^k = conv1x1(SiLU(GroupNorm(f^k)))`` (B, C_k, H/2**k, W/2**k), the
      feature that :class:`MBDiffUNet` adds to its encoder feature of the same level.

    Nothing here depends on the noisy mask or the timestep, so the pyramid runs once per image
    (``MBDiffUNet.encode_condition``) and is reused across sampling steps and samples.

    Args:
        image_channels: channels of the image (1, 3 or 4 in practice).
        level_channels: channels C_k of every level; ``len(level_channels) - 1`` downsamplings.
        num_blocks: residual blocks per level (>= 1).
        dropout: residual-block dropout.
    """

    def __init__(
        self, image_channels: int, level_channels: Sequence[int], num_blocks: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        chans = [int(c) for c in level_channels]
        if not chans or min(chans) < 1 or int(num_blocks) < 1 or int(image_channels) < 1:
            raise ConfigError(
                f"MultiScaleImageGuidance needs image_channels >= 1, positive level_channels and num_blocks >= 1, "
                f"got {image_channels}, {chans}, {num_blocks}"
            )
        self.level_channels = tuple(chans)
        self.stem = conv3x3(int(image_channels), chans[0])
        self.downs = nn.ModuleList(Downsample(chans[k - 1]) for k in range(1, len(chans)))
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(
                    ResBlock((chans[max(k - 1, 0)] if i == 0 else chans[k]), chans[k], None, float(dropout))
                    for i in range(int(num_blocks))
                )
            )
            for k in range(len(chans))
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(norm_groups(c), c), nn.SiLU(), _conv1x1(c, c)) for c in chans
        )

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        """Guidance features of every level.

        Args:
            image: (B, image_channels, H, W), H and W divisible by ``2 ** (len(level_channels) - 1)``.

        Returns:
            ``(g^0, ..., g^{L-1})``, level k of shape (B, C_k, H/2**k, W/2**k).
        """
        h = self.stem(image)
        guidance = []
        for k, (stage, head) in enumerate(zip(self.stages, self.heads, strict=True)):
            if k > 0:
                h = self.downs[k - 1](h)
            h = stage(h)
            guidance.append(head(h))
        return tuple(guidance)


class MBDiffUNet(nn.Module):
    """MB-Diff denoiser ``f_theta(y_t, t, I)``: a diffusion U-Net on y_t with multi-scale image guidance.

    Wang, Yang, Zhou & Wang, "Medical Boundary Diffusion Model for Skin Lesion Segmentation", MICCAI 2023.
    Segmentation is a boundary evolution from Gaussian noise y_T to the mask y_0, each step predicted by this
    network and constrained by the image through :class:`MultiScaleImageGuidance`. The output is raw: the
    kernel decides its meaning (epsilon or x_0, plus the variance interpolation ``v`` with a learned variance,
    which MB-Diff's evolution-uncertainty fusion needs; Bernoulli logits with ``noise=bernoulli``).

    Layout (level k has ``C_k = base_channels * channel_mults[k]`` channels at (H, W) / 2**k). The paper
    leaves the architecture open beyond "a denoising U-Net guided by multi-scale image features" (we could
    not consult its implementation details; no code was released); our choices, each written down:

    - Denoising U-Net in the guided-diffusion style that MB-Diff builds on (improved DDPM, whose learned
      variance the fusion uses): residual blocks with a scale-shift timestep embedding
      (:class:`~diffseg_lightning.nets.blocks.ResBlock`, GroupNorm with up to 32 groups), self-attention at
      the levels flagged in ``attention_levels``, strided-conv downsampling, nearest + conv upsampling, one
      skip per level, concatenated in the decoder. Timestep embedding ``4 * base_channels`` wide.
    - The mask enters alone (``conv3x3(y_t)``); the image enters only through the guidance.
    - Guidance injection: at the end of every encoder level, after its residual blocks (and attention),
      the guidance feature of that level is added, ``h^k <- h^k + g^k``; the sum is the level's skip and
      the input of the next level, and the last one enters the bottleneck (residual block, attention if
      ``attention_levels[-1]``, residual block). Addition rather than concatenation keeps the widths of a
      plain U-Net; the guidance head's 1x1 convolution learns the scale of each level's guidance.
    - The output convolution is zero-initialised (the network starts by predicting 0), as in
      guided-diffusion; no other layer is.

    Split for sampling (DESIGN "Sampling cost"): the whole guidance pyramid depends on the image only, so
    ``encode_condition(image)`` returns all of it, a tuple of batch-first tensors, and ``forward`` never
    touches the image. :meth:`forward_with_image` is the un-split reference.

    Args:
        image_channels: channels of the conditioning image I.
        mask_channels: channels C of the noisy mask y_t (one per class for multi-class targets).
        out_channels: output channels (default C; ``2 C`` for a learned variance).
        base_channels: channels of level 0.
        channel_mults: channel multiplier per level; ``len(channel_mults) - 1`` downsamplings.
        num_res_blocks: residual blocks per level in the encoder and in the decoder.
        attention_levels: self-attention at each level (the last flag also sets the bottleneck attention).
        num_heads: attention heads (every attended width must be divisible by it).
        guidance_blocks: residual blocks per level in the image guidance pyramid.
        dropout: residual-block dropout.

    Attributes:
        downsample_factor: ``2 ** (len(channel_mults) - 1)``; H and W must be divisible by it.
        level_channels: ``(C_0, ..., C_{L-1})``.

    Raises:
        ValueError: on inconsistent hyper-parameters.
    """

    def __init__(
        self,
        image_channels: int = 3,
        mask_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int = 2,
        attention_levels: Sequence[bool] = (False, False, False, True),
        num_heads: int = 4,
        guidance_blocks: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        mults = tuple(int(m) for m in channel_mults)
        attn = tuple(bool(a) for a in attention_levels)
        if not mults or min(mults) < 1:
            raise ConfigError(
                f"channel_mults must be a non-empty sequence of positive ints, got {list(mults)}"
            )
        if len(attn) != len(mults):
            raise ConfigError(
                f"attention_levels needs one flag per level: got {len(attn)} flags for {len(mults)} channel_mults"
            )
        for name, value in (
            ("image_channels", image_channels),
            ("mask_channels", mask_channels),
            ("base_channels", base_channels),
            ("num_res_blocks", num_res_blocks),
            ("num_heads", num_heads),
            ("guidance_blocks", guidance_blocks),
        ):
            if int(value) < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if out_channels is not None and int(out_channels) < 1:
            raise ConfigError(f"out_channels must be >= 1, got {out_channels}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")

        self.image_channels = int(image_channels)
        self.mask_channels = int(mask_channels)
        self.out_channels = int(out_channels) if out_channels is not None else self.mask_channels
        self.num_levels = len(mults)
        self.downsample_factor = 2 ** (self.num_levels - 1)
        chans = [int(base_channels) * m for m in mults]
        self.level_channels = tuple(chans)
        emb = 4 * int(base_channels)
        nrb, drop = int(num_res_blocks), float(dropout)

        self.time_embed = TimestepEmbedding(int(base_channels), emb)
        self.guidance = MultiScaleImageGuidance(self.image_channels, chans, int(guidance_blocks), drop)

        self.stem = conv3x3(self.mask_channels, chans[0])
        self.downs = nn.ModuleList(Downsample(chans[k - 1]) for k in range(1, self.num_levels))
        self.enc_blocks = nn.ModuleList(
            nn.ModuleList(
                ResBlock(chans[max(k - 1, 0)] if i == 0 else chans[k], chans[k], emb, drop)
                for i in range(nrb)
            )
            for k in range(self.num_levels)
        )
        self.enc_attn = nn.ModuleList(
            nn.ModuleList(
                AttentionBlock(chans[k], num_heads) if attn[k] else nn.Identity() for _ in range(nrb)
            )
            for k in range(self.num_levels)
        )
        c_low = chans[-1]
        self.mid_block1 = ResBlock(c_low, c_low, emb, drop)
        self.mid_attn = AttentionBlock(c_low, num_heads) if attn[-1] else nn.Identity()
        self.mid_block2 = ResBlock(c_low, c_low, emb, drop)
        # Decoder level k reads [h, skip_k]: h has C_{k+1} channels (C_{L-1} from the bottleneck).
        self.dec_blocks = nn.ModuleList(
            nn.ModuleList(
                ResBlock(
                    (chans[min(k + 1, self.num_levels - 1)] + chans[k]) if i == 0 else chans[k],
                    chans[k],
                    emb,
                    drop,
                )
                for i in range(nrb)
            )
            for k in range(self.num_levels)
        )
        self.dec_attn = nn.ModuleList(
            nn.ModuleList(
                AttentionBlock(chans[k], num_heads) if attn[k] else nn.Identity() for _ in range(nrb)
            )
            for k in range(self.num_levels)
        )
        self.ups = nn.ModuleList(Upsample(chans[k]) for k in range(1, self.num_levels))
        self.out = output_head(chans[0], self.out_channels)

    # ------------------------------------------------------------------ checks
    def _check_input(self, x: object, channels: int, what: str) -> Tensor:
        f = self.downsample_factor
        return check_input(x, channels, what, f, why="2**(len(channel_mults)-1)", owner="MBDiffUNet")

    def _check_cond(self, cond: object, x_t: Tensor) -> tuple[Tensor, ...]:
        b, _, h, w = x_t.shape
        expected = [(b, c, h // 2**k, w // 2**k) for k, c in enumerate(self.level_channels)]
        feats = tuple(cond) if isinstance(cond, tuple | list) else (cond,)
        got = [tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__ for c in feats]
        if got != expected:
            raise ConfigError(
                f"MBDiffUNet: `cond` must be encode_condition(image) for images matching x_t {tuple(x_t.shape)} "
                f"(repeated per sample): expected shapes {expected}, got {got}"
            )
        return feats

    # ------------------------------------------------------------------ network
    def encode_condition(self, image: Tensor) -> tuple[Tensor, ...]:
        """The multi-scale image guidance, computed once per image.

        Args:
            image: (B, image_channels, H, W).

        Returns:
            ``(g^0, ..., g^{L-1})``, level k of shape (B, C_k, H/2**k, W/2**k), batch first.

        Raises:
            ValueError: wrong shape or channel count, or a size not divisible by :attr:`downsample_factor`.
        """
        return self.guidance(self._check_input(image, self.image_channels, "image"))

    def enable_aux_head(self) -> None:
        """Build the auxiliary segmentation head (``model.aux_seg``) on the guidance pyramid. Idempotent.

        MB-Diff's paper has no such head (off by default); the head
        (:class:`~diffseg_lightning.nets.aux_seg.MultiScaleSegHead`, ``aux_head``) reads the guidance
        features ``g^k``, the image branch.
        """
        if not hasattr(self, "aux_head"):
            self.aux_head = MultiScaleSegHead(self.level_channels, self.mask_channels)

    def aux_logits(self, cond: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """The head's logits from ``cond = encode_condition(image)``: (B, mask_channels, H, W)."""
        return self.aux_head(tuple(cond), size)

    def _run(self, x_t: Tensor, t: Tensor, guidance: Sequence[Tensor]) -> Tensor:
        emb = self.time_embed(t)
        h = self.stem(x_t)
        skips = []
        for k in range(self.num_levels):
            if k > 0:
                h = self.downs[k - 1](h)
            for block, attn in zip(self.enc_blocks[k], self.enc_attn[k], strict=True):
                h = attn(block(h, emb))
            h = h + guidance[k]  # the multi-scale image guidance of level k
            skips.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)
        for k in reversed(range(self.num_levels)):
            h = torch.cat([h, skips[k]], dim=1)
            for block, attn in zip(self.dec_blocks[k], self.dec_attn[k], strict=True):
                h = attn(block(h, emb))
            if k > 0:
                h = self.ups[k - 1](h)
        return self.out(h)

    def forward(self, x_t: Tensor, t: Tensor | int | float, cond: Sequence[Tensor]) -> Tensor:
        """Predict from the noisy mask, the timestep and the cached guidance.

        Args:
            x_t: (B, mask_channels, H, W) noisy mask.
            t: (B,) timesteps (a scalar is broadcast).
            cond: ``encode_condition(image)`` (repeated along dim 0 to match B for several samples).

        Returns:
            (B, out_channels, H, W).

        Raises:
            ValueError: a wrong shape of x_t, t or cond, or a size not divisible by :attr:`downsample_factor`.
        """
        x_t = self._check_input(x_t, self.mask_channels, "x_t")
        return self._run(x_t, batch_timesteps(t, x_t, owner="MBDiffUNet"), self._check_cond(cond, x_t))

    def forward_with_image(self, x_t: Tensor, t: Tensor | int | float, image: Tensor) -> Tensor:
        """Un-split forward (the guidance is computed inside); equal to ``forward(x_t, t, encode_condition(image))``.

        Args:
            x_t: (B, mask_channels, H, W) noisy mask.
            t: (B,) timesteps.
            image: (B, image_channels, H, W).

        Returns:
            (B, out_channels, H, W).
        """
        return self.forward(x_t, t, self.encode_condition(image))
