"""Diffusion features as representations: a frozen denoiser read through forward hooks.

References:
    Baranchuk, Rubachev, Voynov, Khrulkov & Babenko (2022), "Label-Efficient Semantic
    Segmentation with Diffusion Models" (ICLR): noise the image to a few timesteps, run the
    pretrained DDPM once, read decoder activations, upsample them to the image size and
    concatenate them into per-pixel features.
    Carrion & Norouzi (2023), "FEDD: Fair, Efficient, and Diverse Diffusion-based Lesion
    Segmentation and Malignancy Classification" (MICCAI).
    Lv et al. (2023), "Diffusion Kinetic Model for Breast Cancer Segmentation in Incomplete
    DCE-MRI" (MICCAI); Xu et al. (2023), "Open-Vocabulary Panoptic Segmentation with
    Text-to-Image Diffusion Models" (ODISE, CVPR): the same mechanism on other backbones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffseg_lightning.exceptions import ConfigError

if TYPE_CHECKING:
    from diffseg_lightning.diffusion.gaussian import GaussianKernel

__all__ = ["DiffusionFeatureExtractor"]


def _first_tensor(output: Any) -> Tensor:
    """The activation a hook reads: the module output, or the first tensor of a tuple/list output."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    raise TypeError(f"a hooked block returned {type(output).__name__}, which holds no tensor")


def _default_call(backbone: nn.Module, x_t: Tensor, t: Tensor, **kwargs: Any) -> Any:
    return backbone(x_t, t, **kwargs)


def _guess_in_channels(backbone: nn.Module) -> int | None:
    """The input channels of the backbone's first convolution (for the dry run), or None."""
    for module in backbone.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return int(module.in_channels)
    return None


