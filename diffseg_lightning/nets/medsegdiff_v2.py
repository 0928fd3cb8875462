"""The MedSegDiff-V2 denoiser: a diffusion U-Net with an anchor condition (U-SA) and an SS-Former.

Wu, Ji, Fu, Xu, Jin and Xu, "MedSegDiff-V2: Diffusion based Medical Image Segmentation with
Transformer", arXiv 2301.11798 (AAAI 2024).

Two conditioning paths connect a condition model (a segmentation U-Net on the image) to the diffusion
U-Net on the noisy mask x_t:

- the anchor condition, "uncertain spatial attention" (U-SA): the condition model's segmentation
  ``f_c^{-1}`` is smoothed by a Gaussian kernel with a learnable standard deviation,
  ``f_anc = Max(f_c^{-1} * k_Gauss, f_c^{-1})``, and gates the diffusion encoder's first-stage feature,
  ``f_d'^0 = Sigmoid(f_anc * k_Conv1x1) . f_d^0 + f_d^0`` (:class:`UncertainSpatialAttention`);
- the semantic condition: the spectrum-space transformer (SS-Former) cross-attends between the
  diffusion bottleneck feature and the condition model's deepest feature, in the spatial domain and in
  the frequency domain, the frequency-domain attention filtered by a learnable, timestep-adaptive
  neural band-pass filter (NBP-Filter) (:class:`SSFormer`, :class:`SpectrumSpaceAttention`,
  :class:`NeuralBandPassFilter`).

The authors' released code contains neither path; everything here is written from the paper's text and
equations, and every choice the paper leaves open is listed in :class:`MedSegDiffV2UNet`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.nets.blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    ResidualStage,
    TimestepEmbedding,
    Upsample,
    batch_timesteps,
    check_input,
    conv3x3,
    decoder_stages,
    norm_groups,
    output_head,
)

__all__ = [
    "MedSegDiffV2UNet",
    "NeuralBandPassFilter",
    "SSFormer",
    "SSFormerBlock",
    "SpectrumSpaceAttention",
    "UncertainSpatialAttention",
    "band_pass_tokens",
    "gaussian_kernel1d",
]

#: Keys of the condition dict returned by :meth:`MedSegDiffV2UNet.encode_condition`.
COND_KEYS = ("anchor_logits", "anchor_gate", "semantic")


# ============================================================================ anchor condition (U-SA)
def gaussian_kernel1d(sigma: Tensor, radius: int) -> Tensor:
    """Normalised, truncated 1D Gaussian kernels, built from (learnable) standard deviations.

    ``g_c(x) = exp(-x^2 / (2 sigma_c^2)) / sum_x exp(...)`` for integer ``x`` in ``[-radius, radius]``:
    the kernel of ``scipy.ndimage.gaussian_filter`` with ``truncate = radius / sigma`` (scipy also
    normalises the truncated kernel to sum 1). Differentiable in ``sigma``.

    Args:
        sigma: (C,) positive standard deviations, in pixels.
        radius: kernel half-width r >= 0; the kernel has 2r+1 taps.

    Returns:
        (C, 2r+1) kernels, each summing to 1, in the dtype of ``sigma``.
    """
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    logits = -(x[None, :] ** 2) / (2.0 * sigma[:, None] ** 2)
    # softmax = exp(.) / sum exp(.): the normalised Gaussian, stable for any sigma.
    return torch.softmax(logits, dim=-1)


class UncertainSpatialAttention(nn.Module):
    """Anchor condition of MedSegDiff-V2: "uncertain spatial attention" (U-SA) from a coarse segmentation.

    Wu et al., "MedSegDiff-V2: Diffusion based Medical Image Segmentation with Transformer",
    arXiv 2301.11798, Sec. "Anchor Condition with Gaussian Spatial Attention"::

        f_anc   = Max(f_c^{-1} * k_Gauss, f_c^{-1})
        f_d'^0  = Sigmoid(f_anc * k_Conv1x1) . f_d^0 + f_d^0

    with ``*`` a sliding-window convolution and ``.`` the element-wise product broadcast over the
    channels of ``f_d^0``. :meth:`forward` returns the attention map ``Sigmoid(f_anc * k_Conv1x1)``
    (B, 1, H, W); :meth:`inject` applies it. Both depend only on the image, so the denoiser computes the
    map in ``encode_condition``.

    Choices (the paper leaves them open):

    - ``f_c^{-1}`` is the condition model's per-class segmentation *probability* ``sigmoid(logits)``
      (one channel per class, as the project's masks; classes may overlap, so no softmax). On values in
      [0, 1], ``Max(smoothed, raw)`` is a soft dilation: the blurred border of the predicted region (the
      uncertain zone) is raised while confident pixels keep their value.
    - One learnable standard deviation per class channel, stored as ``log_sigma`` (so sigma > 0); the
      kernel is built from it inside :meth:`forward` as a tensor operation (no module is created), with
      a fixed support of ``kernel_size`` taps (the radius cannot follow sigma without a host sync), a
      zero mean (centred kernel), and normalised to sum 1 over its support.
    - Zero padding at the image border (``scipy.ndimage`` mode ``constant``): outside the image is
      background.

    Args:
        channels: C, channels of the anchor (classes of the condition model's segmentation).
        kernel_size: odd number of taps per axis, 2r+1.
        sigma: initial standard deviation (pixels), > 0.

    Raises:
        ValueError: for an even or non-positive ``kernel_size``, a non-positive ``sigma`` or ``channels``.
    """

    def __init__(self, channels: int, kernel_size: int = 7, sigma: float = 1.0) -> None:
        super().__init__()
        if int(channels) < 1:
            raise ConfigError(f"UncertainSpatialAttention: channels must be >= 1, got {channels}")
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise ConfigError(
                f"UncertainSpatialAttention: kernel_size must be a positive odd int, got {kernel_size}"
            )
        if not float(sigma) > 0.0:
            raise ConfigError(f"UncertainSpatialAttention: sigma must be > 0, got {sigma}")
        self.channels = int(channels)
        self.kernel_size = int(kernel_size)
        self.radius = self.kernel_size // 2
        self.log_sigma = nn.Parameter(torch.full((self.channels,), math.log(float(sigma))))
        self.proj = nn.Conv2d(self.channels, 1, kernel_size=1)  # k_Conv1x1: C channels -> 1 map

    @property
    def sigma(self) -> Tensor:
        """(C,) current standard deviations (pixels)."""
        return self.log_sigma.exp()

    def kernel(self) -> Tensor:
        """The 2D Gaussian kernels, the outer product of the 1D ones.

        Returns:
            (C, 1, K, K) depthwise-convolution weight, each kernel summing to 1.
        """
        g = gaussian_kernel1d(self.sigma, self.radius)  # (C, K)
        return (g[:, :, None] * g[:, None, :])[:, None]

    def smooth(self, anchor: Tensor) -> Tensor:
        """``anchor * k_Gauss``: depthwise Gaussian smoothing with zero padding.

        Args:
            anchor: (B, C, H, W).

        Returns:
            (B, C, H, W).
        """
        weight = self.kernel().to(anchor.dtype)
        return F.conv2d(anchor, weight, padding=self.radius, groups=self.channels)

    def anchor_feature(self, anchor_logits: Tensor) -> Tensor:
        """``f_anc = Max(f_c^{-1} * k_Gauss, f_c^{-1})`` with ``f_c^{-1} = sigmoid(anchor_logits)``.

        Args:
            anchor_logits: (B, C, H, W) the condition model's segmentation logits.

        Returns:
            (B, C, H, W) in [0, 1].
        """
        if anchor_logits.ndim != 4 or anchor_logits.shape[1] != self.channels:
            raise ConfigError(
                f"UncertainSpatialAttention expects anchor logits of shape (B, {self.channels}, H, W), "
                f"got {tuple(anchor_logits.shape)}"
            )
        prob = torch.sigmoid(anchor_logits)
        return torch.maximum(self.smooth(prob), prob)

    def forward(self, anchor_logits: Tensor) -> Tensor:
        """The spatial attention map ``Sigmoid(f_anc * k_Conv1x1)``.

        Args:
            anchor_logits: (B, C, H, W) the condition model's segmentation logits.

        Returns:
            (B, 1, H, W) gate in (0, 1).
        """
        return torch.sigmoid(self.proj(self.anchor_feature(anchor_logits)))

    @staticmethod
    def inject(feature: Tensor, gate: Tensor) -> Tensor:
        """``f_d'^0 = gate . f_d^0 + f_d^0`` (the gate broadcast over the channels).

        Args:
            feature: (B, C_d, H, W) diffusion-encoder feature f_d^0.
            gate: (B, 1, H, W) attention map from :meth:`forward`.

        Returns:
            (B, C_d, H, W).
        """
        return feature * gate + feature


# ============================================================================ semantic condition (SS-Former)
class NeuralBandPassFilter(nn.Module):
    """Neural band-pass filter (NBP-Filter) of MedSegDiff-V2's SS-Former, adaptive to the timestep.

    Wu et al., "MedSegDiff-V2: Diffusion based Medical Image Segmentation with Transformer",
    arXiv 2301.11798: a learnable filter applied to the frequency-domain attention that "learns to pass
    a specific spectrum while constraining the others", and adapts to the diffusion step (the noise
    spectrum changes with t).

    Our parameterisation (the paper fixes the idea, not the layers): a coordinate network over the
    2D frequency plane. Each frequency ``(f_y, f_x)`` of the ``(H, W)`` grid (``torch.fft.fftfreq``
    units, in [-1/2, 1/2)) enters as the even features ``(2|f_y|, 2|f_x|)`` in [0, 1]; a linear layer
    lifts them to ``hidden`` channels, then ``num_blocks`` blocks of Linear -> LayerNorm -> FiLM by the
    timestep embedding (``h * (1 + s) + b``, ``(s, b) = Linear(SiLU(emb))``) -> ReLU, and a final
    Linear + sigmoid give ``num_filters`` maps in (0, 1). Because the inputs are even in the frequency,
    ``A(f) = A(-f)``: filtering a real signal keeps it real, so the filter lives on the one-sided
    (``rfft``) grid. Nothing depends on the spatial size: the same network evaluates at any resolution.

    Args:
        emb_channels: timestep-embedding dimension.
        num_filters: output maps (e.g. 2 x heads: one for queries and one for keys per head).
        hidden: width of the coordinate network.
        num_blocks: FiLM blocks (>= 1, so that the filter depends on t).

    Raises:
        ValueError: for a non-positive size.
    """

    def __init__(self, emb_channels: int, num_filters: int, hidden: int = 32, num_blocks: int = 2) -> None:
        super().__init__()
        for name, value in (
            ("emb_channels", emb_channels),
            ("num_filters", num_filters),
            ("hidden", hidden),
            ("num_blocks", num_blocks),
        ):
            if int(value) < 1:
                raise ConfigError(f"NeuralBandPassFilter: {name} must be >= 1, got {value}")
        self.num_filters = int(num_filters)
        hidden = int(hidden)
        self.lift = nn.Linear(2, hidden)
        self.linears = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(int(num_blocks)))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(int(num_blocks)))
        self.films = nn.ModuleList(nn.Linear(int(emb_channels), 2 * hidden) for _ in range(int(num_blocks)))
        self.head = nn.Linear(hidden, self.num_filters)
        self.act = nn.SiLU()

    @staticmethod
    def frequency_features(height: int, width: int, onesided: bool, device, dtype) -> Tensor:
        """The network's inputs ``(2|f_y|, 2|f_x|)`` on the FFT grid.

        Args:
            height: H.
            width: W.
            onesided: the ``rfft2`` grid (H, W//2+1) if True, the full ``fft2`` grid (H, W) if False.
            device: device of the result.
            dtype: floating dtype of the result.

        Returns:
            (H, W', 2) with W' = W//2+1 or W.
        """
        fy = torch.fft.fftfreq(height, device=device, dtype=dtype).abs()
        fx = (torch.fft.rfftfreq if onesided else torch.fft.fftfreq)(width, device=device, dtype=dtype).abs()
        grid = torch.stack(torch.broadcast_tensors(fy[:, None], fx[None, :]), dim=-1)
        return 2.0 * grid

    def forward(self, emb: Tensor, height: int, width: int, onesided: bool = True) -> Tensor:
        """Evaluate the filters on the frequency grid of an (H, W) feature map.

        Args:
            emb: (B, emb_channels) timestep embedding.
            height: H.
            width: W.
            onesided: the ``rfft2`` grid (default) or the full ``fft2`` grid.

        Returns:
            (B, num_filters, H, W//2+1) (or (B, num_filters, H, W)) filter values in (0, 1).
        """
        coords = self.frequency_features(height, width, onesided, emb.device, self.lift.weight.dtype)
        w_out = coords.shape[1]
        h = self.lift(coords.reshape(1, -1, 2))  # (1, P, hidden), P frequencies
        for linear, norm, film in zip(self.linears, self.norms, self.films, strict=True):
            scale, shift = film(self.act(emb))[:, None, :].chunk(2, dim=-1)  # (B, 1, hidden) each
            h = torch.relu(norm(linear(h)) * (1 + scale) + shift)  # (B, P, hidden)
        out = torch.sigmoid(self.head(h))  # (B, P, F)
        return out.transpose(1, 2).reshape(emb.shape[0], self.num_filters, height, w_out)


def band_pass_tokens(x: Tensor, filt: Tensor, size: tuple[int, int]) -> Tensor:
    """``F^{-1}[A . F[x]]`` along the token axis of multi-head tokens laid out on an (H, W) grid.

    ``F`` is the 2D DFT over the token grid (the spatial axes), taken per head and per feature
    dimension; ``A`` a real filter on the one-sided (``rfft2``) grid, even in the frequency, so the
    result is real. Runs in float32 (half-precision FFTs are restricted on CUDA) and returns the input
    dtype.

    Args:
        x: (B, heads, N, d) tokens, N = H * W in row-major order.
        filt: (B, heads, H, W//2+1) real filter.
        size: (H, W).

    Returns:
        (B, heads, N, d) filtered tokens.
    """
    batch, heads, n, d = x.shape
    height, width = size
    grid = x.float().transpose(-1, -2).reshape(batch, heads, d, height, width)
    spec = torch.fft.rfft2(grid) * filt.float()[:, :, None]
    out = torch.fft.irfft2(spec, s=(height, width))
    return out.reshape(batch, heads, d, n).transpose(-1, -2).to(x.dtype)


class SpectrumSpaceAttention(nn.Module):
    """Cross-attention in the spatial and in the frequency domain (one half of an SS-Former block).

    Wu et al., "MedSegDiff-V2: Diffusion based Medical Image Segmentation with Transformer",
    arXiv 2301.11798, SS-Former. Queries come from one stream, keys and values from the other
    (``q = W_q x``, ``k = W_k y``, ``v = W_v y``, ``heads`` heads of width ``d``). Two branches share
    the projections:

    - spatial: ``softmax(q k^T / sqrt(d)) v``;
    - frequency: the attention affinity is formed in the frequency domain, ``M = F[q] F[k]^T`` (F the
      2D DFT over the token grid, applied to every feature column), filtered by the NBP-Filter
      ``A(w_q, w_k; t) = a_q(w_q; t) a_k(w_k; t)`` and brought back, ``S = F^{-1}[A . M]`` (inverse DFT
      on both axes), then ``softmax(S / sqrt(d)) v``.

    Because ``A`` is a product, ``F^{-1}[A . F[q] F[k]^T] = q~ k~^T`` with ``q~ = F^{-1}[a_q . F[q]]``
    and ``k~ = F^{-1}[a_k . F[k]]`` (the DFT is linear); the frequency branch is computed that way, in
    O(N d log N) plus one fused ``scaled_dot_product_attention`` instead of an N x N complex map (the
    test checks it against the explicit N x N formula). With an all-pass filter (A = 1) the frequency
    branch equals the spatial branch exactly. The output is ``W_o(spatial + frequency)``.

    Written here rather than with ``nn.MultiheadAttention``, which does not expose q and k for the
    frequency branch.

    Args:
        channels: C, width of both streams (divisible by ``heads``).
        heads: attention heads.
        emb_channels: timestep-embedding dimension (for the NBP-Filter).
        nbp_hidden: width of the NBP-Filter network.
        nbp_blocks: FiLM blocks of the NBP-Filter network.

    Raises:
        ValueError: if ``channels`` is not divisible by ``heads``.
    """

    def __init__(
        self, channels: int, heads: int, emb_channels: int, nbp_hidden: int = 32, nbp_blocks: int = 2
    ) -> None:
        super().__init__()
        if int(heads) < 1 or int(channels) % int(heads) != 0:
            raise ConfigError(
                f"SS-Former attention needs channels divisible by heads, got channels={channels}, heads={heads}"
            )
        self.channels = int(channels)
        self.heads = int(heads)
        self.head_dim = self.channels // self.heads
        self.to_q = nn.Linear(self.channels, self.channels)
        self.to_k = nn.Linear(self.channels, self.channels)
        self.to_v = nn.Linear(self.channels, self.channels)
        self.to_out = nn.Linear(self.channels, self.channels)
        self.nbp = NeuralBandPassFilter(emb_channels, 2 * self.heads, nbp_hidden, nbp_blocks)

    def _split(self, tokens: Tensor) -> Tensor:
        batch, n, _ = tokens.shape
        return tokens.reshape(batch, n, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, N, d)

    def _merge(self, tokens: Tensor) -> Tensor:
        batch, _, n, _ = tokens.shape
        return tokens.transpose(1, 2).reshape(batch, n, self.channels)

    def project(self, query: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Multi-head projections.

        Args:
            query: (B, N, C) query-stream tokens.
            context: (B, N, C) key/value-stream tokens.

        Returns:
            q, k, v, each (B, heads, N, d).
        """
        return self._split(self.to_q(query)), self._split(self.to_k(context)), self._split(self.to_v(context))

    def filters(self, emb: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The NBP-Filter factors for queries and keys.

        Args:
            emb: (B, emb_channels) timestep embedding.
            size: token grid (H, W).

        Returns:
            a_q, a_k, each (B, heads, H, W//2+1) in (0, 1).
        """
        filt = self.nbp(emb, *size)
        return filt[:, : self.heads], filt[:, self.heads :]

    def branches(
        self, query: Tensor, context: Tensor, emb: Tensor, size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """The spatial and the frequency branch, before the output projection.

        Args:
            query: (B, N, C) query-stream tokens on the (H, W) grid.
            context: (B, N, C) key/value-stream tokens on the same grid.
            emb: (B, emb_channels) timestep embedding.
            size: (H, W), N = H * W.

        Returns:
            (spatial, frequency), each (B, N, C).
        """
        q, k, v = self.project(query, context)
        spatial = F.scaled_dot_product_attention(q, k, v)
        a_q, a_k = self.filters(emb, size)
        frequency = F.scaled_dot_product_attention(
            band_pass_tokens(q, a_q, size), band_pass_tokens(k, a_k, size), v
        )
        return self._merge(spatial), self._merge(frequency)

    def forward(self, query: Tensor, context: Tensor, emb: Tensor, size: tuple[int, int]) -> Tensor:
        """``W_o(spatial + frequency)``.

        Args:
            query: (B, N, C) query-stream tokens on the (H, W) grid.
            context: (B, N, C) key/value-stream tokens.
            emb: (B, emb_channels) timestep embedding.
            size: (H, W), N = H * W.

        Returns:
            (B, N, C).
        """
        spatial, frequency = self.branches(query, context, emb, size)
        return self.to_out(spatial + frequency)


class _MLP(nn.Sequential):
    """Transformer feed-forward: Linear(C, rC) -> GELU -> Linear(rC, C) on (B, N, C) tokens."""

    def __init__(self, channels: int, ratio: float) -> None:
        hidden = max(1, int(round(channels * ratio)))
        super().__init__(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))


class SSFormerBlock(nn.Module):
    """One SS-Former block: two symmetric cross-attention modules between noise and semantics.

    Wu et al., "MedSegDiff-V2: Diffusion based Medical Image Segmentation with Transformer",
    arXiv 2301.11798: the first module encodes the diffusion noise signal into the condition's
    semantic embedding, the second encodes the noise-blended semantic feature back into the diffusion
    embedding. With pre-norm residual transformer layers (our choice of norm placement)::

        c' = c + SSA_1(LN(c) <- LN(e));   c' = c' + MLP(LN(c'))
        e' = e + SSA_2(LN(e) <- LN(c'));  e' = e' + MLP(LN(e'))

    ``SSA`` is :class:`SpectrumSpaceAttention` (query <- key/value).

    Args:
        channels: C, width of both streams.
        heads: attention heads.
        emb_channels: timestep-embedding dimension.
        mlp_ratio: hidden width of the feed-forward layers, in multiples of C.
        nbp_hidden: NBP-Filter width.
        nbp_blocks: NBP-Filter FiLM blocks.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        emb_channels: int,
        mlp_ratio: float = 4.0,
        nbp_hidden: int = 32,
        nbp_blocks: int = 2,
    ) -> None:
        super().__init__()
        self.norm_c_q, self.norm_c_kv = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn_c = SpectrumSpaceAttention(channels, heads, emb_channels, nbp_hidden, nbp_blocks)
        self.norm_c_mlp, self.mlp_c = nn.LayerNorm(channels), _MLP(channels, mlp_ratio)
        self.norm_e_q, self.norm_e_kv = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn_e = SpectrumSpaceAttention(channels, heads, emb_channels, nbp_hidden, nbp_blocks)
        self.norm_e_mlp, self.mlp_e = nn.LayerNorm(channels), _MLP(channels, mlp_ratio)

    def forward(self, e: Tensor, c: Tensor, emb: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Update both streams.

        Args:
            e: (B, N, C) diffusion (noise) tokens.
            c: (B, N, C) condition (semantic) tokens.
            emb: (B, emb_channels) timestep embedding.
            size: token grid (H, W).

        Returns:
            (e', c'), each (B, N, C).
        """
        c = c + self.attn_c(self.norm_c_q(c), self.norm_c_kv(e), emb, size)
        c = c + self.mlp_c(self.norm_c_mlp(c))
        e = e + self.attn_e(self.norm_e_q(e), self.norm_e_kv(c), emb, size)
        e = e + self.mlp_e(self.norm_e_mlp(e))
        return e, c


class SSFormer(nn.Module):
    """Spectrum-space transformer (SS-Former): the semantic condition of MedSegDiff-V2.

    Wu et al., "MedSegDiff-V2: Diffusion based Medical Image Segmentation with Transformer",
    arXiv 2301.11798: N stacked :class:`SSFormerBlock` s between the diffusion model's deepest feature
    ``e`` and the condition model's deepest feature ``c``; the diffusion stream of the last block
    replaces the diffusion bottleneck feature. No positional embedding is added (the convolutional
    features carry position; the paper mentions none).

    Args:
        channels: C, width of both streams.
        num_blocks: N, stacked blocks.
        heads: attention heads.
        emb_channels: timestep-embedding dimension.
        mlp_ratio: feed-forward width in multiples of C.
        nbp_hidden: NBP-Filter width.
        nbp_blocks: NBP-Filter FiLM blocks.

    Raises:
        ValueError: for ``num_blocks`` < 1.
    """

    def __init__(
        self,
        channels: int,
        num_blocks: int,
        heads: int,
        emb_channels: int,
        mlp_ratio: float = 4.0,
        nbp_hidden: int = 32,
        nbp_blocks: int = 2,
    ) -> None:
        super().__init__()
        if int(num_blocks) < 1:
            raise ConfigError(f"SSFormer: num_blocks must be >= 1, got {num_blocks}")
        self.blocks = nn.ModuleList(
            SSFormerBlock(channels, heads, emb_channels, mlp_ratio, nbp_hidden, nbp_blocks)
            for _ in range(int(num_blocks))
        )

    def forward(self, e: Tensor, c: Tensor, emb: Tensor) -> Tensor:
        """Fuse the semantic feature into the diffusion feature.

        Args:
            e: (B, C, H, W) diffusion bottleneck feature.
            c: (B, C, H, W) condition-model deepest feature.
            emb: (B, emb_channels) timestep embedding.

        Returns:
            (B, C, H, W) the updated diffusion feature.
        """
        batch, channels, height, width = e.shape
        size = (height, width)
        e_tok = e.flatten(2).transpose(1, 2)
        c_tok = c.flatten(2).transpose(1, 2)
        for block in self.blocks:
            e_tok, c_tok = block(e_tok, c_tok, emb, size)
        return e_tok.transpose(1, 2).reshape(batch, channels, height, width)


# ============================================================================ the denoiser
class MedSegDiffV2UNet(nn.Module):
    """MedSegDiff-V2 denoiser ``eps_theta(x_t, t, I)`` (or x_0 / logits, as the kernel defines).

    Wu, Ji, Fu, Xu, Jin and Xu, "MedSegDiff-V2: Diffusion based Medical Image Segmentation with
    Transformer", arXiv 2301.11798 (AAAI 2024). Two U-Nets with the same level layout (level k has
    spatial size ``(H, W) / 2**k``):

    - the condition model, a segmentation U-Net on the image (no timestep): encoder levels of
      residual blocks with widths ``cond_channels * channel_mults[k]``, a decoder with skip
      connections, and a 1x1 head giving ``anchor_logits`` (B, mask_channels, H, W), one channel per
      class of the target;
    - the diffusion model, a timestep-conditioned U-Net on x_t (residual blocks with scale-shift
      timestep embedding, self-attention at the levels flagged in ``attention_levels``), widths
      ``base_channels * channel_mults[k]``.

    Conditioning (the paper's two paths; the released code has neither):

    1. Anchor condition (U-SA, :class:`UncertainSpatialAttention`): the gate
       ``Sigmoid(Max(f_c^{-1} * k_Gauss, f_c^{-1}) * k_Conv1x1)`` is computed from the condition
       model's segmentation and multiplies the diffusion encoder's *first-stage* feature:
       ``f_d'^0 = gate . f_d^0 + f_d^0``, where ``f_d^0`` is the output of level 0 (stem convolution +
       level-0 residual blocks, full resolution) -- the paper's figure feeds the anchor into the first
       encoder stage and its equation names ``f_d^0``. Both the level-0 skip and the deeper encoder
       read the gated feature.
    2. Semantic condition (:class:`SSFormer`): at the bottleneck,
       ``mid_block1 -> SS-Former(e, c) -> mid_block2``, with ``e`` the diffusion model's deepest
       feature and ``c`` the condition model's deepest (encoder) feature, projected by a 1x1
       convolution to the diffusion width when ``cond_channels != base_channels``. ``ssformer_blocks``
       blocks (N in the paper) of two symmetric spectrum-space cross-attention modules, each with its
       NBP-Filter.

    Everything from the condition model depends only on the image and is computed once per image in
    :meth:`encode_condition`: ``{"anchor_logits", "anchor_gate", "semantic"}`` (a dict of batch-first
    tensors; the sampler repeats each for the S samples). ``anchor_logits`` is exposed for the paper's
    anchor loss (see below).

    Training: the paper supervises the condition model directly with an anchor loss beside the
    diffusion loss, ``L_total^t = L_noise^t + [t = 0 (mod alpha)] (L_dice + beta L_ce)`` on the
    anchor segmentation. That is the auxiliary segmentation head every mask-diffusion denoiser has
    (``model.aux_seg``, :class:`~diffseg_lightning.methods.mask_diffusion.AuxSeg`): the anchor head is
    the head (:meth:`aux_logits` returns ``cond["anchor_logits"]``), and ``conf/model/medsegdiff_v2.yaml``
    sets ``aux_seg: {weight: 1, loss: dice_bce, every: 1}``, i.e. MONAI's sigmoid Dice plus binary
    cross-entropy (beta = 1) on every step (alpha = 1; alpha and beta are not given in the text we could
    read). The anchor head exists with the switch off too, since it feeds the U-SA gate.

    Choices the paper leaves open (ours):

    - Both U-Nets use ``channel_mults`` and ``num_res_blocks``; the condition model has its own base
      width ``cond_channels`` (default ``base_channels``), no attention and no timestep; its decoder
      is one upsample + concatenation + residual block per level.
    - U-SA: see :class:`UncertainSpatialAttention` (probabilities, per-class learnable sigma, fixed
      ``anchor_kernel_size`` support, zero padding).
    - SS-Former: pre-norm residual layers with a 4x GELU feed-forward; spatial and frequency branches
      share the q/k/v projections and are summed before the output projection; the NBP-Filter is a
      timestep-FiLM coordinate network over the frequency plane, factorised over the query and key
      frequencies (see :class:`SpectrumSpaceAttention`, :class:`NeuralBandPassFilter`). N, the number
      of SS-Former blocks, is ``ssformer_blocks`` (default 4; the sources we could consult do not give
      the paper's value -- check it against the paper).
    - Normalisation: GroupNorm (32 groups, or the largest divisor of the width) in the U-Nets,
      LayerNorm in the SS-Former. The output convolution is zero-initialised (the net starts by
      predicting 0); no other layer is.

    Args:
        image_channels: channels of the conditioning image I.
        mask_channels: C, channels of x_t (one per class) and of the anchor segmentation.
        out_channels: output channels (default C; 2C with a learned variance).
        base_channels: diffusion U-Net width at level 0; the timestep embedding has 4x this.
        channel_mults: width multiplier per level; ``len(channel_mults) - 1`` downsamplings.
        num_res_blocks: residual blocks per level (encoders and decoders).
        attention_levels: one flag per level: self-attention in the diffusion U-Net at that level (the
            last flag also puts one between the bottleneck blocks and the SS-Former).
        num_heads: self-attention heads.
        dropout: residual-block dropout (diffusion U-Net and condition model).
        cond_channels: condition-model width at level 0 (default ``base_channels``).
        ssformer_blocks: N, stacked SS-Former blocks.
        ssformer_heads: SS-Former attention heads (the bottleneck width must be divisible by it).
        ssformer_mlp_ratio: SS-Former feed-forward width in multiples of the bottleneck width.
        nbp_hidden: NBP-Filter width.
        nbp_blocks: NBP-Filter FiLM blocks.
        anchor_kernel_size: taps (odd) per axis of the U-SA Gaussian kernel.
        anchor_sigma: initial U-SA Gaussian standard deviation (pixels).
        anchor_loss_every: deprecated and ignored (checkpoints written before ``model.aux_seg`` store it):
            the anchor loss is ``model.aux_seg`` now (``aux_seg.every`` is alpha).
        anchor_bce_weight: deprecated and ignored, as ``anchor_loss_every`` (the ``dice_bce`` loss has beta 1).

    Attributes:
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
        channel_mults: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int = 1,
        attention_levels: Sequence[bool] = (False, False, False, True),
        num_heads: int = 4,
        dropout: float = 0.0,
        cond_channels: int | None = None,
        ssformer_blocks: int = 4,
        ssformer_heads: int = 4,
        ssformer_mlp_ratio: float = 4.0,
        nbp_hidden: int = 32,
        nbp_blocks: int = 2,
        anchor_kernel_size: int = 7,
        anchor_sigma: float = 1.0,
        anchor_loss_every: int | None = None,
        anchor_bce_weight: float | None = None,
    ) -> None:
        super().__init__()
        mults = tuple(int(m) for m in channel_mults)  # Hydra passes ListConfig
        attn_levels = tuple(bool(a) for a in attention_levels)
        if len(mults) < 1 or any(m < 1 for m in mults):
            raise ConfigError(f"channel_mults must be a non-empty sequence of positive ints, got {mults}")
        if len(attn_levels) != len(mults):
            raise ConfigError(
                f"attention_levels needs one flag per level: got {len(attn_levels)} flags for "
                f"{len(mults)} channel_mults"
            )
        cond_base = int(cond_channels) if cond_channels is not None else int(base_channels)
        for name, value in (
            ("image_channels", image_channels),
            ("mask_channels", mask_channels),
            ("base_channels", base_channels),
            ("cond_channels", cond_base),
            ("num_res_blocks", num_res_blocks),
            ("num_heads", num_heads),
            ("ssformer_blocks", ssformer_blocks),
            ("ssformer_heads", ssformer_heads),
            ("nbp_hidden", nbp_hidden),
            ("nbp_blocks", nbp_blocks),
        ):
            if int(value) < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        if out_channels is not None and int(out_channels) < 1:
            raise ConfigError(f"out_channels must be >= 1, got {out_channels}")

        self.image_channels = int(image_channels)
        self.mask_channels = int(mask_channels)
        self.out_channels = int(out_channels) if out_channels is not None else self.mask_channels
        self.base_channels = int(base_channels)
        self.cond_channels = cond_base
        self.channel_mults = mults
        self.attention_levels = attn_levels
        self.num_levels = len(mults)
        self.downsample_factor = 2 ** (self.num_levels - 1)
        chans = [self.base_channels * m for m in mults]
        cchans = [self.cond_channels * m for m in mults]
        self.level_channels = tuple(chans)
        self.cond_level_channels = tuple(cchans)
        c_low = chans[-1]
        if c_low % int(ssformer_heads) != 0:
            raise ConfigError(
                f"the bottleneck width {c_low} (= base_channels * channel_mults[-1]) must be divisible by "
                f"ssformer_heads={ssformer_heads}"
            )
        emb_dim = 4 * self.base_channels
        nrb, drop, heads = int(num_res_blocks), float(dropout), int(num_heads)

        self.time_embed = TimestepEmbedding(self.base_channels, emb_dim)

        # ---- condition model: segmentation U-Net on the image (no timestep)
        self.cond_stem = conv3x3(self.image_channels, cchans[0])
        self.cond_down = nn.ModuleList(Downsample(cchans[k - 1]) for k in range(1, self.num_levels))
        self.cond_enc = nn.ModuleList(
            ResidualStage(cchans[k - 1] if k > 0 else cchans[0], cchans[k], None, nrb, False, heads, drop)
            for k in range(self.num_levels)
        )
        self.cond_up = nn.ModuleList(Upsample(cchans[k + 1]) for k in range(self.num_levels - 1))
        self.cond_dec = nn.ModuleList(
            ResidualStage(cchans[k + 1] + cchans[k], cchans[k], None, nrb, False, heads, drop)
            for k in range(self.num_levels - 1)
        )
        self.anchor_head = nn.Sequential(
            nn.GroupNorm(norm_groups(cchans[0]), cchans[0]),
            nn.SiLU(),
            nn.Conv2d(cchans[0], self.mask_channels, kernel_size=1),
        )
        self.semantic_proj: nn.Module = (
            nn.Conv2d(cchans[-1], c_low, kernel_size=1) if cchans[-1] != c_low else nn.Identity()
        )
        self.usa = UncertainSpatialAttention(self.mask_channels, anchor_kernel_size, anchor_sigma)
        if anchor_loss_every is not None or anchor_bce_weight is not None:
            warnings.warn(
                "MedSegDiffV2UNet: anchor_loss_every / anchor_bce_weight are ignored; the anchor loss is "
                "model.aux_seg now (weight, loss=dice_bce, every)",
                DeprecationWarning,
                stacklevel=2,
            )

        # ---- diffusion model: timestep-conditioned U-Net on x_t
        self.mask_stem = conv3x3(self.mask_channels, chans[0])
        self.mask_down = nn.ModuleList(Downsample(chans[k - 1]) for k in range(1, self.num_levels))
        self.enc = nn.ModuleList(
            ResidualStage(
                chans[k - 1] if k > 0 else chans[0], chans[k], emb_dim, nrb, attn_levels[k], heads, drop
            )
            for k in range(self.num_levels)
        )
        self.mid_block1 = ResBlock(c_low, c_low, emb_dim, drop)
        self.mid_attn = AttentionBlock(c_low, heads) if attn_levels[-1] else nn.Identity()
        self.ssformer = SSFormer(
            c_low,
            num_blocks=int(ssformer_blocks),
            heads=int(ssformer_heads),
            emb_channels=emb_dim,
            mlp_ratio=float(ssformer_mlp_ratio),
            nbp_hidden=int(nbp_hidden),
            nbp_blocks=int(nbp_blocks),
        )
        self.mid_block2 = ResBlock(c_low, c_low, emb_dim, drop)
        self.dec, self.upsamples = decoder_stages(chans, emb_dim, nrb, attn_levels, heads, drop)
        self.out = output_head(chans[0], self.out_channels)

    # ------------------------------------------------------------------ validation
    def _check_input(self, x: Tensor, channels: int, what: str) -> Tensor:
        why = f"2**(len(channel_mults)-1) for channel_mults={self.channel_mults}"
        return check_input(x, channels, what, self.downsample_factor, why=why)

    def cond_shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Shapes of :meth:`encode_condition`'s output for a (batch, ., height, width) input.

        Args:
            batch: B.
            height: H.
            width: W.

        Returns:
            ``{"anchor_logits": (B, C, H, W), "anchor_gate": (B, 1, H, W), "semantic": (B, C_L, h, w)}``
            with C_L the bottleneck width and (h, w) = (H, W) / :attr:`downsample_factor`.
        """
        f = self.downsample_factor
        return {
            "anchor_logits": (batch, self.mask_channels, height, width),
            "anchor_gate": (batch, 1, height, width),
            "semantic": (batch, self.level_channels[-1], height // f, width // f),
        }

    def _check_cond(self, cond: Mapping[str, Tensor], x_t: Tensor) -> None:
        expected = self.cond_shapes(x_t.shape[0], x_t.shape[-2], x_t.shape[-1])
        if not isinstance(cond, Mapping):
            raise ConfigError(
                "`cond` must be what encode_condition(image) returns: a dict with keys "
                f"{list(COND_KEYS)}, got {type(cond).__name__}"
            )
        got = {k: (tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__) for k, v in cond.items()}
        if set(got) != set(expected) or any(got[k] != expected[k] for k in expected):
            raise ConfigError(
                f"`cond` must be what encode_condition(image) returns for this network and match x_t "
                f"{tuple(x_t.shape)}: expected shapes {expected}, got {got}"
            )

    # ------------------------------------------------------------------ condition model
    def aux_logits(self, cond: Mapping[str, Tensor], size: Sequence[int]) -> Tensor:
        """The auxiliary segmentation head's logits (``model.aux_seg``): the anchor head's, ``cond["anchor_logits"]``.

        Args:
            cond: :meth:`encode_condition`'s output for the batch.
            size: (H, W) of the image (the anchor logits already have it).

        Returns:
            (B, mask_channels, H, W) logits.
        """
        return cond["anchor_logits"]

    def encode_condition(self, image: Tensor) -> dict[str, Tensor]:
        """Run the condition model and the U-SA gate: everything that depends only on the image.

        Args:
            image: (B, image_channels, H, W) conditioning image.

        Returns:
            A dict of batch-first tensors:
            ``"anchor_logits"`` (B, mask_channels, H, W), the condition model's segmentation logits
            (for the paper's anchor loss); ``"anchor_gate"`` (B, 1, H, W), the U-SA attention map
            ``Sigmoid(f_anc * k_Conv1x1)``; ``"semantic"`` (B, C_L, H/f, W/f), the condition model's
            deepest feature projected to the diffusion bottleneck width C_L (f =
            :attr:`downsample_factor`).

        Raises:
            ValueError: wrong channel count or a size not divisible by :attr:`downsample_factor`.
        """
        self._check_input(image, self.image_channels, "image")
        h = self.cond_stem(image)
        skips = []
        for k in range(self.num_levels):
            if k > 0:
                h = self.cond_down[k - 1](h)
            h = self.cond_enc[k](h)
            skips.append(h)
        semantic = self.semantic_proj(h)
        for k in reversed(range(self.num_levels - 1)):
            h = self.cond_dec[k](torch.cat([self.cond_up[k](h), skips[k]], dim=1))
        logits = self.anchor_head(h)
        return {"anchor_logits": logits, "anchor_gate": self.usa(logits), "semantic": semantic}

    # ------------------------------------------------------------------ diffusion model
    def forward(self, x_t: Tensor, t: Tensor | int | float, cond: Mapping[str, Tensor]) -> Tensor:
        """Predict from the noisy mask, the timestep and the cached condition.

        Args:
            x_t: (B, mask_channels, H, W) noisy mask.
            t: (B,) timesteps (long or float; a scalar is broadcast).
            cond: ``encode_condition(image)`` for the same batch (possibly repeated with
                ``repeat_interleave`` along dim 0 to match B).

        Returns:
            (B, out_channels, H, W).

        Raises:
            ValueError: wrong x_t shape, size not divisible by :attr:`downsample_factor`, wrong t shape,
                or ``cond`` not matching this network and x_t.
        """
        self._check_input(x_t, self.mask_channels, "mask")
        t = batch_timesteps(t, x_t)
        self._check_cond(cond, x_t)
        emb = self.time_embed(t)
        h = self.mask_stem(x_t)
        skips = []
        for k in range(self.num_levels):
            if k > 0:
                h = self.mask_down[k - 1](h)
            h = self.enc[k](h, emb)
            if k == 0:  # anchor condition on the first encoder stage (f_d^0)
                h = self.usa.inject(h, cond["anchor_gate"])
            skips.append(h)
        h = self.mid_attn(self.mid_block1(h, emb))
        h = self.ssformer(h, cond["semantic"], emb)  # semantic condition at the bottleneck
        h = self.mid_block2(h, emb)
        for k in reversed(range(self.num_levels)):
            h = self.dec[k](torch.cat([h, skips[k]], dim=1), emb)
            if k > 0:
                h = self.upsamples[k - 1](h)
        return self.out(h)

    def forward_with_image(self, x_t: Tensor, t: Tensor | int | float, image: Tensor) -> Tensor:
        """Un-split forward, ``forward(x_t, t, encode_condition(image))``: where each image is used once.

        Args:
            x_t: (B, mask_channels, H, W) noisy mask.
            t: (B,) timesteps.
            image: (B, image_channels, H, W) conditioning image.

        Returns:
            (B, out_channels, H, W).
        """
        return self.forward(x_t, t, self.encode_condition(image))
