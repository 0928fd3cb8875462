"""The Diffusion Transformer U-Net denoiser: cross-attention conditioning and multi-sized window attention.

Chowdary and Yin, "Diffusion Transformer U-Net for Medical Image Segmentation", MICCAI 2023.

Contents:

- :func:`window_partition` / :func:`window_merge`: exact inverse pair (reshape / permute by
  ``einops``, no loops over windows) between a (B, H, W, C) map and its (B, nW, wh*ww, C) windows.
- :func:`shifted_window_mask`: the Swin attention mask of the cyclically shifted windows.
- :class:`WindowAttention`, :class:`WindowTransformerBlock`: (shifted) window multi-head self-attention
  with ``torch.nn.functional.scaled_dot_product_attention`` and a timestep-conditioned transformer block.
- :class:`MultiSizedWindowBlock`: the paper's block: K parallel window-attention paths of different
  window sizes, summed, then a shifted-window block.
- :class:`CrossAttentionFusion`: the paper's cross-attention module between the noisy-mask embedding
  f_M (queries) and the image embedding f_I (keys, values), positions after the projections.
- :class:`DiffusionTransformerUNet`: the denoiser; by default f_I also reaches the U-Net input through an
  aligned path (f_I's token (i, j) added at (i, j)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.networks.blocks import Convolution, MLPBlock
from torch import Tensor, nn

from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.nets.blocks import (
    ResBlock,
    TimestepEmbedding,
    batch_timesteps,
    check_divisible,
    check_input,
    conv3x3,
    norm_groups,
)

__all__ = [
    "CrossAttentionFusion",
    "DiffusionTransformerUNet",
    "MultiSizedWindowBlock",
    "WindowAttention",
    "WindowTransformerBlock",
    "effective_window",
    "relative_position_index",
    "shifted_window_mask",
    "sincos_position_embedding",
    "window_partition",
    "window_merge",
]


# ---------------------------------------------------------------------------- window helpers
# Written here rather than taken from MONAI's ``monai.networks.nets.swin_unetr`` helpers: those build the
# shifted-window mask with Python loops over slices, and its ``WindowAttention`` materialises the attention
# matrix itself (no fused ``scaled_dot_product_attention``) and has no timestep input.
def effective_window(
    window_size: int, height: int, width: int, shifted: bool
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Window and shift actually used on a (height, width) map (the Swin rule, per axis).

    A window larger than the map along an axis is clamped to the map (one window covers that axis, as
    Swin does when the resolution is at most the window size), and there is no shift along such an
    axis. Otherwise the shift of a shifted block is ``window_size // 2``.

    Args:
        window_size: configured (square) window size.
        height: map height H.
        width: map width W.
        shifted: whether the block uses shifted windows.

    Returns:
        ``((wh, ww), (sh, sw))``: window and shift along H and W.

    Raises:
        ValueError: if the windows do not tile the map (H % wh or W % ww), naming the sizes.
    """
    wh, ww = min(int(window_size), int(height)), min(int(window_size), int(width))
    if height % wh or width % ww:
        raise ConfigError(
            f"window size {window_size} does not tile a {height}x{width} feature map "
            f"(window {wh}x{ww}); the map sides must be multiples of the window size (or at most it)"
        )
    sh = wh // 2 if shifted and wh < height else 0
    sw = ww // 2 if shifted and ww < width else 0
    return (wh, ww), (sh, sw)


def window_partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """Split a map into non-overlapping windows (raster order of windows and of tokens in a window).

    Args:
        x: (B, H, W, C) map.
        window: (wh, ww) window, dividing H and W.

    Returns:
        (B, nW, wh*ww, C) with nW = (H/wh) * (W/ww).

    Raises:
        ValueError: if the window does not divide the map.
    """
    wh, ww = window
    if x.shape[1] % wh or x.shape[2] % ww:
        raise ConfigError(f"window {wh}x{ww} does not tile a {x.shape[1]}x{x.shape[2]} map")
    return rearrange(x, "b (nh wh) (nw ww) c -> b (nh nw) (wh ww) c", wh=wh, ww=ww)


