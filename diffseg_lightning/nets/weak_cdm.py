"""The class-conditional image denoiser of CDM (Hu et al., "Conditional Diffusion Models for Weakly
Supervised Medical Image Segmentation", MICCAI 2023): MONAI's ``DiffusionModelUNet`` whose class
embedding also accepts convex combinations of the class embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from diffseg_lightning.exceptions import ConfigError


class MixableClassEmbedding(nn.Embedding):
    """A class embedding ``e = f(y)`` that also embeds mixtures of classes.

    Integer labels (B,) are looked up as in :class:`torch.nn.Embedding`. Float weights (B, K), one row
    per image, give ``w @ weight``, i.e. ``sum_k w_k f(y_k)``: one-hot rows give exactly ``f(y)``, and
    ``tau * onehot(y1) + (1 - tau) * onehot(y0)`` gives CDM's interpolated condition
    ``tau f(y1) + (1 - tau) f(y0)`` (Hu et al., MICCAI 2023, Sec. 2.2). It subclasses ``nn.Embedding``
    so the parameter keeps MONAI's name (``class_embedding.weight``).

    Shapes:
        ``forward(labels)``: (B,) int64 or (B, K) float -> (B, D).
    """

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.is_floating_point():
            if labels.dim() != 2 or labels.shape[1] != self.num_embeddings:
                raise ConfigError(
                    f"class weights must be (B, {self.num_embeddings}) (one weight per class), got "
                    f"{tuple(labels.shape)}"
                )
            return labels.to(self.weight.dtype) @ self.weight
        return super().forward(labels)


class ClassConditionalUNet(nn.Module):
    """epsilon_theta(x_t, t, y): MONAI's :class:`monai.networks.nets.DiffusionModelUNet` with a class
    embedding added to the timestep embedding (Hu et al., MICCAI 2023, Sec. 2.1).

    MONAI's ``DiffusionModelUNet(num_class_embeds=K)`` computes ``emb = time_embed(t) +
    class_embedding(y)`` and feeds ``emb`` to every residual block, which is the paper's conditioning
    (and that of the released code, improved-diffusion's ``label_emb``). The class embedding is replaced
    by :class:`MixableClassEmbedding` (same parameter), so the condition may be an integer label or a
    mixture of labels; ``tests/test_weak_cdm.py`` checks that a one-hot mixture equals the integer label.

    Args:
        in_channels: image channels C (the network denoises images, so it outputs C channels).
        num_classes: K, number of image-level classes (2: healthy y0 = 0 and lesion y1 = 1).
        channels: feature channels per level (MONAI's ``channels``).
        attention_levels: self-attention per level.
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels``).

    Shapes:
        ``forward(x_t, t, cond)``: x_t (B, C, H, W), t (B,) int64, cond (B,) int64 labels or (B, K) float
        class weights -> (B, C, H, W) noise prediction. H and W must be divisible by
        ``2 ** (len(channels) - 1)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (32, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True),
        num_res_blocks: int = 1,
        num_head_channels: int = 32,
        norm_num_groups: int = 8,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"ClassConditionalUNet needs num_classes >= 2, got {num_classes}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=in_channels,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            num_class_embeds=num_classes,
        )
        old = self.unet.class_embedding
        self.unet.class_embedding = MixableClassEmbedding(old.num_embeddings, old.embedding_dim)
        self.unet.class_embedding.weight.data.copy_(old.weight.data)
        self.size_factor = 2 ** (len(tuple(channels)) - 1)

    @property
    def class_embedding(self) -> MixableClassEmbedding:
        """The learnable embedding f (K, D)."""
        return self.unet.class_embedding

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        """Nothing to cache: the condition is the class, not an image (kept for the denoiser contract)."""
        return image

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h, w = x_t.shape[-2:]
        if h % self.size_factor or w % self.size_factor:
            raise ConfigError(
                f"ClassConditionalUNet downsamples by {self.size_factor}; the image size must be divisible "
                f"by it, got {h}x{w} (set data.size to a multiple of {self.size_factor})"
            )
        return self.unet(x_t, timesteps=t, class_labels=cond)


__all__ = ["ClassConditionalUNet", "MixableClassEmbedding"]
