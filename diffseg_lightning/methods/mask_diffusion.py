"""Conditional mask diffusion: the paradigm of MedSegDiff, MedSegDiff-V2, BerDiff, MB-Diff and DT-UNet.

:class:`~diffseg_lightning.methods.base.SegmentationMethod` holds what every method shares (the evaluation
protocol, ``summary.json`` results, panels, checkpoints); :class:`MaskDiffusionModule` adds the diffusion
training and sampling, and the auxiliary segmentation head of every denoiser (:class:`AuxSeg`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from diffseg_lightning.diffusion.base import NoiseKernel
from diffseg_lightning.diffusion.reverse import diffusion_loss
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.fusion import Fusion
from diffseg_lightning.inference.sampler import DiffusionSampler, describe_samples
from diffseg_lightning.methods.base import SegmentationMethod
from diffseg_lightning.nets.aux_seg import ImageSegHead

AUX_LOSSES = ("mse", "dice_bce")


@dataclass(frozen=True)
class AuxSeg:
    """The auxiliary segmentation head's switch (``model.aux_seg``): a direct segmentation of the image branch.

    MedSegDiff's release (KidsWithTokens/MedSegDiff, ``guided_diffusion``) trains its condition branch with
    ``loss + 10 * loss_cal``, ``loss_cal = mean((sigmoid(head) - mask)^2)`` (``train_util.py``,
    ``gaussian_diffusion.py``; a BCE variant is commented out), and at inference blends it into each
    ensemble member before the members are fused: ``clamp(cal + 0.25 * sample, 0, 1)``. MedSegDiff-V2's
    anchor loss (Dice + CE on the condition model's segmentation, every alpha-th step) is the same idea.

    Training: ``loss = kernel loss + weight * L(head logits, mask)`` on the steps where
    ``global_step % every == 0``; ``L`` is ``loss``: ``mse`` (the release's, on the sigmoid) or ``dice_bce``
    (MONAI sigmoid Dice + binary cross-entropy, MedSegDiff-V2's with beta = 1).

    Inference: every sample's probability becomes ``(1 - blend) * p_sample + blend * p_head`` (p_head =
    sigmoid of the head, the same for the S samples) *before* fusion, so ``samples``, ``probability``,
    ``mask`` and the uncertainty maps of :func:`~diffseg_lightning.inference.sampler.describe_samples` all
    describe the blended samples (with ``fusion=mean`` it equals blending the fused map). A convex weight
    keeps a probability and makes ``blend = 0`` the diffusion alone and ``1`` the head alone. The release's
    ``clamp(cal + 0.25 s, 0, 1) > 0.5`` is ``0.8 cal + 0.2 s > 0.4``: blend 0.8 with the sampler's threshold
    at 0.4 (at the default threshold 0.5 blend 0.8 is slightly stricter than the release).

    Off (``weight = blend = 0``, the default): nothing is built or run, the model is exactly the one
    without the switch. On, the denoiser's ``aux_logits(cond, size)`` gives the logits (its
    ``enable_aux_head()``, when it has one, builds the head); a denoiser without ``aux_logits`` gets an
    :class:`~diffseg_lightning.nets.aux_seg.ImageSegHead` of its own (``channels`` wide), held by the module
    as ``aux_head``.

    Args:
        weight: the head loss's weight (0: no loss).
        blend: the head's share of each sample's probability at inference, in [0, 1] (0: none).
        loss: ``mse`` or ``dice_bce``.
        every: the loss applies on every ``every``-th optimiser step (MedSegDiff-V2's alpha).
        channels: widths of the fallback :class:`ImageSegHead`.
    """

    weight: float = 0.0
    blend: float = 0.0
    loss: str = "mse"
    every: int = 1
    channels: Sequence[int] = field(default=(16, 32, 64))

    def __post_init__(self) -> None:
        if not float(self.weight) >= 0.0:
            raise ConfigError(f"model.aux_seg.weight must be >= 0, got {self.weight}")
        if not 0.0 <= float(self.blend) <= 1.0:
            raise ConfigError(f"model.aux_seg.blend must lie in [0, 1], got {self.blend}")
        if self.loss not in AUX_LOSSES:
            raise ConfigError(f"model.aux_seg.loss must be one of {list(AUX_LOSSES)}, got {self.loss!r}")
        if isinstance(self.every, bool) or int(self.every) < 1:
            raise ConfigError(f"model.aux_seg.every must be a positive integer, got {self.every!r}")

    @property
    def enabled(self) -> bool:
        """Whether the head exists (a loss or a blend)."""
        return self.weight > 0 or self.blend > 0

    @classmethod
    def parse(cls, value: AuxSeg | Mapping[str, Any] | None) -> AuxSeg:
        """An :class:`AuxSeg` from itself, a config mapping, or None (off)."""
        if value is None:
            return cls()
        if isinstance(value, AuxSeg):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"model.aux_seg must be a mapping (weight, blend, ...), got {type(value).__name__}"
            )
        unknown = set(value) - {"weight", "blend", "loss", "every", "channels"}
        if unknown:
            raise ConfigError(f"model.aux_seg has unknown keys {sorted(unknown)}")
        kwargs = dict(value)
        if "channels" in kwargs:
            kwargs["channels"] = tuple(int(c) for c in kwargs["channels"])
        return cls(**kwargs)


def aux_seg_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The head's segmentation loss (:class:`AuxSeg`), in float32.

    Args:
        logits: (B, C, H, W) head logits.
        target: (B, C, H, W) mask in {0, 1}.
        kind: ``mse`` (``mean((sigmoid(logits) - target)^2)``, MedSegDiff's release) or ``dice_bce``
            (MONAI ``DiceLoss(sigmoid=True)`` + ``binary_cross_entropy_with_logits``).

    Returns:
        A 0-dim tensor.
    """
    logits, target = logits.float(), target.float()
    if kind == "mse":
        return (torch.sigmoid(logits) - target).pow(2).mean()
    if kind == "dice_bce":
        return DiceLoss(sigmoid=True)(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
    raise ConfigError(f"aux_seg loss must be one of {list(AUX_LOSSES)}, got {kind!r}")


def blend_samples(samples: torch.Tensor, head_probability: torch.Tensor, blend: float) -> torch.Tensor:
    """``(1 - blend) * samples + blend * head_probability``, the head broadcast over the S samples.

    Args:
        samples: (B, S, C, H, W) sample probabilities.
        head_probability: (B, C, H, W) the head's probability.
        blend: the head's share, in [0, 1].

    Returns:
        (B, S, C, H, W) probabilities.
    """
    return (1.0 - blend) * samples + blend * head_probability.to(samples.dtype).unsqueeze(1)


class MaskDiffusionModule(SegmentationMethod):
    """Train a denoiser on masks with a noise kernel; sample, fuse and score S masks per image.

    Training: x_0 is the (kernel-encoded) mask, t ~ U[0, T), x_t ~ q(x_t | x_0), and the loss is the
    kernel's (``kernel.loss``; :func:`~diffseg_lightning.diffusion.reverse.diffusion_loss`). With several
    annotators per image (``batch["masks"]`` with A > 1 and a one-channel mask), each training step draws
    one annotator per image, as the LIDC literature does. With ``aux_seg`` on, the auxiliary segmentation
    head's loss is added and its probability blended into every sample before fusion (:class:`AuxSeg`).

    Validation and test: the sampler draws S samples per image in one batched pass per step, fuses
    them, and every metric of the evaluation protocol that applies is computed per case
    (:func:`~diffseg_lightning.metrics.report.case_metrics`: Dice, IoU, HD95, calibration, and the
    multi-annotator metrics when ``batch["masks"]`` holds several annotators). The per-case rows are
    gathered across processes, deduplicated by case index (the distributed sampler pads), and kept in
    ``self.results[stage]`` in the ``summary.json`` layout. EMA weights are used for sampling through
    Lightning's ``EMAWeightAveraging`` callback (see ``conf/callbacks``).

    Args:
        denoiser: ``forward(x_t, t, cond)`` with ``cond = denoiser.encode_condition(image)``.
        kernel: a noise kernel (the contract: :class:`~diffseg_lightning.diffusion.base.NoiseKernel` and
            ``docs/architecture.md``).
        sampler: the inference recipe.
        optimizer: a partial optimiser, called with the parameters.
        scheduler: a partial LR scheduler, called with ``(optimizer, total_steps=...)``, or None.
        mask_channels: C, channels of the mask.
        spacing: pixel spacing for HD95, or None for pixels.
        compile: ``torch.compile`` the denoiser (see :class:`SegmentationMethod`).
        channels_last: channels-last weights and images (see :class:`SegmentationMethod`).
        aux_seg: the auxiliary segmentation head (:class:`AuxSeg`: ``weight``, ``blend``, ``loss``, ``every``,
            ``channels``), or None for off.
    """

    network_attr = "denoiser"

    def __init__(
        self,
        denoiser: nn.Module,
        kernel: NoiseKernel,
        sampler: DiffusionSampler,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        compile: bool = False,
        channels_last: bool = False,
        aux_seg: AuxSeg | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        if not isinstance(kernel, NoiseKernel):
            raise ConfigError(
                f"MaskDiffusionModule needs a noise kernel (noise=gaussian or noise=bernoulli), got "
                f"{type(kernel).__name__}"
            )
        if not isinstance(sampler, DiffusionSampler):
            raise ConfigError(
                "MaskDiffusionModule needs a DiffusionSampler (the sampler group), got "
                f"{type(sampler).__name__}"
            )
        self.denoiser = denoiser
        self.kernel = kernel
        self.sampler = sampler
        self.aux_seg = AuxSeg.parse(aux_seg)
        if self.aux_seg.blend > 0 and Fusion.parse(sampler.fusion) is Fusion.EVOLUTION:
            raise ConfigError(
                "model.aux_seg.blend > 0 needs sampler.fusion=mean|vote|staple (the evolution fusion votes on "
                "its own decoded evolutions)"
            )
        if self.aux_seg.enabled and not hasattr(denoiser, "aux_logits"):
            self.aux_head = ImageSegHead(denoiser.image_channels, mask_channels, self.aux_seg.channels)
        elif self.aux_seg.enabled and hasattr(denoiser, "enable_aux_head"):
            denoiser.enable_aux_head()

    def aux_logits(self, image: torch.Tensor, cond: Any) -> torch.Tensor:
        """The auxiliary head's logits (B, C, H, W) for the image batch and its ``encode_condition``."""
        if hasattr(self, "aux_head"):
            return self.aux_head(image)
        return self.denoiser.aux_logits(cond, image.shape[-2:])

    # ----------------------------------------------------------------------------------- training
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """One network pass (image branch included): what each sampling step costs, per image."""
        image = self.to_memory_format(image)
        return self.denoiser(self.to_memory_format(x_t), t, self.denoiser.encode_condition(image))

    def example_input(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_t = torch.zeros(1, self.mask_channels, *image.shape[-2:])
        return x_t, torch.zeros(1, dtype=torch.long), image

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        target = self.training_target(batch).float()
        x0 = self.kernel.encode_mask(target)
        image = self.to_memory_format(batch["image"])
        bound: dict[str, Any] = {}

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # the condition is encoded after t and x_t are drawn, so the random draws keep their order
            bound["cond"] = self.denoiser.encode_condition(image)
            return self.denoiser(self.to_memory_format(x_t), t, bound["cond"])

        losses = diffusion_loss(self.kernel, x0, denoise).terms
        aux = self.aux_seg
        if aux.weight > 0 and self.global_step % aux.every == 0:
            term = aux_seg_loss(self.aux_logits(image, bound["cond"]), target, aux.loss)
            losses = {**losses, "aux_seg": term, "loss": losses["loss"] + aux.weight * term}
        self.check_loss(losses["loss"], batch_idx)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=x0.shape[0])
        return losses["loss"]

    # ------------------------------------------------------------------------ sampling and metrics
    def sample(self, image: torch.Tensor, case_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """S samples per image, fused, with uncertainty maps (see :class:`DiffusionSampler`).

        With ``aux_seg.blend > 0`` each sample is blended with the head's probability before fusion
        (:class:`AuxSeg`, :func:`blend_samples`); the head runs once per image (its own
        ``encode_condition``, one image-branch pass beside the sampler's).
        """
        image = self.to_memory_format(image)
        out = self.sampler.sample(self.denoiser, self.kernel, image, self.mask_channels, case_ids)
        if self.aux_seg.blend == 0:
            return out
        with torch.no_grad():
            head = torch.sigmoid(self.aux_logits(image, self.denoiser.encode_condition(image)).float())
        samples = blend_samples(out["samples"], head, self.aux_seg.blend)
        return describe_samples(samples, self.sampler.fusion, self.sampler.threshold)

    def inference_settings(self) -> dict[str, Any]:
        """The sampler's settings (:meth:`DiffusionSampler.settings`), the kernel's reverse ``update``, and
        ``aux_seg_blend`` when the head is blended in."""
        settings = self.sampler.settings(self.kernel)
        return {**settings, "aux_seg_blend": self.aux_seg.blend} if self.aux_seg.blend > 0 else settings