def window_merge(windows: Tensor, window: tuple[int, int], height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: (B, nW, wh*ww, C).
        window: (wh, ww).
        height: map height H.
        width: map width W.

    Returns:
        (B, H, W, C).
    """
    wh, ww = window
    return rearrange(
        windows, "b (nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=height // wh, nw=width // ww, wh=wh, ww=ww
    )


def shifted_window_mask(
    height: int,
    width: int,
    window: tuple[int, int],
    shift: tuple[int, int],
    device: torch.device | None = None,
) -> Tensor:
    """Which tokens of a cyclically shifted window may attend to each other (Liu et al., Swin, ICCV 2021).

    The map is rolled by ``(-sh, -sw)`` before the windows are cut, so the last window along a shifted
    axis holds tokens from both ends of the map. Along each axis the rolled positions are labelled by
    the Swin regions ``[0, H-wh)``, ``[H-wh, H-sh)``, ``[H-sh, H)``; two tokens may attend to each other iff
    they carry the same (row, column) region label, i.e. iff they were neighbours before the roll.

    Args:
        height: map height H.
        width: map width W.
        window: (wh, ww) window.
        shift: (sh, sw) shift (0 <= shift < window).
        device: device of the mask.

    Returns:
        (nW, wh*ww, wh*ww) bool, True where attention is allowed; windows and tokens in the order of
        :func:`window_partition` applied to the rolled map.
    """
    (wh, ww), (sh, sw) = window, shift

    def labels(n: int, w: int, s: int) -> Tensor:
        pos = torch.arange(n, device=device)
        return (pos >= n - w).long() + (pos >= n - s).long() if s > 0 else torch.zeros_like(pos)

    region = labels(height, wh, sh)[:, None] * 3 + labels(width, ww, sw)[None, :]  # (H, W)
    region = window_partition(region[None, :, :, None], (wh, ww))[0, :, :, 0]  # (nW, L)
    return region[:, :, None] == region[:, None, :]


def relative_position_index(
    window: tuple[int, int], max_window: int, device: torch.device | None = None
) -> Tensor:
    """Index into a Swin relative-position-bias table of side ``2 * max_window - 1``.

    Args:
        window: (wh, ww), both at most ``max_window``.
        max_window: configured window size (the table covers offsets in ``[-(max_window-1), max_window-1]``).
        device: device of the result.

    Returns:
        (L, L) long, L = wh*ww: ``(dy + max_window - 1) * (2 * max_window - 1) + dx + max_window - 1`` for
        the offset (dy, dx) from key token to query token, tokens in raster order.
    """
    wh, ww = window
    coords = torch.stack(
        torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij"), dim=0
    ).flatten(1)  # (2, L)
    rel = coords[:, :, None] - coords[:, None, :] + (max_window - 1)  # (2, L, L)
    return rel[0] * (2 * max_window - 1) + rel[1]


def sincos_position_embedding(
    height: int, width: int, dim: int, device: torch.device | None = None
) -> Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE / ViT style), size-agnostic and parameter-free.

    Args:
        height: map height H.
        width: map width W.
        dim: embedding dimension; ``dim // 4`` frequencies per axis, the remaining ``dim % 4`` entries are 0.
        device: device of the result.

    Returns:
        (H*W, dim) float32, rows in raster order.
    """
    n = dim // 4
    out = torch.zeros(height * width, dim, device=device)
    if n == 0:
        return out
    omega = 1.0 / (10000.0 ** (torch.arange(n, device=device, dtype=torch.float32) / n))
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    ay, ax = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    out[:, : 4 * n] = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    return out


# ---------------------------------------------------------------------------- attention blocks
class WindowAttention(nn.Module):
    """Multi-head self-attention inside (optionally cyclically shifted) windows, with relative position bias.

    The window multi-head self-attention (W-MSA / SW-MSA) of Swin (Liu et al., ICCV 2021) as used by the
    multi-sized window transformer of Chowdary and Yin, "Diffusion Transformer U-Net for Medical Image
    Segmentation", MICCAI 2023. The map is rolled by ``-shift``, cut into windows
    (:func:`window_partition`), attended with ``scaled_dot_product_attention`` under the relative position
    bias plus, for a shift, the mask of :func:`shifted_window_mask`, put back (:func:`window_merge`) and
    rolled by ``+shift``. The bias table is sized for ``window_size``; a window clamped to a smaller map
    reads the central part of it.

    Args:
        dim: token channels C.
        num_heads: attention heads (C divisible by it).
        window_size: configured window size.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(f"window attention needs dim divisible by num_heads, got {dim} and {num_heads}")
        self.dim, self.num_heads, self.window_size = int(dim), int(num_heads), int(window_size)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias, std=0.02)

    def attention_bias(
        self, height: int, width: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device
    ) -> Tensor:
        """Additive attention bias: relative position bias, and ``-inf`` across shifted-window regions.

        Returns:
            (1 or nW, heads, L, L).
        """
        index = relative_position_index(window, self.window_size, device)
        bias = self.relative_position_bias[index.reshape(-1)]
        bias = bias.reshape(*index.shape, self.num_heads).permute(2, 0, 1)[None]  # (1, heads, L, L)
        if shift != (0, 0):
            allowed = shifted_window_mask(height, width, window, shift, device)[:, None]  # (nW, 1, L, L)
            bias = bias.masked_fill(~allowed, float("-inf"))
        return bias

    def forward(self, x: Tensor, window: tuple[int, int], shift: tuple[int, int]) -> Tensor:
        """Attend within windows.

        Args:
            x: (B, H, W, C) tokens.
            window: (wh, ww) window tiling the map (see :func:`effective_window`).
            shift: (sh, sw) cyclic shift, ``(0, 0)`` for regular windows.

        Returns:
            (B, H, W, C).
        """
        batch, height, width, _ = x.shape
        if shift != (0, 0):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = window_partition(x, window)  # (B, nW, L, C)
        num_windows, length = windows.shape[1], windows.shape[2]
        qkv = rearrange(self.qkv(windows), "b n l (k h d) -> k (b n) h l d", k=3, h=self.num_heads)
        bias = self.attention_bias(height, width, window, shift, x.device).to(qkv.dtype)
        if bias.shape[0] > 1:  # one mask per window: tile over the batch, (B * nW, heads, L, L)
            bias = bias.expand(batch, -1, -1, -1, -1).reshape(
                batch * num_windows, self.num_heads, length, length
            )
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
        out = self.proj(rearrange(out, "(b n) h l d -> b n l (h d)", b=batch))
        out = window_merge(out, window, height, width)
        if shift != (0, 0):
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        return out


class WindowTransformerBlock(nn.Module):
    """Pre-norm (shifted) window transformer block with the timestep embedding in both sub-layers.

    Chowdary and Yin, "Diffusion Transformer U-Net for Medical Image Segmentation", MICCAI 2023:
    the building block of the multi-sized window transformer. ``h = x + WA(FiLM_1(LN(x)))``,
    ``x' = h + MLP(FiLM_2(LN(h)))`` with ``FiLM_i(z) = z * (1 + s_i) + b_i`` and
    ``(s_1, b_1, s_2, b_2) = Linear(SiLU(emb))`` (our choice for how the timestep enters every block: the
    scale-shift conditioning of ADM / DiT, applied per block). The MLP is MONAI's ``MLPBlock`` (GELU, ratio
    ``mlp_ratio``).

    Args:
        dim: token channels C.
        num_heads: attention heads.
        window_size: configured window size.
        shifted: shifted windows (shift ``window_size // 2`` where the window is smaller than the map).
        emb_dim: timestep-embedding dimension.
        mlp_ratio: MLP hidden width / C.
        dropout: MLP dropout.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shifted: bool,
        emb_dim: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size, self.shifted = int(window_size), bool(shifted)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(round(dim * mlp_ratio)), dropout_rate=dropout, act="GELU")
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 4 * dim))

    def update(self, x: Tensor, emb: Tensor) -> Tensor:
        """The block's residual update ``block(x) - x``.

        Args:
            x: (B, H, W, C) tokens.
            emb: (B, emb_dim) timestep embedding.

        Returns:
            (B, H, W, C).
        """
        window, shift = effective_window(self.window_size, x.shape[1], x.shape[2], self.shifted)
        s1, b1, s2, b2 = self.emb_proj(emb)[:, None, None, :].chunk(4, dim=-1)
        delta = self.attn(self.norm1(x) * (1 + s1) + b1, window, shift)
        return delta + self.mlp(self.norm2(x + delta) * (1 + s2) + b2)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block: (B, H, W, C), (B, emb_dim) -> (B, H, W, C)."""
        return x + self.update(x, emb)


class MultiSizedWindowBlock(nn.Module):
    """Multi-sized window transformer block (Chowdary and Yin, MICCAI 2023, Sec. 2, Fig. 3).

    The input goes through K parallel window transformer paths with different window sizes; their sum
    goes through a shifted-window transformer block. Each path is a full window transformer block
    B_k (attention + MLP, :class:`WindowTransformerBlock`), and the paths are summed as residual updates,
    ``y = x + sum_k (B_k(x) - x)``, then ``out = B_shift(y)``. (Summing the K blocks' outputs themselves
    would multiply the identity path by K in every block, K**depth over the U-Net.)

    Args:
        dim: token channels C.
        num_heads: attention heads of every path.
        window_sizes: the K window sizes of the parallel paths.
        shift_window_size: window size of the shifted-window block.
        emb_dim: timestep-embedding dimension.
        mlp_ratio: MLP hidden width / C.
        dropout: MLP dropout.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_sizes: Sequence[int],
        shift_window_size: int,
        emb_dim: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.paths = nn.ModuleList(
            WindowTransformerBlock(dim, num_heads, ws, False, emb_dim, mlp_ratio, dropout)
            for ws in window_sizes
        )
        self.shifted = WindowTransformerBlock(
            dim, num_heads, shift_window_size, True, emb_dim, mlp_ratio, dropout
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: (B, H, W, C) tokens.
            emb: (B, emb_dim) timestep embedding.

        Returns:
            (B, H, W, C).
        """
        y = x + sum(path.update(x, emb) for path in self.paths)
        return self.shifted(y, emb)


class _Stage(nn.Module):
    """``depth`` multi-sized window blocks at one U-Net level."""

    def __init__(self, depth: int, **block_kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MultiSizedWindowBlock(**block_kwargs) for _ in range(depth))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, emb)
        return x


class _PatchMerging(nn.Module):
    """Swin patch merging: concatenate each 2x2 neighbourhood (4C), LayerNorm, Linear to ``out_dim``."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = rearrange(x, "b (h p) (w q) c -> b h w (p q c)", p=2, q=2)
        return self.reduction(self.norm(x))


class _PatchExpanding(nn.Module):
    """Swin-UNet patch expanding: Linear to ``4 * out_dim``, rearrange to 2x the size, LayerNorm."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.expand = nn.Linear(dim, 4 * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = rearrange(self.expand(x), "b h w (p q c) -> b (h p) (w q) c", p=2, q=2)
        return self.norm(x)


class CrossAttentionFusion(nn.Module):
    """The cross-attention module of Chowdary and Yin, "Diffusion Transformer U-Net for Medical Image
    Segmentation", MICCAI 2023 (Sec. 2, Fig. 2).

    Queries come from the noisy-mask embedding f_M, keys and values from the image embedding f_I; the
    result is reshaped to f_M's shape: ``z = f_M + MHA(Q = LN(f_M), K = LN(f_I), V = LN(f_I))`` over all h*w
    tokens. Our choices where the paper is silent: the residual ``f_M + ...`` (attention output alone is a
    convex combination of image values, in which x_t would only survive through the attention weights);
    pre-LayerNorms; and where a fixed 2-D sine-cosine position embedding P enters (``positions``):

    - ``"projected"`` (default): after the projections, as a relative term of every head's logits,
      ``q_h . k_h / sqrt(d) + s_h * P_i . P_j / (d_P / 2)`` (``P_i . P_j / (d_P / 2)`` is 1 at the same place
      and a sum of cosines of the offset elsewhere, so it depends on the offset only; ``s_h`` a learned
      scale per head, initialised to ``position_scale``). It is computed by concatenating ``s_h P`` to the
      queries and ``P`` to the keys, so q.P cross terms do not arise and the fused
      ``scaled_dot_product_attention`` still runs.
    - ``"input"``: added to the LayerNormed queries and keys before the projections (DETR style, this
      module's first reading). A review measured that the random projections scramble it (attention
      entropy 0.98 x log N, weight on the same place 0.96 x uniform, at initialisation).

    Args:
        mask_dim: channels c2 of f_M (the output channels).
        cond_dim: channels c1 of f_I.
        num_heads: attention heads (``mask_dim`` divisible by it).
        position_embedding: use P at all (False: the image tokens are an unordered set).
        positions: ``"projected"`` or ``"input"`` (see above).
        position_scale: initial ``s_h`` of ``"projected"``.

    Raises:
        ValueError: on a bad ``num_heads`` or ``positions``.
    """

    def __init__(
        self,
        mask_dim: int,
        cond_dim: int,
        num_heads: int,
        position_embedding: bool = True,
        positions: str = "projected",
        position_scale: float = 16.0,
    ) -> None:
        super().__init__()
        if num_heads < 1 or mask_dim % num_heads:
            raise ConfigError(
                f"cross-attention needs mask_dim divisible by num_heads, got {mask_dim} and {num_heads}"
            )
        if positions not in ("projected", "input"):
            raise ConfigError(f"positions must be 'projected' or 'input', got {positions!r}")
        self.mask_dim, self.cond_dim, self.num_heads = int(mask_dim), int(cond_dim), int(num_heads)
        self.head_dim = self.mask_dim // self.num_heads
        self.position_embedding, self.positions = bool(position_embedding), positions
        self.norm_mask = nn.LayerNorm(mask_dim)
        self.norm_cond = nn.LayerNorm(cond_dim)
        self.attn = nn.MultiheadAttention(mask_dim, num_heads, kdim=cond_dim, vdim=cond_dim, batch_first=True)
        # d_P: at least 4 (one frequency per axis and sin / cos); the head width where that is larger.
        self.position_dim = max(4, 4 * (self.head_dim // 4))
        if positions == "projected":
            self.position_scale = nn.Parameter(torch.full((self.num_heads,), float(position_scale)))

    def _project(
        self, query: Tensor, key: Tensor, value: Tensor, size_q: tuple[int, int], size_k: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head queries, keys (with the position channels) and values, (B, heads, N, .)."""
        attn, heads, d = self.attn, self.num_heads, self.head_dim
        if attn.in_proj_weight is not None:  # c1 == c2: MultiheadAttention packs the three projections
            w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        split = "b n (h d) -> b h n d"
        q = rearrange(F.linear(query, w_q, b_q), split, h=heads)
        k = rearrange(F.linear(key, w_k, b_k), split, h=heads)
        v = rearrange(F.linear(value, w_v, b_v), split, h=heads)
        if self.position_embedding:
            dev, dtype, dp = query.device, query.dtype, self.position_dim
            # score term s_h * P_i . P_j / (dp / 2), and SDPA multiplies by 1 / sqrt(d): undo that.
            p_q = sincos_position_embedding(*size_q, dp, dev).to(dtype) * (d**0.5 / (dp / 2))
            p_k = sincos_position_embedding(*size_k, dp, dev).to(dtype)
            scale = self.position_scale.to(dtype)[None, :, None, None]
            q = torch.cat([q, (scale * p_q).expand(q.shape[0], heads, -1, -1)], dim=-1)
            k = torch.cat([k, p_k.expand(k.shape[0], heads, -1, -1)], dim=-1)
        return q, k, v

    def _projected_attention(
        self, query: Tensor, key: Tensor, value: Tensor, size_q: tuple[int, int], size_k: tuple[int, int]
    ) -> Tensor:
        """Multi-head attention with the position term after the projections; (B, Nq, c2)."""
        q, k, v = self._project(query, key, value, size_q, size_k)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.attn.out_proj(rearrange(out, "b h n d -> b n (h d)"))

    @torch.no_grad()
    def attention_weights(self, f_mask: Tensor, f_image: Tensor) -> Tensor:
        """The attention probabilities of :meth:`forward` (for inspection), (B, heads, h*w, h'*w').

        Args:
            f_mask: (B, c2, h, w).
            f_image: (B, c1, h', w').

        Returns:
            Row-stochastic weights, queries and keys in raster order.
        """
        (_, _, h, w), size_k = f_mask.shape, tuple(f_image.shape[-2:])
        tokens = rearrange(f_mask, "b c h w -> b (h w) c")
        query, key = self.norm_mask(tokens), self.norm_cond(rearrange(f_image, "b c h w -> b (h w) c"))
        if self.positions == "input":
            if self.position_embedding:
                query = query + sincos_position_embedding(h, w, self.mask_dim, query.device)
                key = key + sincos_position_embedding(*size_k, self.cond_dim, query.device)
            return self.attn(query, key, key, need_weights=True, average_attn_weights=False)[1]
        q, k, _ = self._project(query, key, key, (h, w), size_k)
        return (q @ k.transpose(-1, -2) * self.head_dim**-0.5).softmax(-1)

    def forward(self, f_mask: Tensor, f_image: Tensor) -> Tensor:
        """Fuse the image embedding into the mask embedding.

        Args:
            f_mask: (B, c2, h, w) noisy-mask embedding f_M.
            f_image: (B, c1, h', w') image embedding f_I (h', w' may differ from h, w).

        Returns:
            (B, c2, h, w), f_M's shape.
        """
        _, _, h, w = f_mask.shape
        tokens = rearrange(f_mask, "b c h w -> b (h w) c")
        value = self.norm_cond(rearrange(f_image, "b c h w -> b (h w) c"))
        query, key = self.norm_mask(tokens), value
        if self.positions == "projected":
            out = tokens + self._projected_attention(query, key, value, (h, w), tuple(f_image.shape[-2:]))
        else:
            if self.position_embedding:
                dev, dtype = tokens.device, tokens.dtype
                query = query + sincos_position_embedding(h, w, self.mask_dim, dev).to(dtype)
                key = key + sincos_position_embedding(*f_image.shape[-2:], self.cond_dim, dev).to(dtype)
            out = tokens + self.attn(query, key, value, need_weights=False)[0]
        return rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


class _PatchEncoder(nn.Module):
    """Patch embedding (strided ``p x p`` convolution, MONAI ``Convolution``) + ``depth`` residual blocks."""

    def __init__(
        self, in_channels: int, out_channels: int, patch_size: int, depth: int, dropout: float
    ) -> None:
        super().__init__()
        self.embed = Convolution(
            2,
            in_channels,
            out_channels,
            strides=patch_size,
            kernel_size=patch_size,
            padding=0,
            conv_only=True,
        )
        self.blocks = nn.Sequential(
            *(ResBlock(out_channels, out_channels, None, dropout) for _ in range(depth))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.embed(x))


# ---------------------------------------------------------------------------- the denoiser
class DiffusionTransformerUNet(nn.Module):
    """Diffusion Transformer U-Net denoiser (Chowdary and Yin, "Diffusion Transformer U-Net for Medical Image
    Segmentation", MICCAI 2023).

    ``forward(x_t, t, cond)`` with ``cond = encode_condition(image)``:

    1. Image encoder (in :meth:`encode_condition`, once per image): ``f_I = E_I(I)``, (B, c1, h, w) with
       ``(h, w) = (H, W) / patch_size``.
    2. Noisy-mask encoder: ``f_M = E_M(x_t)``, (B, c2, h, w), c2 = ``embed_dim``.
    3. Fusion, the U-Net input (:meth:`fuse`): the cross-attention (:class:`CrossAttentionFusion`, queries
       from f_M, keys / values from f_I, output reshaped to f_M's shape), plus, with ``fusion="aligned"``
       (the default), the aligned image path ``W f_I``: f_I's token (i, j), projected by a learned 1x1
       map, added to the U-Net input token (i, j).
    4. A U-Net of multi-sized window transformer blocks (:class:`MultiSizedWindowBlock`: K parallel
       window-attention paths of sizes ``window_sizes``, summed, then a shifted-window block), Swin-UNet
       layout: encoder stages at levels 0..L-2 each followed by patch merging (half size, channels
       ``embed_dim * channel_mults[k]``), a bottleneck stage at level L-1, decoder stages at levels
       L-2..0 each after patch expanding and a skip concatenation + Linear. The timestep embedding
       (sinusoid + MLP, ``4 * embed_dim``) enters every window transformer block (scale-shift of both
       LayerNorms).
    5. Output head: LayerNorm, transposed convolution back to (H, W) (stride ``patch_size``), GroupNorm,
       SiLU, 3x3 convolution to ``out_channels``.

    Sources: the paper's architecture as summarised in the project survey (f_I and f_M, the cross-attention
    reshaped to f_M's shape, K summed window paths then a shifted window). We found no code released by the
    authors, and the paper's text (its exact window sizes, widths, encoders) was not at hand, so the
    following are our choices, to be checked against the paper:

    - Encoders: a ``patch_size`` x ``patch_size`` strided convolution (patch embedding) followed by
      ``image_encoder_depth`` (image) / ``mask_encoder_depth`` (mask) pre-activation residual blocks
      (:class:`~diffseg_lightning.nets.blocks.ResBlock`) without timestep; f_M and f_I at the same (h, w).
      The mask encoder takes no timestep (the paper feeds t to the U-Net).
    - Cross-attention: residual to f_M, pre-LayerNorms, ``embed_dim / head_channels`` heads, and a fixed
      2-D sine-cosine position term after the projections (``positions="projected"``, see
      :class:`CrossAttentionFusion`).
    - How f_I reaches the U-Net. The paper (abstract): "the semantic features required for the conditioning
      of the diffusion process are not well aligned with the noise embedding ... we present a
      cross-attention module to enhance the conditioning from source images"; its model section (as the
      survey gives it): f_I (h x w x c1) and f_M (h x w x c2) "are fused by Cross Attention into one
      embedding, which, with the timestep t, is the U-Net's input", "reshaped to the shape of f_M". The
      paper's literal reading is the cross-attention as the only path (``fusion="cross_attention"``). It
      does not say whether a residual, an aligned term or positions are part of the module, and a review
      measured that this literal reading does not localise at a short budget: with the positions added
      before the random projections the attention is near uniform (entropy 0.98 x log N, weight on the
      same place 0.96 x uniform) and the synthetic 64 px Dice was 0.000 after 200 steps, 0.733 with an
      aligned image path added. Our default therefore adds the aligned path ``W f_I`` (f_I and f_M share
      the grid (h, w), so the token at (i, j) of both describes the same pixels), and puts the positions
      after the projections (at initialisation on 16x16 maps: weight on the same place ~20 x uniform,
      entropy 0.78 x log N). ``fusion="cross_attention", positions="input"`` is the previous network.
    - Window sizes (4, 8) (K = 2); the shifted block uses the largest window size, shifted by half of it.
      The K paths are summed as residual updates (see :class:`MultiSizedWindowBlock`).
    - Windows must tile the maps: a window larger than a map side is clamped to it (one window along that
      axis, no shift: the Swin rule); otherwise each level's map sides must be multiples of every window
      size, checked up front with a ValueError naming the input size, the level and the window
      (:meth:`check_size`). Multiples of :attr:`size_multiple` always work; with the defaults (factor 32,
      windows 4 and 8) that is every power of two from 32 up and every multiple of 256 (96 or 160 fail).
      We do not pad: padded tokens would change the attention of the real ones.
    - Swin relative position bias in every window attention; LayerNorm in the transformer, GroupNorm in the
      convolutional encoders / head; MLP ratio 4, GELU; no drop-path.
    - Swin-UNet layout (patch merging / expanding, one stage per level, decoder mirrors the encoder depths),
      ``embed_dim=64``, ``channel_mults=(1, 2, 4, 8)``, ``depths=(1, 1, 1, 1)`` multi-sized blocks per level
      (each = K + 1 transformer blocks), ``patch_size=4``, 32 channels per head.
    - The output convolution is not zero-initialised (every parameter gets a gradient from the first step).

    ``cond`` is one batch-first tensor, so S samples per image are ``cond.repeat_interleave(S, 0)``.

    Args:
        image_channels: channels of the image I.
        mask_channels: channels of the noisy mask x_t (one per class).
        out_channels: output channels (default ``mask_channels``; ``2 * mask_channels`` with a learned variance).
        embed_dim: token channels at level 0 (= c2, the f_M channels); the timestep embedding has
            ``4 * embed_dim`` dimensions.
        cond_dim: channels c1 of f_I (default ``embed_dim``).
        channel_mults: channel multiplier per U-Net level; L = ``len(channel_mults)`` levels.
        depths: multi-sized window blocks per level (encoder, bottleneck; the decoder mirrors them).
        window_sizes: window sizes of the K parallel paths.
        shift_window_size: window size of the shifted-window block (default ``max(window_sizes)``).
        head_channels: channels per attention head (every level width divisible by it).
        patch_size: patch size p of both encoders ((H, W) -> (H, W) / p).
        image_encoder_depth: residual blocks of the image encoder after the patch embedding.
        mask_encoder_depth: residual blocks of the mask encoder after the patch embedding.
        mlp_ratio: transformer MLP width / channels.
        dropout: MLP and residual-block dropout.
        position_embedding: sine-cosine position embedding in the cross-attention.
        fusion: ``"aligned"`` (cross-attention + the aligned image path) or ``"cross_attention"`` (the
            paper's literal reading: the cross-attention alone).
        positions: where the cross-attention's positions enter, ``"projected"`` or ``"input"`` (see
            :class:`CrossAttentionFusion`).
        position_scale: initial per-head weight of the ``"projected"`` position term.

    Attributes:
        downsample_factor: ``patch_size * 2 ** (L - 1)``; H and W must be divisible by it.
        size_multiple: ``downsample_factor * lcm(window sizes)``: input sides that are multiples of it always
            work.

    Raises:
        ValueError: on inconsistent hyper-parameters.
    """

    def __init__(
        self,
        image_channels: int = 1,
        mask_channels: int = 1,
        out_channels: int | None = None,
        embed_dim: int = 64,
        cond_dim: int | None = None,
        channel_mults: Sequence[int] = (1, 2, 4, 8),
        depths: Sequence[int] = (1, 1, 1, 1),
        window_sizes: Sequence[int] = (4, 8),
        shift_window_size: int | None = None,
        head_channels: int = 32,
        patch_size: int = 4,
        image_encoder_depth: int = 2,
        mask_encoder_depth: int = 1,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        position_embedding: bool = True,
        fusion: str = "aligned",
        positions: str = "projected",
        position_scale: float = 16.0,
    ) -> None:
        super().__init__()
        if fusion not in ("aligned", "cross_attention"):
            raise ConfigError(f"fusion must be 'aligned' or 'cross_attention', got {fusion!r}")
        # Hydra may pass ListConfig / list for the sequences.
        mults = tuple(int(m) for m in channel_mults)
        depth_list = tuple(int(d) for d in depths)
        windows = tuple(int(w) for w in window_sizes)
        if not mults or any(m < 1 for m in mults):
            raise ConfigError(f"channel_mults must be a non-empty sequence of positive ints, got {mults}")
        if len(depth_list) != len(mults) or any(d < 1 for d in depth_list):
            raise ConfigError(
                f"depths needs one positive int per level: got {depth_list} for {len(mults)} channel_mults"
            )
        if not windows or any(w < 1 for w in windows):
            raise ConfigError(f"window_sizes must be a non-empty sequence of positive ints, got {windows}")
        shift_ws = int(shift_window_size) if shift_window_size is not None else max(windows)
        for name, value in (
            ("image_channels", image_channels),
            ("mask_channels", mask_channels),
            ("embed_dim", embed_dim),
            ("head_channels", head_channels),
            ("patch_size", patch_size),
            ("shift_window_size", shift_ws),
        ):
            if int(value) < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        for name, value in (
            ("image_encoder_depth", image_encoder_depth),
            ("mask_encoder_depth", mask_encoder_depth),
        ):
            if int(value) < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        if float(mlp_ratio) <= 0:
            raise ConfigError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        chans = tuple(int(embed_dim) * m for m in mults)
        for k, c in enumerate(chans):
            if c % int(head_channels):
                raise ConfigError(
                    f"level {k} has {c} channels (embed_dim {embed_dim} x channel_mults[{k}] {mults[k]}), "
                    f"not divisible by head_channels {head_channels}"
                )

        self.image_channels = int(image_channels)
        self.mask_channels = int(mask_channels)
        self.out_channels = int(out_channels) if out_channels is not None else self.mask_channels
        self.embed_dim = int(embed_dim)
        self.cond_dim = int(cond_dim) if cond_dim is not None else self.embed_dim
        if self.cond_dim < 1:
            raise ConfigError(f"cond_dim must be >= 1, got {cond_dim}")
        self.channel_mults, self.depths, self.level_channels = mults, depth_list, chans
        self.window_sizes, self.shift_window_size = windows, shift_ws
        self.patch_size = int(patch_size)
        self.num_levels = len(mults)
        self.downsample_factor = self.patch_size * 2 ** (self.num_levels - 1)
        self.size_multiple = self.downsample_factor * math.lcm(*windows, shift_ws)
        hc, drop, ratio = int(head_channels), float(dropout), float(mlp_ratio)
        emb_dim = 4 * self.embed_dim

        self.time_embed = TimestepEmbedding(self.embed_dim, emb_dim)
        self.image_encoder = _PatchEncoder(
            self.image_channels, self.cond_dim, self.patch_size, int(image_encoder_depth), drop
        )
        self.mask_encoder = _PatchEncoder(
            self.mask_channels, self.embed_dim, self.patch_size, int(mask_encoder_depth), drop
        )
        self.cross_attention = CrossAttentionFusion(
            self.embed_dim,
            self.cond_dim,
            self.embed_dim // hc,
            bool(position_embedding),
            str(positions),
            float(position_scale),
        )
        self.fusion = str(fusion)
        # The aligned image path: f_I token (i, j) -> the U-Net input token (i, j) (a 1x1 projection).
        self.image_proj = nn.Linear(self.cond_dim, self.embed_dim) if self.fusion == "aligned" else None

        def stage(k: int) -> _Stage:
            return _Stage(
                depth_list[k],
                dim=chans[k],
                num_heads=chans[k] // hc,
                window_sizes=windows,
                shift_window_size=shift_ws,
                emb_dim=emb_dim,
                mlp_ratio=ratio,
                dropout=drop,
            )

        last = self.num_levels - 1
        self.encoder_stages = nn.ModuleList(stage(k) for k in range(last))
        self.merges = nn.ModuleList(_PatchMerging(chans[k], chans[k + 1]) for k in range(last))
        self.bottleneck = stage(last)
        # Decoder modules indexed by level k (run from level L-2 down to 0).
        self.expands = nn.ModuleList(_PatchExpanding(chans[k + 1], chans[k]) for k in range(last))
        self.skip_projs = nn.ModuleList(nn.Linear(2 * chans[k], chans[k]) for k in range(last))
        self.decoder_stages = nn.ModuleList(stage(k) for k in range(last))

        c0 = chans[0]
        self.out_norm = nn.LayerNorm(c0)
        self.head = nn.Sequential(
            nn.ConvTranspose2d(c0, c0, kernel_size=self.patch_size, stride=self.patch_size)
            if self.patch_size > 1
            else nn.Identity(),
            nn.GroupNorm(norm_groups(c0), c0),
            nn.SiLU(),
            conv3x3(c0, self.out_channels),
        )

    # ------------------------------------------------------------------ validation
    def check_size(self, height: int, width: int) -> None:
        """Raise a ValueError naming the size if the network cannot take a (height, width) input.

        H and W must be divisible by :attr:`downsample_factor`, and at every level the windows of every
        block must tile the map (a window larger than a map side is clamped to it).

        Args:
            height: input height H.
            width: input width W.

        Raises:
            ValueError: with the input size, and the level, map size and window size that fail.
        """
        check_divisible(
            height,
            width,
            self.downsample_factor,
            why=f"patch_size {self.patch_size} x 2**(levels-1) for {self.num_levels} levels",
            multiple=self.size_multiple,
        )
        for k in range(self.num_levels):
            scale = self.patch_size * 2**k
            h, w = height // scale, width // scale
            for ws in (*self.window_sizes, self.shift_window_size):
                try:
                    effective_window(ws, h, w, False)
                except ValueError as err:
                    raise ConfigError(
                        f"input size (H, W) = ({height}, {width}) gives a {h}x{w} feature map at level {k}, "
                        f"which window size {ws} does not tile (sides must be multiples of the window size, or "
                        f"at most it); pad or resize the input (multiples of {self.size_multiple} always work)"
                    ) from err

    def _check_input(self, x: object, channels: int, what: str) -> Tensor:
        x = check_input(x, channels, what)
        self.check_size(x.shape[-2], x.shape[-1])
        return x

    # ------------------------------------------------------------------ network
    def encode_condition(self, image: Tensor) -> Tensor:
        """The image branch, ``f_I = E_I(I)`` (independent of x_t: run once per image).

        Args:
            image: (B, image_channels, H, W).

        Returns:
            (B, cond_dim, H / patch_size, W / patch_size).

        Raises:
            ValueError: wrong channel count or a size the network cannot take (see :meth:`check_size`).
        """
        self._check_input(image, self.image_channels, "image")
        return self.image_encoder(image)

    def fuse(self, x_t: Tensor, cond: Tensor) -> Tensor:
        """Mask encoder, cross-attention and (``fusion="aligned"``) the aligned image path.

        Returns:
            The U-Net input, (B, embed_dim, h, w), f_M's shape: ``CA(f_M, f_I)``, plus ``W f_I`` (a 1x1
            projection of f_I at the same place) with the aligned path.
        """
        z = self.cross_attention(self.mask_encoder(x_t), cond)
        if self.image_proj is not None:
            z = z + rearrange(self.image_proj(rearrange(cond, "b c h w -> b h w c")), "b h w c -> b c h w")
        return z

    def forward(self, x_t: Tensor, t: Tensor | int | float, cond: Tensor) -> Tensor:
        """Predict from the noisy mask, the timestep and the cached image embedding.

        Args:
            x_t: (B, mask_channels, H, W) noisy mask.
            t: (B,) timesteps (a scalar is broadcast).
            cond: ``encode_condition(image)`` for the same batch (possibly ``repeat_interleave``-d along dim 0).

        Returns:
            (B, out_channels, H, W).

        Raises:
            ValueError: wrong x_t shape or size, wrong t shape, or ``cond`` not matching x_t.
        """
        self._check_input(x_t, self.mask_channels, "x_t")
        t = batch_timesteps(t, x_t)
        p = self.patch_size
        expected = (x_t.shape[0], self.cond_dim, x_t.shape[-2] // p, x_t.shape[-1] // p)
        if not isinstance(cond, Tensor) or tuple(cond.shape) != expected:
            got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
            raise ConfigError(
                f"`cond` must be encode_condition(image) for x_t {tuple(x_t.shape)}: expected shape {expected}, "
                f"got {got}"
            )
        emb = self.time_embed(t)
        x = rearrange(self.fuse(x_t, cond), "b c h w -> b h w c")
        skips = []
        for k in range(self.num_levels - 1):
            x = self.encoder_stages[k](x, emb)
            skips.append(x)
            x = self.merges[k](x)
        x = self.bottleneck(x, emb)
        for k in reversed(range(self.num_levels - 1)):
            x = self.skip_projs[k](torch.cat([self.expands[k](x), skips[k]], dim=-1))
            x = self.decoder_stages[k](x, emb)
        x = rearrange(self.out_norm(x), "b h w c -> b c h w")
        return self.head(x)

    def forward_with_image(self, x_t: Tensor, t: Tensor | int | float, image: Tensor) -> Tensor:
        """Un-cached forward: ``forward(x_t, t, encode_condition(image))``.

        Args:
            x_t: (B, mask_channels, H, W).
            t: (B,) timesteps.
            image: (B, image_channels, H, W).

        Returns:
            (B, out_channels, H, W).
        """
        return self.forward(x_t, t, self.encode_condition(image))