class DiffusionFeatureExtractor(nn.Module):
    """Frozen diffusion backbone -> per-pixel features of chosen blocks at chosen timesteps.

    The shared mechanism of issue 8 (FEDD, Carrion & Norouzi, MICCAI 2023; the Diffusion
    Kinetic Model, Lv et al., MICCAI 2023; ODISE, Xu et al., CVPR 2023), after Baranchuk et
    al. (ICLR 2022). For an image batch ``x`` (B, C, H, W) and timesteps ``t_1..t_K``:

    1. ``x_{t_k} = q_sample(x, t_k, eps_k)`` with the kernel (or ``x`` itself without one);
    2. ONE backbone pass on the (K B, C, H, W) stack ``[x_{t_1}; ...; x_{t_K}]`` (timestep-major;
       tensor keyword arguments with a batch axis are repeated alongside);
    3. forward hooks read the output of each named block (the first tensor when a block
       returns a tuple, as MONAI's down blocks do), each (K B, C_b, h_b, w_b);
    4. each activation is resized bilinearly (``align_corners=False``) to the output size and
       the maps are concatenated along channels, ordered by timestep, then by block:
       ``[t_1: b_1, ..., b_N, t_2: b_1, ..., b_N, ...]`` -> (B, sum_b C_b * K, H_out, W_out).

    Choices (the papers leave them open):
        * The noise is fixed: ``eps_k`` is drawn once from ``noise_seed`` for ONE image of
          shape (C, H, W) per timestep and shared by every image of every batch, so that the
          same image always gives the same features, whatever its batch or position (needed
          for the disk cache and for reproducible probes). Baranchuk et al.'s released code
          also fixes the noise once per run.
        * The backbone is frozen: ``requires_grad`` False and eval mode, kept in eval by
          ``train()``; the pass runs under ``torch.inference_mode()`` (unless ``differentiable``); the result is cloned
          out of inference mode so that a probe can use it as an ordinary input.
        * Hooks are registered for the duration of ``forward`` only and removed in a
          ``finally`` clause, so the backbone behaves normally everywhere else.
        * ``out_channels`` is measured by a dry run on zeros (1, C_in, s, s), with ``C_in``
          taken from the backbone's first convolution and ``s`` the output size (default 32),
          or read from the first real forward; call ``measure(example)`` when the backbone
          needs keyword arguments or another input size.

    Args:
        backbone: a trained denoiser ``f(x_t, t, **kwargs)`` (e.g. MONAI ``DiffusionModelUNet``).
        blocks: names of modules of the backbone (as in ``named_modules()``) whose outputs are read.
        timesteps: diffusion timesteps; each must lie in ``[0, T)`` when a kernel is given.
        kernel: the Gaussian kernel that noises the input (``q_sample``); ``None`` = the input
            is passed as is at every timestep (ODISE runs at t = 0 on the clean latent).
        output_size: common resolution ``H_out`` or ``(H_out, W_out)``; ``None`` = the input's.
        noise_seed: seed of the fixed noise.
        call: ``call(backbone, x_t, t, **kwargs)`` runs the backbone (e.g. to pass a text
            context to a diffusers U-Net); default ``backbone(x_t, t, **kwargs)``.
        differentiable: run the pass with autograd on instead of under ``inference_mode``: the
            backbone stays frozen, but gradients reach the inputs and tensor keyword arguments
            (ODISE trains its implicit captioner's tokens through the frozen U-Net).

    Raises:
        ValueError: an unknown block (the message lists ``valid_blocks``), no blocks or no
            timesteps, a timestep outside the kernel's range, a bad output size.
    """

    def __init__(
        self,
        backbone: nn.Module,
        blocks: Sequence[str],
        timesteps: Sequence[int],
        kernel: GaussianKernel | None = None,
        output_size: int | tuple[int, int] | None = None,
        noise_seed: int = 0,
        call: Callable[..., Any] | None = None,
        differentiable: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(blocks, str):
            blocks = [blocks]
        blocks = [str(b) for b in blocks]
        timesteps = [int(t) for t in timesteps]
        if not blocks:
            raise ConfigError("blocks is empty: name at least one module of the backbone")
        if not timesteps:
            raise ConfigError("timesteps is empty: give at least one diffusion timestep")
        modules = dict(backbone.named_modules())
        self.valid_blocks: list[str] = [name for name in modules if name]
        unknown = [b for b in blocks if b not in modules or not b]
        if unknown:
            raise ConfigError(
                f"unknown block(s) {unknown} for {type(backbone).__name__}; valid blocks are {self.valid_blocks}"
            )
        if len(set(blocks)) != len(blocks):
            raise ConfigError(f"blocks has duplicates: {blocks}")
        if kernel is not None:
            T = int(kernel.num_train_timesteps)
            bad = [t for t in timesteps if not 0 <= t < T]
            if bad:
                raise ConfigError(f"timesteps {bad} are outside [0, {T}) of the kernel")
        elif any(t < 0 for t in timesteps):
            raise ConfigError(f"timesteps must be >= 0, got {timesteps}")
        if output_size is not None:
            size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
            if len(size) != 2 or any(int(s) <= 0 for s in size):
                raise ConfigError(f"output_size must be a positive int or (H, W), got {output_size!r}")
            output_size = (int(size[0]), int(size[1]))
        self.backbone = backbone
        self.blocks: list[str] = blocks
        self.timesteps: list[int] = timesteps
        self.kernel = kernel
        self.output_size: tuple[int, int] | None = output_size
        self.noise_seed = int(noise_seed)
        self.call: Callable[..., Any] = call if call is not None else _default_call
        self.differentiable = bool(differentiable)
        self._block_channels: dict[str, int] | None = None
        self._noise: Tensor | None = None  # (K, C, H, W) on CPU, drawn once per input shape
        self.freeze()

    # ------------------------------------------------------------------ frozen backbone
    def freeze(self) -> None:
        """Make the backbone frozen: no gradients, eval mode."""
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> DiffusionFeatureExtractor:
        super().train(mode)
        self.backbone.eval()  # the backbone never leaves eval mode
        return self

    # ------------------------------------------------------------------ channels
    @property
    def block_channels(self) -> dict[str, int]:
        """Channels of each block's activation (measured by a dry run on first use)."""
        if self._block_channels is None:
            self._dry_run()
        assert self._block_channels is not None
        return dict(self._block_channels)

    @property
    def out_channels(self) -> int:
        """Feature channels: ``sum_b C_b * len(timesteps)``."""
        return sum(self.block_channels.values()) * len(self.timesteps)

    def feature_names(self) -> list[str]:
        """One label per output channel group, ``"t{t}/{block}"``, in output order."""
        return [f"t{t}/{b}" for t in self.timesteps for b in self.blocks]

    def measure(self, example: Tensor, **kwargs: Any) -> int:
        """Measure the block channels with a pass on ``example`` (B, C, H, W); returns ``out_channels``."""
        self.forward(
            example[:1], **{k: v[:1] if isinstance(v, Tensor) and v.ndim else v for k, v in kwargs.items()}
        )
        return self.out_channels

    def _dry_run(self) -> None:
        channels = _guess_in_channels(self.backbone)
        if channels is None:
            raise RuntimeError(
                f"cannot size a dry run for {type(self.backbone).__name__} (no convolution found); "
                "call measure(example) once before reading out_channels"
            )
        side = self.output_size or (32, 32)
        param = next(iter(self.backbone.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        try:
            self.measure(torch.zeros(1, channels, *side, device=device))
        except Exception as error:  # the backbone needs kwargs or another size: say what to do
            raise RuntimeError(
                f"the dry run that measures out_channels failed ({error}); call measure(example, **kwargs) "
                "with a real input first"
            ) from error

    # ------------------------------------------------------------------ forward
    def fixed_noise(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        """The fixed noise (K, C, H, W) for one image of ``shape`` (C, H, W), drawn from ``noise_seed``."""
        wanted = (len(self.timesteps), *shape)
        if self._noise is None or tuple(self._noise.shape) != wanted:
            generator = torch.Generator().manual_seed(self.noise_seed)
            self._noise = torch.randn(wanted, generator=generator)
        return self._noise.to(device=device, dtype=dtype)

    def noised(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The timestep-major stack ``x_t`` (K B, C, H, W) and its timesteps ``t`` (K B,)."""
        K, B = len(self.timesteps), x.shape[0]
        t = torch.tensor(self.timesteps, device=x.device, dtype=torch.long).repeat_interleave(B)
        stacked = x.repeat(K, *([1] * (x.ndim - 1)))
        if self.kernel is None:
            return stacked, t
        noise = self.fixed_noise(tuple(x.shape[1:]), x.device, x.dtype)  # (K, C, H, W)
        noise = noise.repeat_interleave(B, dim=0)  # (K B, C, H, W), the same eps for every image
        return self.kernel.q_sample(stacked, t, noise=noise), t

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """Features of ``x``.

        Args:
            x: images (B, C, H, W) in the backbone's input space.
            **kwargs: passed to the backbone; tensors whose first axis has length B are
                repeated once per timestep (e.g. ``class_labels`` (B,), a context (B, L, D)).

        Returns:
            (B, out_channels, H_out, W_out) float features, ordered by timestep then block.
        """
        if x.ndim != 4:
            raise ConfigError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        B, K = x.shape[0], len(self.timesteps)
        size = self.output_size or (int(x.shape[-2]), int(x.shape[-1]))
        modules = dict(self.backbone.named_modules())
        captured: dict[str, Tensor] = {}

        def make_hook(name: str) -> Callable[..., None]:
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                captured[name] = _first_tensor(output)

            return hook

        handles = [modules[name].register_forward_hook(make_hook(name)) for name in self.blocks]
        try:
            with torch.enable_grad() if self.differentiable else torch.inference_mode():
                x_t, t = self.noised(x)
                repeated = {
                    k: v.repeat(K, *([1] * (v.ndim - 1)))
                    if isinstance(v, Tensor) and v.ndim and v.shape[0] == B
                    else v
                    for k, v in kwargs.items()
                }
                self.call(self.backbone, x_t, t, **repeated)
                missing = [b for b in self.blocks if b not in captured]
                if missing:
                    raise RuntimeError(f"blocks {missing} did not run in the backbone's forward pass")
                maps = []
                for name in self.blocks:
                    act = captured[name]
                    if act.ndim != 4 or act.shape[0] != K * B:
                        raise RuntimeError(
                            f"block {name!r} gave an activation of shape {tuple(act.shape)}; "
                            f"expected ({K * B}, C, h, w) for 2-D features"
                        )
                    if tuple(act.shape[-2:]) != size:
                        act = F.interpolate(act.float(), size=size, mode="bilinear", align_corners=False)
                    maps.append(act.float().reshape(K, B, act.shape[1], *size))
                features = torch.cat(maps, dim=2)  # (K, B, sum C_b, H, W): blocks within a timestep
                features = features.permute(1, 0, 2, 3, 4).reshape(B, -1, *size)
                if self._block_channels is None:
                    self._block_channels = {name: int(captured[name].shape[1]) for name in self.blocks}
        finally:
            for handle in handles:
                handle.remove()
        if self.differentiable:
            return features
        return features.clone()  # out of inference mode: usable as an input to a trained probe

    def extra_repr(self) -> str:
        return (
            f"blocks={self.blocks}, timesteps={self.timesteps}, output_size={self.output_size}, "
            f"noise_seed={self.noise_seed}, noised={self.kernel is not None}"
        )
