"""Conditional mask diffusion: the paradigm of MedSegDiff, MedSegDiff-V2, BerDiff, MB-Diff and DT-UNet.

:class:`~diffseg_lightning.methods.base.SegmentationMethod` holds what every method shares (the evaluation
protocol, ``summary.json`` results, panels, checkpoints); :class:`MaskDiffusionModule` adds the diffusion
training and sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from diffseg_lightning.diffusion.base import NoiseKernel
from diffseg_lightning.diffusion.reverse import diffusion_loss
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.sampler import DiffusionSampler
from diffseg_lightning.methods.base import SegmentationMethod


class MaskDiffusionModule(SegmentationMethod):
    """Train a denoiser on masks with a noise kernel; sample, fuse and score S masks per image.

    Training: x_0 is the (kernel-encoded) mask, t ~ U[0, T), x_t ~ q(x_t | x_0), and the loss is the
    kernel's (``kernel.loss``; :func:`~diffseg_lightning.diffusion.reverse.diffusion_loss`). With several
    annotators per image (``batch["masks"]`` with A > 1 and a one-channel mask), each training step draws
    one annotator per image, as the LIDC literature does.

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
        cond = bound["cond"]
        auxiliary = getattr(self.denoiser, "auxiliary_loss", None)  # a denoiser's own terms (MedSegDiff-V2)
        if auxiliary is not None:
            extra = auxiliary(cond, target, self.global_step)
            losses = {**losses, **extra, "loss": losses["loss"] + sum(extra.values())}
        self.check_loss(losses["loss"], batch_idx)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=x0.shape[0])
        return losses["loss"]

    # ------------------------------------------------------------------------ sampling and metrics
    def sample(self, image: torch.Tensor, case_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """S samples per image, fused, with uncertainty maps (see :class:`DiffusionSampler`)."""
        image = self.to_memory_format(image)
        return self.sampler.sample(self.denoiser, self.kernel, image, self.mask_channels, case_ids)

    def inference_settings(self) -> dict[str, Any]:
        """The sampler's settings (:meth:`DiffusionSampler.settings`) and the kernel's reverse ``update``."""
        return self.sampler.settings(self.kernel)
