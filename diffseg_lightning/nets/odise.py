"""ODISE's networks: a frozen text-to-image diffusion U-Net read as a feature backbone, an implicit
captioner, and a Mask2Former-style mask generator whose mask embeddings are classified against text.

Xu, Liu, Vahdat, Byeon, Wang & De Mello, "Open-Vocabulary Panoptic Segmentation with Text-to-Image
Diffusion Models" (ODISE), CVPR 2023. Mask generator after Cheng, Misra, Schwing, Kirillov & Girdhar,
"Masked-attention Mask Transformer for Universal Image Segmentation" (Mask2Former), CVPR 2022.

The backbones come from diffusers (``UNet2DConditionModel``, ``AutoencoderKL``) and transformers
(``CLIPModel``, ``CLIPTokenizer``). Why transformers' CLIP and not open-clip-torch: ``import open_clip``
imports torchvision (``open_clip/__init__.py`` imports its transforms), which this project cannot install
next to its pinned torch; transformers' CLIP needs no torchvision and loads the same OpenAI CLIP weights
from a local folder. The tiny default tokenizer is built in code (:func:`tiny_clip_tokenizer`), so nothing is
downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.features.extractor import DiffusionFeatureExtractor

# ------------------------------------------------------------------------------------------- backbone
TINY_UNET: dict[str, Any] = {
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
TINY_VAE: dict[str, Any] = {
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],  # one downsampling: latent = image / 2
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16],
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
TINY_CLIP: dict[str, Any] = {
    "text_config": {  # 32 wide, 2 layers: at 16 x 1 the random embeddings of the five shape names had cosine 0.99
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
    },
    "vision_config": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 4,
    },
    "projection_dim": 16,
}


def tiny_clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer with a character vocabulary written by code (no download, no vocab file).

    The vocabulary is the 94 printable ASCII characters, each also with CLIP's end-of-word suffix ``</w>``,
    plus ``<|startoftext|>`` and ``<|endoftext|>`` (196 ids; other characters map to the unknown token,
    ``<|endoftext|>``), and no merges: a word is spelled letter by letter. Only for the tiny random text
    encoders of tests and synthetic runs; real weights come with their own tokenizer (``clip_path``).
    """
    from transformers import CLIPTokenizer

    chars = [chr(i) for i in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def _merge(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in (override or {}).items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, Mapping) else value
    return out


class ODISEBackbone(nn.Module):
    """The frozen pretrained parts of ODISE: the text-to-image U-Net (+ its VAE) and CLIP.

    ODISE (Xu et al., CVPR 2023) uses Stable Diffusion v1.3's U-Net on the VAE latent of the image, and
    CLIP ViT-L/14 (the text tower that conditions SD, and the image tower for the implicit captioner and
    for the mask-pooled "CLIP" class scores). All parameters here are frozen (``requires_grad`` False and
    eval mode, kept by :meth:`train`); gradients still flow through the U-Net to its conditioning input
    (the implicit captioner's tokens), as in the paper.

    Build it with :func:`build_odise_backbone` (tiny random networks from configs, or local weights).

    Args:
        unet: diffusers ``UNet2DConditionModel``; its ``cross_attention_dim`` must equal CLIP's text width.
        clip: transformers ``CLIPModel``.
        tokenizer: a CLIP tokenizer (``tokenizer(texts, padding="max_length", ...)``).
        vae: diffusers ``AutoencoderKL`` (the U-Net runs on ``scaling_factor * mean`` of its latent, the
            posterior mean as in ODISE's code, so the latent is deterministic), or None to run the U-Net on
            the image itself (its ``in_channels`` must then equal the image's).
        max_length: token length of a text (SD: 77, CLIP's context); None = CLIP's
            ``max_position_embeddings``.

    Raises:
        ValueError: the U-Net's cross-attention width differs from CLIP's text width.
    """

    def __init__(
        self,
        unet: nn.Module,
        clip: nn.Module,
        tokenizer: Any,
        vae: nn.Module | None = None,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        text_width = int(clip.config.text_config.hidden_size)
        cross = unet.config.cross_attention_dim
        if int(cross if isinstance(cross, int) else cross[0]) != text_width:
            raise ConfigError(
                f"the U-Net's cross_attention_dim ({cross}) must equal the CLIP text width ({text_width}): "
                "the implicit captioner's tokens replace SD's text tokens"
            )
        self.unet, self.clip, self.vae = unet, clip, vae
        self.tokenizer = tokenizer
        self.max_length = int(max_length or clip.config.text_config.max_position_embeddings)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ODISEBackbone:
        return super().train(False)  # frozen: always in eval mode

    @property
    def text_width(self) -> int:
        return int(self.clip.config.text_config.hidden_size)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.config.projection_dim)

    def _to_channels(self, image: Tensor, channels: int) -> Tensor:
        if image.shape[1] == channels:
            return image
        if image.shape[1] == 1:
            return image.expand(-1, channels, -1, -1)
        raise ConfigError(f"images have {image.shape[1]} channels; the backbone expects {channels} (or 1)")

    def encode_text(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """CLIP text tower: token states (K, L, D_text) (SD's conditioning) and embeddings (K, E)."""
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = self.clip.text_projection.weight.device
        out = self.clip.text_model(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
        return out.last_hidden_state, self.clip.text_projection(out.pooler_output)

    def encode_image(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """CLIP image tower on (B, C, H, W): the image embedding (B, E) and dense features (B, E, g, g).

        The dense map is every patch token through CLIP's final layer norm and projection (pooling on
        CLIP's feature map; ODISE's code offers it beside MaskCLIP's value-embedding trick).
        """
        size = int(self.clip.config.vision_config.image_size)
        channels = int(self.clip.config.vision_config.num_channels)
        pixels = F.interpolate(
            self._to_channels(image, channels), size=(size, size), mode="bilinear", align_corners=False
        )
        out = self.clip.vision_model(pixel_values=pixels)
        embed = self.clip.visual_projection(out.pooler_output)
        tokens = self.clip.visual_projection(
            self.clip.vision_model.post_layernorm(out.last_hidden_state[:, 1:])
        )
        grid = int(math.isqrt(tokens.shape[1]))
        return embed, tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid)

    def latent(self, image: Tensor) -> Tensor:
        """What the U-Net denoises: the scaled VAE posterior mean of the image, or the image itself."""
        if self.vae is None:
            return self._to_channels(image, int(self.unet.config.in_channels))
        image = self._to_channels(image, int(self.vae.config.in_channels))
        return self.vae.encode(image).latent_dist.mean * float(self.vae.config.scaling_factor)


def build_odise_backbone(
    pretrained_path: str | None = None,
    clip_path: str | None = None,
    image_channels: int = 3,
    use_vae: bool = True,
    unet: Mapping[str, Any] | None = None,
    vae: Mapping[str, Any] | None = None,
    clip: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> ODISEBackbone:
    """The ODISE backbone: tiny random networks built from configs, or local pretrained weights.

    Real weights (nothing is downloaded: both paths are local folders, loaded with
    ``local_files_only=True``)::

        model.backbone.pretrained_path=/models/stable-diffusion-v1-5   # holds unet/ and vae/ (diffusers layout)
        model.backbone.clip_path=/models/clip-vit-large-patch14        # CLIPModel + tokenizer files

    SD v1.x was trained with CLIP ViT-L/14's text tower, so ``clip_path`` must hold that CLIP (its text
    width, 768, is the U-Net's cross-attention width: checked). ODISE's images are 512 px or more; set
    ``data.size`` accordingly.

    Args:
        pretrained_path: a local Stable Diffusion folder (``unet/``, ``vae/``), or None for the tiny U-Net.
        clip_path: a local CLIP folder; None = the tiny CLIP and :func:`tiny_clip_tokenizer` (only allowed
            with the tiny U-Net).
        image_channels: channels of the images (the tiny VAE / U-Net / CLIP take them directly).
        use_vae: run the U-Net on the VAE latent (ODISE) or, False, on the image itself.
        unet, vae, clip: overrides of :data:`TINY_UNET`, :data:`TINY_VAE`, :data:`TINY_CLIP`.
        seed: seed of the tiny networks' random initialisation (the global RNG is left untouched).
    """
    if pretrained_path is not None:
        if clip_path is None:
            raise ConfigError(
                "model.backbone.clip_path must point at the local CLIP of the Stable Diffusion weights"
            )
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPModel, CLIPTokenizer

        unet_model = UNet2DConditionModel.from_pretrained(
            pretrained_path, subfolder="unet", local_files_only=True
        )
        vae_model = (
            AutoencoderKL.from_pretrained(pretrained_path, subfolder="vae", local_files_only=True)
            if use_vae
            else None
        )
        clip_model = CLIPModel.from_pretrained(clip_path, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(clip_path, local_files_only=True)
        return ODISEBackbone(unet_model, clip_model, tokenizer, vae_model)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_clip_tokenizer() if clip_path is None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if clip_path is None:
            clip_cfg = _merge(TINY_CLIP, clip)
            special = {
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            }
            clip_cfg["text_config"] = {**clip_cfg["text_config"], **special}
            clip_cfg["vision_config"] = {**clip_cfg["vision_config"], "num_channels": image_channels}
            clip_model = CLIPModel(CLIPConfig(**clip_cfg))
        else:
            from transformers import CLIPTokenizer

            clip_model = CLIPModel.from_pretrained(clip_path, local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(clip_path, local_files_only=True)
        vae_cfg = _merge(TINY_VAE, vae)
        latent_channels = int(vae_cfg["latent_channels"]) if use_vae else image_channels
        vae_model = (
            AutoencoderKL(in_channels=image_channels, out_channels=image_channels, **vae_cfg)
            if use_vae
            else None
        )
        unet_cfg = _merge(TINY_UNET, unet)
        unet_cfg.setdefault("cross_attention_dim", int(clip_model.config.text_config.hidden_size))
        unet_model = UNet2DConditionModel(
            in_channels=latent_channels, out_channels=latent_channels, **unet_cfg
        )
    return ODISEBackbone(unet_model, clip_model, tokenizer, vae_model)


# ----------------------------------------------------------------------------------- captioner
class ImplicitCaptioner(nn.Module):
    """ODISE's implicit captioner: a CLIP image embedding -> the U-Net's text-conditioning tokens.

    Xu et al. (CVPR 2023), Sec. 3.2: ``tokens = e_empty + tanh(alpha) * (W v + b + P)``, with ``e_empty``
    (1, L, D) the text encoder's tokens of the empty caption, ``v`` (B, E) the frozen CLIP image embedding,
    ``W, b`` a learned projection and ``P`` (1, L, D) a learned per-token positional embedding (the
    ``PositionalLinear`` of the authors' code, initialised N(0, 0.02^2) truncated at 2 std), and
    ``alpha`` (1, L, D) a gate initialised to zero, so that training starts from the empty caption.
    The authors' code also adds a gated projection to the U-Net's time embedding
    (``learnable_time_embed``); the paper does not describe it and it is not done here.

    Args:
        image_dim: E, CLIP's embedding width.
        seq_len: L, token length of a caption.
        width: D, the text encoder's width (= the U-Net's cross-attention width).

    Shapes:
        ``forward(image_embed (B, E), empty (1, L, D))`` -> (B, L, D).
    """

    def __init__(self, image_dim: int, seq_len: int, width: int) -> None:
        super().__init__()
        self.project = nn.Linear(image_dim, width)
        self.positional = nn.Parameter(torch.zeros(1, seq_len, width))
        nn.init.trunc_normal_(self.positional, std=0.02, a=-0.04, b=0.04)
        self.alpha = nn.Parameter(torch.zeros(1, seq_len, width))

    def forward(self, image_embed: Tensor, empty: Tensor) -> Tensor:
        prefix = self.project(image_embed).unsqueeze(1) + self.positional
        return empty + torch.tanh(self.alpha) * prefix


# ------------------------------------------------------------------------------- feature extractor
def _unet_call(backbone: nn.Module, x_t: Tensor, t: Tensor, encoder_hidden_states: Tensor) -> Any:
    return backbone(x_t, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)


# ----------------------------------------------------------------------------------- mask generator
def sine_positions(height: int, width: int, channels: int, device: torch.device) -> Tensor:
    """DETR's 2-D sine positional encoding (Carion et al., ECCV 2020), (H W, channels), normalised coords."""
    half = channels // 2
    freq = 10000 ** (2 * (torch.arange(half, device=device) // 2) / half)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    py, px = ys[:, None] / freq, xs[:, None] / freq  # (H, half), (W, half)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], dim=2).flatten(1)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], dim=2).flatten(1)
    pos = torch.cat([py[:, None].expand(-1, width, -1), px[None].expand(height, -1, -1)], dim=2)
    return F.pad(pos.reshape(height * width, -1), (0, channels - pos.shape[-1]))


class _DecoderLayer(nn.Module):
    """Mask2Former's decoder layer: masked cross-attention, then self-attention, then an FFN (post-norm)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])

    def forward(self, q: Tensor, q_pos: Tensor, memory: Tensor, m_pos: Tensor, attn_mask: Tensor) -> Tensor:
        q = self.norms[0](q + self.cross(q + q_pos, memory + m_pos, memory, attn_mask=attn_mask)[0])
        q = self.norms[1](q + self.self_attn(q + q_pos, q + q_pos, q)[0])
        return self.norms[2](q + self.ffn(q))


class MaskQueryDecoder(nn.Module):
    """A Mask2Former-style mask generator: N queries -> N binary mask logits and N mask embeddings.

    Cheng et al. (Mask2Former, CVPR 2022) as used by ODISE: a pixel decoder turns the backbone features
    into per-pixel mask features (B, D, h, w); N learned queries go through ``num_layers`` decoder layers
    (masked cross-attention to the pixel features, self-attention, FFN); after the initial queries and after
    every layer a head predicts mask logits ``<MLP(q_i), F(p)>`` and a mask embedding ``z_i = W q_i`` (E
    wide, the text embedding's width). Masked attention: a query attends only where its previous mask has
    sigmoid >= 0.5 (everywhere when that set is empty).

    Choices (ours; the released model is larger and multi-scale): the diffusion features arrive at one
    common resolution (the shared extractor resizes every block), so the pixel decoder is two convolutions
    (1x1 to D, GroupNorm + ReLU, 3x3) instead of a multi-scale deformable-attention decoder, and every layer
    attends to that one map; sine positional encodings on the pixels; learned query features and positions.

    Args:
        in_channels: channels of the backbone features.
        embed_dim: E, width of the mask embeddings (CLIP's projection width).
        hidden_dim: D.
        num_queries: N.
        num_layers: decoder layers (Mask2Former: 9).
        num_heads: attention heads.
        ffn_dim: FFN width.

    Shapes:
        ``forward(features (B, F, h, w))`` -> a list of ``num_layers + 1`` dicts, the last the final
        prediction: ``mask_logits`` (B, N, h, w), ``mask_embed`` (B, N, E).
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        hidden_dim: int = 32,
        num_queries: int = 8,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int = 64,
    ) -> None:
        super().__init__()
        groups = math.gcd(8, hidden_dim)
        self.pixel = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 1),
            nn.GroupNorm(groups, hidden_dim),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1),
        )
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_pos = nn.Embedding(num_queries, hidden_dim)
        self.layers = nn.ModuleList(
            [_DecoderLayer(hidden_dim, num_heads, ffn_dim) for _ in range(num_layers)]
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.mask_mlp = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
        )
        self.embed = nn.Linear(hidden_dim, embed_dim)
        self.num_heads = num_heads

    def _head(self, q: Tensor, pixels: Tensor) -> dict[str, Tensor]:
        q = self.norm(q)
        return {
            "mask_logits": torch.einsum("bnd,bdhw->bnhw", self.mask_mlp(q), pixels),
            "mask_embed": self.embed(q),
        }

    def _attn_mask(self, mask_logits: Tensor) -> Tensor:
        blocked = (mask_logits.flatten(2).sigmoid() < 0.5).detach()  # (B, N, h w)
        blocked &= ~blocked.all(dim=-1, keepdim=True)  # an empty mask attends everywhere
        return blocked.repeat_interleave(self.num_heads, dim=0)

    def forward(self, features: Tensor) -> list[dict[str, Tensor]]:
        pixels = self.pixel(features)  # (B, D, h, w)
        b, d, h, w = pixels.shape
        memory = pixels.flatten(2).transpose(1, 2)  # (B, h w, D)
        m_pos = sine_positions(h, w, d, pixels.device)[None]
        # repeat, not expand: a view of a parameter made under no_grad trips torch's module tracker (FLOP count)
        q = self.query_feat.weight.unsqueeze(0).repeat(b, 1, 1)
        q_pos = self.query_pos.weight.unsqueeze(0).repeat(b, 1, 1)
        outputs = [self._head(q, pixels)]
        for layer in self.layers:
            q = layer(q, q_pos, memory, m_pos, self._attn_mask(outputs[-1]["mask_logits"]))
            outputs.append(self._head(q, pixels))
        return outputs


# ----------------------------------------------------------------------------------------- ODISE
class ODISENet(nn.Module):
    """ODISE (Xu et al., CVPR 2023): frozen text-to-image diffusion features -> open-vocabulary masks.

    1. Implicit captioner: CLIP image embedding -> the U-Net's conditioning tokens (:class:`ImplicitCaptioner`).
    2. The frozen U-Net runs once on the image's latent at ``timesteps`` (ODISE: t = 0, with fixed noise
       through ``kernel.q_sample``), conditioned on those tokens; the activations of ``blocks`` are read by
       the shared feature extractor (hooks; one pass; resized to the latent's size and concatenated).
    3. :class:`MaskQueryDecoder` predicts N mask logits and N mask embeddings ``z_i``.
    4. Classification against text: ``logit_ik = s * cos(z_i, T(c_k))`` for the category names' CLIP text
       embeddings ``T(c_k)`` (frozen; a name never trained on works the same way), plus a "no object"
       logit against a learned null embedding initialised from the empty text's embedding; ``s =
       exp(logit_scale)``, clamped at 100, ``logit_scale`` initialised to log(1 / 0.07) (the authors' code).
    5. :meth:`clip_logits`: the "CLIP" scores of test time, the frozen CLIP image features pooled inside each
       predicted mask, against the same text embeddings (fused with step 4 by the method).

    Args:
        backbone: the frozen :class:`ODISEBackbone`.
        blocks: U-Net module names read as features (``named_modules`` names; an unknown name is a
            ``ValueError`` listing the valid ones).
        timesteps: diffusion timesteps of the single pass (ODISE: [0]).
        kernel: the Gaussian kernel that noises the latent to each timestep with fixed noise (ODISE's
            ``q_sample`` at t = 0), or None for the clean latent.
        noise_seed: seed of the fixed noise.
        implicit_captioner: condition the U-Net on the implicit captioner's tokens (ODISE) or, False, on the
            empty caption (the paper's "no caption" ablation).
        prompt: template of the category texts, e.g. ``"a photo of a {}."``.
        hidden_dim, num_queries, num_layers, num_heads, ffn_dim: of :class:`MaskQueryDecoder`.
    """

    def __init__(
        self,
        backbone: ODISEBackbone,
        blocks: Sequence[str] = ("up_blocks.0.resnets.1", "up_blocks.1.attentions.1"),
        timesteps: Sequence[int] = (0,),
        kernel: Any = None,  # a GaussianKernel: nets/ does not import diffusion/; the extractor checks it
        noise_seed: int = 0,
        implicit_captioner: bool = True,
        prompt: str = "a photo of a {}.",
        hidden_dim: int = 32,
        num_queries: int = 8,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int = 64,
    ) -> None:
        super().__init__()
        if "{}" not in prompt:
            raise ConfigError(f"prompt must contain '{{}}' where the category name goes, got {prompt!r}")
        self.backbone = backbone
        self.prompt = prompt
        # differentiable: the captioner's tokens are trained through the frozen U-Net (Sec. 3.2)
        self.extractor = DiffusionFeatureExtractor(
            backbone.unet,
            blocks,
            timesteps,
            kernel=kernel,
            noise_seed=noise_seed,
            call=_unet_call,
            differentiable=True,
        )
        with torch.no_grad():
            empty_tokens, empty_embed = backbone.encode_text([""])
        self.register_buffer("empty_tokens", empty_tokens, persistent=False)
        self.captioner = (
            ImplicitCaptioner(backbone.embed_dim, empty_tokens.shape[1], backbone.text_width)
            if implicit_captioner
            else None
        )
        self.null_embed = nn.Parameter(empty_embed.clone())  # (1, E)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        channels = self._feature_channels()
        self.decoder = MaskQueryDecoder(
            channels, backbone.embed_dim, hidden_dim, num_queries, num_layers, num_heads, ffn_dim
        )
        self._text_cache: dict[tuple, Tensor] = {}

    def _feature_channels(self) -> int:
        unet = self.backbone.unet
        size = int(unet.config.sample_size) if isinstance(unet.config.sample_size, int) else 16
        probe = torch.zeros(1, int(unet.config.in_channels), min(size, 16), min(size, 16))
        with torch.no_grad():
            self.extractor(probe, encoder_hidden_states=self.empty_tokens)
        return self.extractor.out_channels

    def text_embeddings(self, names: Sequence[str]) -> Tensor:
        """Frozen CLIP text embeddings (K, E) of the prompted category names (cached per names and device)."""
        device = self.null_embed.device
        key = (tuple(names), str(device))
        if key not in self._text_cache:
            with torch.no_grad():
                self._text_cache[key] = self.backbone.encode_text([self.prompt.format(n) for n in names])[
                    1
                ].detach()
        return self._text_cache[key]

    def condition(self, image_embed: Tensor) -> Tensor:
        """The U-Net's conditioning tokens (B, L, D): the implicit caption, or the empty caption."""
        empty = self.empty_tokens.to(image_embed.dtype)
        if self.captioner is None:
            return empty.expand(image_embed.shape[0], -1, -1)
        return self.captioner(image_embed, empty)

    def classify(self, mask_embed: Tensor, text_embed: Tensor) -> Tensor:
        """(B, N, E) mask embeddings x (K, E) text embeddings -> (B, N, K + 1) logits, the last "no object"."""
        scale = self.logit_scale.exp().clamp(max=100.0)
        targets = F.normalize(torch.cat([text_embed, self.null_embed], dim=0), dim=-1)
        return scale * F.normalize(mask_embed, dim=-1) @ targets.t()

    def forward(self, image: Tensor, names: Sequence[str]) -> dict[str, Any]:
        """Predict masks and class logits for (B, C, H, W) images and the vocabulary ``names`` (K names).

        Returns:
            ``predictions``: the decoder's outputs (the last is final), each with ``mask_logits``
            (B, N, h, w), ``mask_embed`` (B, N, E) and ``class_logits`` (B, N, K + 1); ``clip_dense``
            (B, E, g, g), the frozen CLIP features; ``text_embed`` (K, E).
        """
        with torch.no_grad():
            image_embed, clip_dense = self.backbone.encode_image(image)
            latent = self.backbone.latent(image)
        features = self.extractor(latent, encoder_hidden_states=self.condition(image_embed))
        text_embed = self.text_embeddings(names)
        predictions = self.decoder(features)
        for out in predictions:
            out["class_logits"] = self.classify(out["mask_embed"], text_embed)
        return {"predictions": predictions, "clip_dense": clip_dense, "text_embed": text_embed}

    def clip_logits(self, mask_logits: Tensor, clip_dense: Tensor, text_embed: Tensor) -> Tensor:
        """(B, N, K) CLIP class logits: CLIP's dense features averaged with each mask's sigmoid as weights.

        ``e_i = sum_p m_i(p) f(p) / sum_p m_i(p)``, ``logit_ik = s_CLIP * cos(e_i, T(c_k))`` with CLIP's own
        logit scale; masks are resized (bilinear) to CLIP's feature grid.
        """
        weights = F.interpolate(mask_logits, size=clip_dense.shape[-2:], mode="bilinear", align_corners=False)
        weights = weights.sigmoid().flatten(2)  # (B, N, g g)
        pooled = torch.einsum("bnp,bep->bne", weights, clip_dense.flatten(2)) / weights.sum(
            -1, keepdim=True
        ).clamp_min(1e-6)
        scale = self.backbone.clip.logit_scale.exp().clamp(max=100.0)
        return scale * F.normalize(pooled, dim=-1) @ F.normalize(text_embed, dim=-1).t()


__all__ = [
    "ImplicitCaptioner",
    "MaskQueryDecoder",
    "ODISEBackbone",
    "ODISENet",
    "build_odise_backbone",
    "sine_positions",
    "tiny_clip_tokenizer",
]
