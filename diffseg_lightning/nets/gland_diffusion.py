"""The networks of the instance-aware gland diffusion model (Sun, Huang & Zheng, MICCAI 2023).

Sun, Huang & Zheng, "Instance-Aware Diffusion Model for Gland Segmentation in Colon Histology Images",
MICCAI 2023: a ResNet-FPN backbone gives multi-scale features (the last one is ``F_R``); a multi-scale mask
branch fuses them into ``F_mask``; a DiffusionDet-style decoder denoises N noisy boxes conditioned on the
features and the timestep; from each box's feature, *instance-aware filters* (the parameters of a small
dynamic convolution head, CondInst style) run on ``F_mask`` with relative coordinates and give that
instance's mask; *conditional encoding* adds an encoding of the original image to the intermediate features.

The box decoder follows DiffusionDet (Chen, Sun, Song & Luo, ICCV 2023) and Sparse R-CNN (Sun et al.,
CVPR 2021); the dynamic mask head CondInst (Tian, Shen & Chen, ECCV 2020). No code of Sun et al. was
released; every setting the paper leaves open is DiffusionDet's or CondInst's published default, written
down in :class:`GlandDiffusionNet`. Plain ``nn.Module`` s: no Lightning, no Hydra, no noise kernel; the
diffusion over boxes lives in :mod:`diffseg_lightning.methods.gland_diffusion`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
from monai.networks.nets.resnet import ResNet
from torch import Tensor, nn

from diffseg_lightning.exceptions import ConfigError, DiffSegError
from diffseg_lightning.utils.boxes import apply_deltas, box_area

__all__ = [
    "DynamicMaskHead",
    "GlandDiffusionNet",
    "MaskBranch",
    "ResNetFPN",
    "roi_align",
]


class ResNetFPN(nn.Module):
    """MONAI's 2-D ResNet (He et al., CVPR 2016) with MONAI's feature pyramid (Lin et al., CVPR 2017).

    Returns the pyramid P2..P5 (strides 4, 8, 16, 32). Randomly initialised by default; ``pretrained_path``
    loads a local ``state_dict`` (e.g. converted torchvision ImageNet weights) into the ResNet.

    Args:
        in_channels: image channels.
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50+).
        layers: blocks per stage, e.g. (2, 2, 2, 2) ResNet-18, (3, 4, 6, 3) ResNet-50.
        block_inplanes: widths of the four stages (the ResNet's are 64, 128, 256, 512).
        fpn_channels: channels of every pyramid level.
        pretrained_path: a ``.pt``/``.pth`` file holding a ResNet ``state_dict`` (keys ``conv1.weight``,
            ``layer1.0...``; a ``state_dict`` entry or ``module.`` prefixes are unwrapped), or None.

    Shapes:
        ``forward(image)``: (B, C, H, W) -> list of 4 tensors (B, fpn_channels, H / s, W / s), s = 4..32.
    """

    strides = (4, 8, 16, 32)

    def __init__(
        self,
        in_channels: int = 3,
        block: str = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        fpn_channels: int = 256,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ConfigError(f"ResNetFPN: block must be 'basic' or 'bottleneck', got {block!r}")
        if len(layers) != 4 or len(block_inplanes) != 4:
            raise ConfigError(
                f"ResNetFPN: layers and block_inplanes need 4 entries, got {layers}, {block_inplanes}"
            )
        self.resnet = ResNet(
            block,
            list(layers),
            list(block_inplanes),
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            feed_forward=False,
        )
        expansion = 1 if block == "basic" else 4
        self.fpn = FeaturePyramidNetwork(2, [p * expansion for p in block_inplanes], fpn_channels)
        if pretrained_path is not None:
            self.load_backbone(pretrained_path)

    def load_backbone(self, path: str) -> None:
        """Load a local ResNet ``state_dict``; raise when the file is missing or no weight matches."""
        file = Path(path)
        if not file.is_file():
            raise DiffSegError(f"ResNetFPN: pretrained weights {file} do not exist")
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        own = self.resnet.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not usable:
            raise ConfigError(f"ResNetFPN: no weight of {file} matches the ResNet (names or shapes differ)")
        self.resnet.load_state_dict(usable, strict=False)

    def forward(self, image: Tensor) -> list[Tensor]:
        r = self.resnet
        x = r.act(r.bn1(r.conv1(image)))
        x = r.maxpool(x)
        c2 = r.layer1(x)
        c3 = r.layer2(c2)
        c4 = r.layer3(c3)
        c5 = r.layer4(c4)
        return list(self.fpn(OrderedDict(c2=c2, c3=c3, c4=c4, c5=c5)).values())


def _conv_norm_act(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(max(1, min(32, cout // 2)), cout),
        nn.ReLU(),
    )


class ConditionalEncoding(nn.Module):
    """Conditional encoding (Sun et al.): add an encoding of the original image to every pyramid level.

    The paper says only that the intermediate features are enhanced with the original image's encoding. Ours:
    the image, average-pooled to each level's size, through a 3x3 convolution per level, added to the level.

    Shapes:
        ``forward(image, features)``: (B, C_img, H, W) and a list of (B, D, h_l, w_l) -> the same list.
    """

    def __init__(self, in_channels: int, channels: int, num_levels: int = 4) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(
            nn.Conv2d(in_channels, channels, 3, padding=1) for _ in range(num_levels)
        )

    def forward(self, image: Tensor, features: list[Tensor]) -> list[Tensor]:
        return [
            f + enc(F.adaptive_avg_pool2d(image, f.shape[-2:]))
            for f, enc in zip(features, self.encoders, strict=True)
        ]


class MaskBranch(nn.Module):
    """The multi-scale mask branch: pyramid levels fused into ``F_mask`` at the finest level's resolution.

    CondInst (Tian et al., ECCV 2020) refines each level with a 3x3 conv, upsamples to the finest, sums, then
    applies ``num_convs`` 3x3 convs and a 1x1 conv to ``out_channels`` (its defaults: 128 channels, 4 convs,
    8 output channels; it fuses P3-P5 at stride 8). Sun et al. fuse the multi-scale features without more
    detail; we fuse P2-P5 at stride 4 (the glands' thin boundaries) with CondInst's widths.

    Shapes:
        ``forward(features)``: list of (B, D, h_l, w_l), finest first -> (B, out_channels, h_0, w_0).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 128,
        out_channels: int = 8,
        num_convs: int = 4,
        num_levels: int = 4,
    ) -> None:
        super().__init__()
        self.refine = nn.ModuleList(_conv_norm_act(in_channels, channels) for _ in range(num_levels))
        self.tower = nn.Sequential(
            *[_conv_norm_act(channels, channels) for _ in range(num_convs)],
            nn.Conv2d(channels, out_channels, 1),
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        fused = sum(
            F.interpolate(refine(f), size=size, mode="bilinear", align_corners=False) if i else refine(f)
            for i, (refine, f) in enumerate(zip(self.refine, features, strict=True))
        )
        return self.tower(fused)


def roi_align(
    features: list[Tensor],
    boxes: Tensor,
    image_size: tuple[int, int],
    output_size: int = 7,
    sampling_ratio: int = 2,
    canonical_size: float = 224.0,
    canonical_level: int = 4,
) -> Tensor:
    """RoIAlign over a feature pyramid with ``grid_sample`` (torchvision's ``roi_align`` is not installed).

    Each box goes to pyramid level ``k = floor(k0 + log2(sqrt(area) / 224))`` (Lin et al., CVPR 2017, Eq. 1,
    with k0 = 4, clamped to the levels P2..P5 given), as detectron2's ``ROIPooler`` (DiffusionDet's) does.
    Every output bin averages ``sampling_ratio``^2 bilinear samples at the bin's regular sub-grid (RoIAlign,
    He et al., ICCV 2017, "aligned": continuous pixel coordinates, pixel centres at +0.5). Every level is
    sampled for every box and the box's level selected afterwards, so that one call has no Python loop over
    boxes and no host synchronisation.

    Args:
        features: P2..P5 (B, D, H / s, W / s) with s = 4, 8, 16, 32 (or fewer levels, finest first).
        boxes: (B, N, 4) xyxy in pixels of the (H, W) image.
        image_size: (H, W).

    Returns:
        (B, N, D, output_size, output_size).
    """
    b, n, _ = boxes.shape
    h_img, w_img = image_size
    g = output_size * sampling_ratio
    steps = (torch.arange(g, device=boxes.device, dtype=boxes.dtype) + 0.5) / g  # sub-bin centres in [0, 1]
    x1, y1, x2, y2 = boxes.unbind(-1)  # (B, N)
    xs = x1[..., None] + (x2 - x1)[..., None] * steps  # (B, N, g)
    ys = y1[..., None] + (y2 - y1)[..., None] * steps
    grid = torch.stack(
        [
            (2 * xs / w_img - 1)[:, :, None, :].expand(b, n, g, g),
            (2 * ys / h_img - 1)[:, :, :, None].expand(b, n, g, g),
        ],
        dim=-1,
    ).reshape(b, n * g, g, 2)
    scale = box_area(boxes).clamp(min=1e-6).sqrt()
    level = torch.floor(canonical_level + torch.log2(scale / canonical_size + 1e-8))
    level = (level.clamp(2, 1 + len(features)) - 2).long()  # (B, N) index into features
    out = None
    for i, feat in enumerate(features):  # (B, D, N * g, g) samples of every box at this level
        sampled = F.grid_sample(feat, grid.to(feat.dtype), mode="bilinear", align_corners=False)
        pick = (level == i)[:, None, :, None, None]  # (B, 1, N, 1, 1)
        sampled = sampled.reshape(b, feat.shape[1], n, g, g)
        out = torch.where(pick, sampled, out) if out is not None else sampled * pick
    d = out.shape[1]
    if sampling_ratio > 1:
        out = F.avg_pool2d(out.reshape(b, d * n, g, g), sampling_ratio).reshape(
            b, d, n, output_size, output_size
        )
    return out.permute(0, 2, 1, 3, 4)


class SinusoidalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of the timestep (Vaswani et al., 2017): (B,) -> (B, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1)
        )
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class DynamicConv(nn.Module):
    """Sparse R-CNN's instance interaction (Sun et al., CVPR 2021): each proposal's feature generates two
    1x1 "convolutions" applied to its own RoI features.

    Shapes:
        ``forward(pro_features, roi_features)``: (B, N, D) and (B, N, P, D), P = pooled bins -> (B, N, D).
    """

    def __init__(self, d_model: int, dim_dynamic: int = 64, pooler_resolution: int = 7) -> None:
        super().__init__()
        self.d_model, self.dim_dynamic = d_model, dim_dynamic
        self.dynamic_layer = nn.Linear(d_model, 2 * d_model * dim_dynamic)
        self.norm1 = nn.LayerNorm(dim_dynamic)
        self.norm2 = nn.LayerNorm(d_model)
        self.out_layer = nn.Linear(d_model * pooler_resolution**2, d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, pro_features: Tensor, roi_features: Tensor) -> Tensor:
        b, n, p, d = roi_features.shape
        params = self.dynamic_layer(pro_features).reshape(b * n, 2, -1)
        p1 = params[:, 0].reshape(b * n, d, self.dim_dynamic)
        p2 = params[:, 1].reshape(b * n, self.dim_dynamic, d)
        x = roi_features.reshape(b * n, p, d)
        x = F.relu(self.norm1(torch.bmm(x, p1)))
        x = F.relu(self.norm2(torch.bmm(x, p2)))
        return F.relu(self.norm3(self.out_layer(x.flatten(1)))).reshape(b, n, d)


def _mlp_tower(d_model: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(d_model, d_model, bias=False), nn.LayerNorm(d_model), nn.ReLU()]
    return nn.Sequential(*layers)


class DecoderStage(nn.Module):
    """One stage of DiffusionDet's iterative head (Chen et al., ICCV 2023, built on Sparse R-CNN).

    Proposal features: self-attention among the N proposals, instance interaction with their RoI features
    (:class:`DynamicConv`), a feed-forward block, then the timestep's scale and shift
    (``x * (scale + 1) + shift``); a class logit and box deltas (applied with weights (2, 2, 1, 1)) follow.

    Shapes:
        ``forward(roi_features, pro_features, boxes, time_emb)``: (B, N, D, r, r), (B, N, D) or None (the
        first stage: the mean of the RoI features), (B, N, 4) xyxy, (B, 4D) -> logits (B, N), refined boxes
        (B, N, 4) and the stage's proposal features (B, N, D).
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dim_dynamic: int = 64,
        pooler_resolution: int = 7,
        dropout: float = 0.0,
        num_cls: int = 1,
        num_reg: int = 3,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.interact = DynamicConv(d_model, dim_dynamic, pooler_resolution)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_feedforward),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(dim_feedforward, d_model),
        )
        self.norm1, self.norm2, self.norm3 = (
            nn.LayerNorm(d_model),
            nn.LayerNorm(d_model),
            nn.LayerNorm(d_model),
        )
        self.dropout = nn.Dropout(dropout)
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(4 * d_model, 2 * d_model))
        self.cls_tower = _mlp_tower(d_model, num_cls)
        self.reg_tower = _mlp_tower(d_model, num_reg)
        self.class_logits = nn.Linear(d_model, 1)
        self.box_deltas = nn.Linear(d_model, 4)
        # DiffusionDet's initialisation: focal-loss prior on the class bias, zero box deltas
        nn.init.constant_(self.class_logits.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.box_deltas.weight)
        nn.init.zeros_(self.box_deltas.bias)

    def forward(
        self, roi_features: Tensor, pro_features: Tensor | None, boxes: Tensor, time_emb: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, n, d = roi_features.shape[:3]
        rois = roi_features.flatten(3).transpose(2, 3)  # (B, N, r*r, D)
        x = rois.mean(dim=2) if pro_features is None else pro_features
        x = self.norm1(x + self.dropout(self.self_attn(x, x, x, need_weights=False)[0]))
        x = self.norm2(x + self.dropout(self.interact(x, rois)))
        x = self.norm3(x + self.dropout(self.ffn(x)))
        scale, shift = self.time_mlp(time_emb)[:, None].chunk(2, dim=-1)
        x = x * (scale + 1) + shift
        logits = self.class_logits(self.cls_tower(x)).squeeze(-1)
        refined = apply_deltas(self.box_deltas(self.reg_tower(x)), boxes.detach())
        return logits, refined, x


class DynamicMaskHead(nn.Module):
    """CondInst's dynamic mask head (Tian, Shen & Chen, ECCV 2020): per instance, a small FCN whose weights are
    that instance's filter parameters, run on ``F_mask`` concatenated with coordinates relative to the instance.

    ``num_layers`` 1x1 convolutions (CondInst: 3 layers of 8 channels, ReLU between, one output channel; a
    1x1 kernel as in CondInst). Relative coordinates: ``((x - cx) / W, (y - cy) / H)`` with ``(cx, cy)`` the
    instance's box centre and the image's (W, H) as the normaliser (CondInst divides by a fixed size of
    interest; the paper is silent). All instances of a batch run as one ``einsum`` per layer.

    Shapes:
        ``forward(mask_features, centres, params, image_size)``: (B, C, h, w), (B, K, 2) pixel (x, y), (B, K,
        num_params) -> (B, K, h, w) mask logits.
    """

    def __init__(self, in_channels: int = 8, channels: int = 8, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ConfigError(f"DynamicMaskHead: num_layers must be >= 1, got {num_layers}")
        dims = [in_channels + 2] + [channels] * (num_layers - 1) + [1]
        self.shapes = list(zip(dims[1:], dims[:-1], strict=True))  # (out, in) per layer
        self.num_params = sum(o * i + o for o, i in self.shapes)

    def split(self, params: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(B, K, num_params) -> per layer (weight (B, K, out, in), bias (B, K, out))."""
        if params.shape[-1] != self.num_params:
            raise ConfigError(
                f"DynamicMaskHead: expected {self.num_params} parameters, got {params.shape[-1]}"
            )
        sizes = [s for o, i in self.shapes for s in (o * i, o)]
        chunks = params.split(sizes, dim=-1)
        return [
            (chunks[2 * j].reshape(*params.shape[:2], o, i), chunks[2 * j + 1])
            for j, (o, i) in enumerate(self.shapes)
        ]

    def forward(
        self, mask_features: Tensor, centres: Tensor, params: Tensor, image_size: tuple[int, int]
    ) -> Tensor:
        b, _, h, w = mask_features.shape
        k = centres.shape[1]
        h_img, w_img = image_size
        dev, dt = mask_features.device, mask_features.dtype
        ys = (torch.arange(h, device=dev, dtype=dt) + 0.5) * (h_img / h)  # pixel centres of F_mask's grid
        xs = (torch.arange(w, device=dev, dtype=dt) + 0.5) * (w_img / w)
        rel_x = (xs[None, None, None, :] - centres[..., 0, None, None]) / w_img  # (B, K, 1, w)
        rel_y = (ys[None, None, :, None] - centres[..., 1, None, None]) / h_img  # (B, K, h, 1)
        coords = torch.stack([rel_x.expand(b, k, h, w), rel_y.expand(b, k, h, w)], dim=2)
        x = torch.cat(
            [mask_features[:, None].expand(b, k, -1, h, w), coords.to(dt)], dim=2
        )  # (B, K, C+2, h, w)
        layers = self.split(params)
        for j, (weight, bias) in enumerate(layers):
            x = torch.einsum("bkoi,bkihw->bkohw", weight, x) + bias[..., None, None]
            if j < len(layers) - 1:
                x = F.relu(x)
        return x[:, :, 0]


class GlandDiffusionNet(nn.Module):
    """Instance-aware diffusion network for glands (Sun, Huang & Zheng, MICCAI 2023).

    ``encode(image)`` runs once per image: ResNet-FPN features, conditional encoding, and ``F_mask`` (mask
    branch). ``decode(boxes, t, cond)`` is one denoising pass of the N boxes at timestep ``t``: RoI features
    from the pyramid, ``num_stages`` iterative DiffusionDet stages (each refines the boxes and scores them),
    and the instance-aware filters (a linear layer on the last stage's time-modulated proposal features).
    ``masks(cond, boxes, filters)`` runs the CondInst dynamic head on ``F_mask``.

    Settings the paper leaves open, with DiffusionDet's / CondInst's published defaults (in brackets; the
    configs change widths for speed): ResNet-50 [``block=bottleneck``, layers (3, 4, 6, 3)], FPN 256 channels,
    decoder width 256, 8 attention heads, feed-forward 2048, dynamic dim 64, 6 stages, RoIAlign 7x7 with 2x2
    samples per bin, one class tower layer and three box tower layers, time embedding 4 x width; mask branch
    128 channels, 4 convs, 8 output channels; dynamic head 3 layers of 8 channels with relative coordinates.

    Args:
        in_channels: image channels.
        backbone: a module mapping (B, C, H, W) to the pyramid P2..P5 (:class:`ResNetFPN`).
        fpn_channels: channels of the pyramid (= the decoder width D).
        num_stages: iterative decoder stages.
        nhead, dim_feedforward, dim_dynamic, dropout: decoder stage settings (:class:`DecoderStage`).
        pooler_resolution: RoIAlign output size.
        sampling_ratio: bilinear samples per bin side in RoIAlign (1 is 4x cheaper than 2 on CPU).
        mask_branch_channels, mask_channels, mask_branch_convs: :class:`MaskBranch`.
        mask_head_channels, mask_head_layers: :class:`DynamicMaskHead`.
        conditional_encoding: add the image encoding to the pyramid (the paper's; off for ablation).
    """

    def __init__(
        self,
        backbone: nn.Module,
        in_channels: int = 3,
        fpn_channels: int = 256,
        num_stages: int = 6,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dim_dynamic: int = 64,
        dropout: float = 0.0,
        pooler_resolution: int = 7,
        sampling_ratio: int = 2,
        mask_branch_channels: int = 128,
        mask_channels: int = 8,
        mask_branch_convs: int = 4,
        mask_head_channels: int = 8,
        mask_head_layers: int = 3,
        conditional_encoding: bool = True,
    ) -> None:
        super().__init__()
        if num_stages < 1:
            raise ConfigError(f"GlandDiffusionNet: num_stages must be >= 1, got {num_stages}")
        self.backbone = backbone
        self.pooler_resolution = pooler_resolution
        if sampling_ratio < 1:
            raise ConfigError(f"GlandDiffusionNet: sampling_ratio must be >= 1, got {sampling_ratio}")
        self.sampling_ratio = sampling_ratio
        self.cond_encoding = ConditionalEncoding(in_channels, fpn_channels) if conditional_encoding else None
        self.mask_branch = MaskBranch(fpn_channels, mask_branch_channels, mask_channels, mask_branch_convs)
        self.time_embed = nn.Sequential(
            SinusoidalEmbedding(fpn_channels),
            nn.Linear(fpn_channels, 4 * fpn_channels),
            nn.GELU(),
            nn.Linear(4 * fpn_channels, 4 * fpn_channels),
        )
        self.stages = nn.ModuleList(
            DecoderStage(fpn_channels, nhead, dim_feedforward, dim_dynamic, pooler_resolution, dropout)
            for _ in range(num_stages)
        )
        self.mask_head = DynamicMaskHead(mask_channels, mask_head_channels, mask_head_layers)
        self.controller = nn.Linear(fpn_channels, self.mask_head.num_params)

    def encode(self, image: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """(B, C, H, W) -> ``{"features": P2..P5, "mask_features": F_mask (B, C_m, H/4, W/4), "image": image}``."""
        features = self.backbone(image)
        if self.cond_encoding is not None:
            features = self.cond_encoding(image, features)
        return {"features": features, "mask_features": self.mask_branch(features), "image": image}

    def decode(self, boxes: Tensor, t: Tensor, cond: dict) -> dict[str, Tensor]:
        """Denoise (B, N, 4) xyxy pixel boxes at timesteps ``t`` (B,).

        Returns:
            ``logits`` (S, B, N) and ``boxes`` (S, B, N, 4) xyxy pixels, one row per stage (the last is the
            prediction), and ``filters`` (B, N, num_params) from the last stage.
        """
        size = tuple(cond["image"].shape[-2:])
        time_emb = self.time_embed(t)
        pro = None
        all_logits, all_boxes = [], []
        for stage in self.stages:
            rois = roi_align(
                cond["features"], boxes.detach(), size, self.pooler_resolution, self.sampling_ratio
            )
            logits, boxes, pro = stage(rois, pro, boxes, time_emb)
            all_logits.append(logits)
            all_boxes.append(boxes)
        return {
            "logits": torch.stack(all_logits),
            "boxes": torch.stack(all_boxes),
            "filters": self.controller(pro),
        }

    def masks(self, cond: dict, boxes: Tensor, filters: Tensor) -> Tensor:
        """Instance mask logits (B, K, H, W) at the image size for (B, K, 4) boxes and their filters."""
        centres = torch.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2], -1)
        size = tuple(cond["image"].shape[-2:])
        logits = self.mask_head(cond["mask_features"], centres, filters, size)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, boxes: Tensor, t: Tensor, image: Tensor) -> dict[str, Tensor]:
        """One full pass (image branch included), for the network cost: boxes (B, N, 4), t (B,), image."""
        return self.decode(boxes, t, self.encode(image))
