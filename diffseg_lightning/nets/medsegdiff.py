"""The MedSegDiff denoiser: a conditional U-Net with dynamic conditional encoding and FF-Parser.

Wu et al., "MedSegDiff: Medical Image Segmentation with Diffusion Probabilistic Model",
MIDL 2023.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.nets.aux_seg import MultiScaleSegHead
from diffseg_lightning.nets.blocks import (
    AttentionBlock,
    Downsample,
    DynamicConditionalEncoding,
    FFParser,
    ResBlock,
    ResidualStage,
    TimestepEmbedding,
    batch_timesteps,
    check_input,
    conv3x3,
    decoder_stages,
    output_head,
)

__all__ = ["MedSegDiffUNet"]


class MedSegDiffUNet(nn.Module):
    """MedSegDiff denoiser ``eps_theta(x_t, t, I)`` (or x_0 predictor, depending on the method).

    Wu et al., "MedSegDiff: Medical Image Segmentation with Diffusion Probabilistic
    Model", MIDL 2023. Two encoders run side by side, stage by stage at the same
    resolutions (level k has ``base_channels * channel_mults[k]`` channels at spatial size
    ``(H, W) / 2**k``):

    - the mask encoder E^x on the noisy mask x_t, residual blocks with the timestep
      embedding (and self-attention at the levels flagged in ``attention_levels``);
    - the condition encoder E^I on the image I: ResNet-like stages without timestep.

    At the end of each encoder stage k (the paper leaves the exact wiring open; these
    are our choices):

    1. FF-Parser on the mask feature: ``m_x^k <- FFParser_k(m_x^k)``; the mask stream
       continues from this filtered feature (``ff_parser=False`` skips it).
    2. Dynamic conditional encoding:
       ``e_I^k = m_I^k + A(m_I^k, m_x^k)``, ``A = (LN(m_I) ⊙ LN(m_x)) ⊙ m_I``
       (:class:`~diffseg_lightning.nets.blocks.DynamicConditionalEncoding`).
    3. With ``dynamic_encoding=True`` (the paper) the condition encoder's next stage reads
       ``e_I^k``, so the image stream sees the current segmentation estimate. With
       ``False`` ("static", a speed variant) it reads ``m_I^k``: the image stream never
       sees x_t and can be computed once per image.
    4. The decoder receives E^I + E^x (paper: ``eps = D((E_t^I + E_t^x, t), t)``): the skip
       of level k is ``m_x^k + e_I^k``, and the bottleneck input is the skip of the last
       level. The decoder is a U-Net decoder with timestep embedding: at level k
       (from the lowest up) it concatenates the skip, applies ``num_res_blocks``
       residual blocks (+ attention where flagged), then upsamples. The bottleneck is
       residual block, attention (if ``attention_levels[-1]``), residual block.

    The output convolution is zero-initialised (the network starts by predicting 0); no
    other layer is, so after the first optimiser step every parameter receives a
    gradient.

    Split for sampling (DESIGN "Sampling cost"): ``encode_condition(image)`` returns
    everything that does not depend on x_t, and ``forward(x_t, t, cond)`` the rest.
    With ``dynamic_encoding=True`` that is only the condition stem output; with
    ``False`` it is every condition-encoder stage feature ``m_I^k``. The result is
    identical to the un-split computation (:meth:`forward_with_image`). ``cond`` is a tuple
    of batch-first tensors, so S samples per image are drawn by
    ``tuple(c.repeat_interleave(S, 0) for c in cond)``.

    Args:
        image_channels: channels of the conditioning image I.
        mask_channels: channels of the noisy mask x_t.
        out_channels: output channels (default ``mask_channels``; ``2 * mask_channels`` for
            a learned variance).
        base_channels: channels at the first level; the timestep embedding has
            ``4 * base_channels`` dimensions.
        channel_mults: channel multiplier per level; ``len(channel_mults)`` levels, so the
            input is downsampled ``len(channel_mults) - 1`` times.
        num_res_blocks: residual blocks per level (in each encoder and in the decoder).
        attention_levels: one flag per level: self-attention in the mask encoder and the
            decoder at that level (the last flag also controls the bottleneck attention).
        num_heads: attention heads (every attended width must be divisible by it).
        dropout: residual-block dropout.
        dynamic_encoding: feed the fused feature into the condition encoder (the paper);
            ``False`` makes the image stream independent of x_t (cacheable).
        ff_parser: apply the FF-Parser to the mask features at every level.
        ff_parser_size: reference *input* size (H, W) (an int for square) at which the
            FF-Parser maps are parameterised; level k's map is defined on the rfft grid of
            ``(H, W) / 2**k`` and resampled for other input sizes.

    Attributes:
        image_channels, mask_channels, out_channels: as above.
        downsample_factor: ``2 ** (len(channel_mults) - 1)``; H and W must be divisible by it.

    Raises:
        ValueError: on inconsistent hyper-parameters.
    """

    def __init__(
        self,
        image_channels: int = 1,
        mask_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 1,
        attention_levels: Sequence[bool] = (False, False, True),
        num_heads: int = 4,
        dropout: float = 0.0,
        dynamic_encoding: bool = True,
        ff_parser: bool = True,
        ff_parser_size: int | Sequence[int] = 64,
    ) -> None:
        super().__init__()
        # Hydra may pass ListConfig / list for the sequences.
        mults = tuple(int(m) for m in channel_mults)
        attn_levels = tuple(bool(a) for a in attention_levels)
        if len(mults) < 1 or any(m < 1 for m in mults):
            raise ConfigError(f"channel_mults must be a non-empty sequence of positive ints, got {mults}")
        if len(attn_levels) != len(mults):
            raise ConfigError(
                f"attention_levels needs one flag per level: got {len(attn_levels)} flags for "
                f"{len(mults)} channel_mults"
            )
        for name, value in (
            ("image_channels", image_channels),
            ("mask_channels", mask_channels),
            ("base_channels", base_channels),
            ("num_res_blocks", num_res_blocks),
            ("num_heads", num_heads),
        ):
            if int(value) < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        if isinstance(ff_parser_size, int):
            ref_size = (int(ff_parser_size), int(ff_parser_size))
        else:
            ref_size = tuple(int(s) for s in ff_parser_size)
            if len(ref_size) != 2:
                raise ConfigError(f"ff_parser_size must be an int or (H, W), got {ref_size}")

        self.image_channels = int(image_channels)
        self.mask_channels = int(mask_channels)
        self.out_channels = int(out_channels) if out_channels is not None else self.mask_channels
        self.base_channels = int(base_channels)
        self.channel_mults = mults
        self.attention_levels = attn_levels
        self.num_res_blocks = int(num_res_blocks)
        self.dynamic_encoding = bool(dynamic_encoding)
        self.use_ff_parser = bool(ff_parser)
        self.num_levels = len(mults)
        self.downsample_factor = 2 ** (self.num_levels - 1)
        if self.use_ff_parser and (
            ref_size[0] % self.downsample_factor or ref_size[1] % self.downsample_factor
        ):
            raise ConfigError(
                f"ff_parser_size {ref_size} must be divisible by the downsampling factor "
                f"{self.downsample_factor} (= 2**(len(channel_mults)-1))"
            )
        self.ff_parser_size = ref_size

        chans = [self.base_channels * m for m in mults]
        self.level_channels = tuple(chans)
        emb_dim = 4 * self.base_channels
        nrb = self.num_res_blocks
        drop = float(dropout)

        self.time_embed = TimestepEmbedding(self.base_channels, emb_dim)

        # Mask encoder E^x.
        self.mask_stem = conv3x3(self.mask_channels, chans[0])
        self.mask_down = nn.ModuleList(Downsample(chans[k - 1]) for k in range(1, self.num_levels))
        self.mask_stages = nn.ModuleList(
            ResidualStage(
                chans[k - 1] if k > 0 else chans[0], chans[k], emb_dim, nrb, attn_levels[k], num_heads, drop
            )
            for k in range(self.num_levels)
        )
        # Condition encoder E^I (no timestep).
        self.cond_stem = conv3x3(self.image_channels, chans[0])
        self.cond_down = nn.ModuleList(Downsample(chans[k - 1]) for k in range(1, self.num_levels))
        self.cond_stages = nn.ModuleList(
            nn.Sequential(
                *(
                    ResBlock(
                        (chans[k - 1] if k > 0 else chans[0]) if i == 0 else chans[k], chans[k], None, drop
                    )
                    for i in range(nrb)
                )
            )
            for k in range(self.num_levels)
        )
        # Per-level FF-Parser and dynamic conditional encoding.
        self.ff_parsers = nn.ModuleList(
            FFParser(chans[k], (ref_size[0] // 2**k, ref_size[1] // 2**k))
            if self.use_ff_parser
            else nn.Identity()
            for k in range(self.num_levels)
        )
        self.fusions = nn.ModuleList(DynamicConditionalEncoding(chans[k]) for k in range(self.num_levels))

        # Bottleneck.
        c_low = chans[-1]
        self.mid_block1 = ResBlock(c_low, c_low, emb_dim, drop)
        self.mid_attn = AttentionBlock(c_low, num_heads) if attn_levels[-1] else nn.Identity()
        self.mid_block2 = ResBlock(c_low, c_low, emb_dim, drop)

        # Decoder: index k is level k (built in level order, run from the lowest level up).
        self.up_stages, self.upsamples = decoder_stages(chans, emb_dim, nrb, attn_levels, num_heads, drop)

        self.out = output_head(chans[0], self.out_channels)

    # ------------------------------------------------------------------ validation
    def _check_input(self, x: Tensor, channels: int, what: str) -> Tensor:
        why = f"2**(len(channel_mults)-1) for channel_mults={self.channel_mults}"
        return check_input(x, channels, what, self.downsample_factor, why=why)

    def _cond_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
        if self.dynamic_encoding:
            return [(batch, self.level_channels[0], height, width)]
        return [(batch, c, height // 2**k, width // 2**k) for k, c in enumerate(self.level_channels)]

    def _check_cond(self, cond: Tensor | Sequence[Tensor], x_t: Tensor) -> tuple[Tensor, ...]:
        feats = (cond,) if isinstance(cond, Tensor) else tuple(cond)
        expected = self._cond_shapes(x_t.shape[0], x_t.shape[-2], x_t.shape[-1])
        got = [tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__ for c in feats]
        if got != expected:
            raise ConfigError(
                f"`cond` must be what encode_condition(image) returns for this network "
                f"(dynamic_encoding={self.dynamic_encoding}) and match x_t {tuple(x_t.shape)}: "
                f"expected shapes {expected}, got {got}"
            )
        return feats

    # ------------------------------------------------------------------ condition encoder
    def _cond_stage(self, k: int, h: Tensor) -> Tensor:
        """Condition-encoder stage k: (downsample) + residual blocks; (B, c_{k-1}, ...) -> m_I^k."""
        if k > 0:
            h = self.cond_down[k - 1](h)
        return self.cond_stages[k](h)

    def encode_condition(self, image: Tensor) -> tuple[Tensor, ...]:
        """Everything of the image branch that does not depend on x_t (run once per image).

        Args:
            image: (B, image_channels, H, W) conditioning image.

        Returns:
            With ``dynamic_encoding=True``: ``(stem,)``, the condition stem output
            (B, base_channels, H, W). With ``False``: the condition features of every level,
            ``(m_I^0, ..., m_I^{L-1})`` with shapes (B, C_k, H/2**k, W/2**k). All batch-first.

        Raises:
            ValueError: wrong channel count ("expected N image channels, got M") or a
                size not divisible by :attr:`downsample_factor`.
        """
        self._check_input(image, self.image_channels, "image")
        h = self.cond_stem(image)
        if self.dynamic_encoding:
            return (h,)
        feats = []
        for k in range(self.num_levels):
            h = self._cond_stage(k, h)
            feats.append(h)
        return tuple(feats)

    # ------------------------------------------------------------------ auxiliary segmentation head
    def enable_aux_head(self) -> None:
        """Build the auxiliary segmentation head (``model.aux_seg``); without it the network is unchanged.

        The head (:class:`~diffseg_lightning.nets.aux_seg.MultiScaleSegHead`, ``aux_head``) reads the
        condition encoder E^I, the image branch that MedSegDiff's release supervises directly (its
        ``loss_cal``). Idempotent.
        """
        if not hasattr(self, "aux_head"):
            self.aux_head = MultiScaleSegHead(self.level_channels, self.mask_channels)

    def aux_logits(self, cond: Tensor | Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """The head's segmentation logits from the image branch alone (no x_t), for the aux loss and blend.

        The head reads the condition features ``m_I^k`` of the static chain, ``m_I^k = E^I_k(m_I^{k-1})``
        from the stem: with ``dynamic_encoding=False`` they are ``cond`` itself; with ``True`` (the paper)
        they are computed here with the same stage weights, where the denoiser's own chain reads the
        fused ``e_I^{k-1}`` instead (the release's head, a separate U-Net, also sees mask features; ours
        stays independent of x_t, so it runs once per image). The loss on it trains the shared stages.

        Args:
            cond: ``encode_condition(image)``.
            size: (H, W) of the image.

        Returns:
            (B, mask_channels, H, W) logits.
        """
        feats = (cond,) if isinstance(cond, Tensor) else tuple(cond)
        if self.dynamic_encoding:
            h, chain = feats[0], []
            for k in range(self.num_levels):
                h = self._cond_stage(k, h)
                chain.append(h)
            feats = tuple(chain)
        return self.aux_head(feats, size)

    # ------------------------------------------------------------------ network
    def _encode(
        self, x_t: Tensor, emb: Tensor, stem: Tensor | None, cached: tuple[Tensor, ...] | None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Both encoders and the fusion; returns (mask features, condition features m_I^k, fused e_I^k)."""
        h = self.mask_stem(x_t)
        h_cond = stem
        mask_feats: list[Tensor] = []
        cond_feats: list[Tensor] = []
        fused_feats: list[Tensor] = []
        for k in range(self.num_levels):
            if k > 0:
                h = self.mask_down[k - 1](h)
            h = self.ff_parsers[k](self.mask_stages[k](h, emb))
            m_cond = cached[k] if cached is not None else self._cond_stage(k, h_cond)
            e_cond = self.fusions[k](m_cond, h)
            h_cond = e_cond if self.dynamic_encoding else m_cond
            mask_feats.append(h)
            cond_feats.append(m_cond)
            fused_feats.append(e_cond)
        return mask_feats, cond_feats, fused_feats

    def _decode(self, skips: list[Tensor], emb: Tensor) -> Tensor:
        h = skips[-1]
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)
        for k in reversed(range(self.num_levels)):
            h = self.up_stages[k](torch.cat([h, skips[k]], dim=1), emb)
            if k > 0:
                h = self.upsamples[k - 1](h)
        return self.out(h)

    def _run(self, x_t: Tensor, t: Tensor, stem: Tensor | None, cached: tuple[Tensor, ...] | None) -> Tensor:
        emb = self.time_embed(t)
        mask_feats, _, fused = self._encode(x_t, emb, stem, cached)
        skips = [m + e for m, e in zip(mask_feats, fused, strict=True)]
        return self._decode(skips, emb)

    def _split_cond(self, cond: Tensor | Sequence[Tensor], x_t: Tensor) -> tuple[Tensor | None, tuple | None]:
        feats = self._check_cond(cond, x_t)
        return (feats[0], None) if self.dynamic_encoding else (None, feats)

    def forward(self, x_t: Tensor, t: Tensor | int | float, cond: Tensor | Sequence[Tensor]) -> Tensor:
        """Predict from the noisy mask, the timestep and the cached condition.

        Args:
            x_t: (B, mask_channels, H, W) noisy mask.
            t: (B,) timesteps (long or float; a scalar is broadcast).
            cond: ``encode_condition(image)`` for the same batch (possibly repeated with
                ``repeat_interleave`` along dim 0 to match B).

        Returns:
            (B, out_channels, H, W).

        Raises:
            ValueError: wrong x_t shape, size not divisible by :attr:`downsample_factor`,
                wrong t shape, or ``cond`` not matching this network and x_t.
        """
        self._check_input(x_t, self.mask_channels, "x_t mask")
        t = batch_timesteps(t, x_t)
        stem, cached = self._split_cond(cond, x_t)
        return self._run(x_t, t, stem, cached)

    def forward_with_image(self, x_t: Tensor, t: Tensor, image: Tensor) -> Tensor:
        """Un-split forward: the condition encoder runs inside, stage by stage, on the image.

        Equal to ``forward(x_t, t, encode_condition(image))``; convenient where every image is
        used once (training) and the reference for the split's correctness.

        Args:
            x_t: (B, mask_channels, H, W) noisy mask.
            t: (B,) timesteps.
            image: (B, image_channels, H, W) conditioning image.

        Returns:
            (B, out_channels, H, W).
        """
        self._check_input(x_t, self.mask_channels, "x_t mask")
        self._check_input(image, self.image_channels, "image")
        if image.shape[0] != x_t.shape[0] or image.shape[-2:] != x_t.shape[-2:]:
            raise ConfigError(
                f"image {tuple(image.shape)} does not match x_t {tuple(x_t.shape)} in batch or size"
            )
        t = batch_timesteps(t, x_t)
        return self._run(x_t, t, self.cond_stem(image), None)

    def encoder_features(
        self, x_t: Tensor, t: Tensor, cond: Tensor | Sequence[Tensor]
    ) -> dict[str, tuple[Tensor, ...]]:
        """The per-level encoder features, for inspection and tests.

        Args:
            x_t: (B, mask_channels, H, W) noisy mask.
            t: (B,) timesteps.
            cond: ``encode_condition(image)``.

        Returns:
            A dict of L-tuples, level k of shape (B, C_k, H/2**k, W/2**k): ``"mask"`` the
            mask-branch features m_x^k (after the FF-Parser), ``"condition"`` the
            condition-encoder outputs m_I^k, ``"fused"`` e_I^k = m_I^k + A(m_I^k, m_x^k).
        """
        self._check_input(x_t, self.mask_channels, "x_t mask")
        t = batch_timesteps(t, x_t)
        stem, cached = self._split_cond(cond, x_t)
        mask_feats, cond_feats, fused = self._encode(x_t, self.time_embed(t), stem, cached)
        return {"mask": tuple(mask_feats), "condition": tuple(cond_feats), "fused": tuple(fused)}
