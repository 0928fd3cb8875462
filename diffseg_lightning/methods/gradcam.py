"""Grad-CAM on an image-level classifier: the weakly supervised baseline of CDM (Hu et al., MICCAI 2023)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.visualize import GradCAM
from torch import nn

from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.sampler import DiffusionSampler
from diffseg_lightning.methods.base import SegmentationMethod
from diffseg_lightning.methods.weak_cdm import min_max_normalize, saliency_outputs


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class GradCAMModule(SegmentationMethod):
    """Weakly supervised baseline: a classifier trained on image-level labels, masks from its Grad-CAM
    (Selvaraju et al., "Grad-CAM", ICCV 2017), the CAM baseline of Hu et al. (MICCAI 2023, Table 1).

    Training: cross-entropy of ``net(image)`` (B, K) logits against ``batch["label"]`` (B,). Like
    :class:`~diffseg_lightning.methods.weak_cdm.WeakCDMModule` it reads only ``image`` and ``label``, and the
    experiments withhold the masks from the training batches.

    Inference: MONAI's :class:`monai.visualize.GradCAM` for the lesion class on ``target_layer``
    (``relu(sum_c mean(dy/dA_c) A_c)``, upsampled bilinearly to the image size), min-max normalised per
    image and thresholded exactly as CDM's saliency (per-image Otsu, optional largest connected component,
    :func:`~diffseg_lightning.methods.weak_cdm.saliency_outputs`), so both are scored alike.

    Two MONAI traps avoided here: its default CAM post-processing maps (min, max) to (1, 0), i.e. inverts the
    map, so the raw map is taken and normalised here; and its hooks cannot be removed, so each call wraps a
    throw-away copy of the classifier (the trained network never carries hooks into training or
    checkpoints). Grad-CAM needs gradients, so :meth:`sample` leaves inference mode for the backward pass.

    What it takes from the Hydra groups: no kernel (the ``noise`` group is not built); of ``sampler`` only
    ``parallel`` applies (``summary.json`` reports ``num_steps = 1``, ``num_samples = 1``,
    ``threshold = "otsu"``).

    Args:
        net: a classifier (B, C, H, W) -> (B, K) logits, e.g. MONAI's ``ResNet`` (``conf/model/gradcam.yaml``).
        optimizer: a partial optimiser, called with the parameters.
        target_layer: the name of the layer whose activations and gradients make the CAM (``layer4``).
        lesion_class: the class whose score is explained.
        largest_component: keep the largest connected component of each mask.
        scheduler, mask_channels, spacing, compile, channels_last: as in :class:`SegmentationMethod`.
        sampler: only ``parallel`` is used.

    Shapes:
        ``forward(image)``: (B, C, H, W) -> (B, K); ``cam(image)``: (B, C, H, W) -> (B, 1, H, W), >= 0.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        target_layer: str = "layer4",
        lesion_class: int = 1,
        largest_component: bool = False,
        scheduler: Callable[..., Any] | None = None,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        sampler: DiffusionSampler | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        if mask_channels != 1:
            raise ConfigError(
                f"GradCAMModule gives one map per image: mask_channels must be 1, got {mask_channels}"
            )
        names = {name for name, _ in net.named_modules()}
        if target_layer not in names:
            raise ConfigError(
                f"target_layer {target_layer!r} is not a layer of {type(net).__name__}; top-level layers: "
                f"{sorted(n for n in names if n and '.' not in n)}"
            )
        self.net = net
        self.target_layer = target_layer
        self.lesion_class = int(lesion_class)
        self.largest_component = bool(largest_component)
        self.use_sampler(sampler)  # parallel and the keys; the mask is Otsu's, self.threshold is unused
        self.loss = nn.CrossEntropyLoss()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(self.to_memory_format(image))

    def example_input(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (image,)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "label" not in batch:
            raise ConfigError(
                "GradCAMModule trains on image-level labels: the batch has no 'label' (set data.labels=from_masks)"
            )
        label = batch["label"].reshape(-1).long()
        logits = self(batch["image"].float()).float()
        loss = self.loss(logits, label)
        accuracy = (logits.argmax(1) == label).float().mean()
        self.check_loss(loss, batch_idx)
        self.log_dict(
            {"train/loss": loss, "train/accuracy": accuracy}, prog_bar=True, batch_size=label.shape[0]
        )
        return loss

    def cam(self, image: torch.Tensor) -> torch.Tensor:
        """Raw Grad-CAM of the lesion class (B, 1, H, W) from a hooked copy of the classifier."""
        with torch.inference_mode(False), torch.enable_grad():
            net = copy.deepcopy(self.net)
            for p in net.parameters():
                p.requires_grad_(True)
            cam = GradCAM(nn_module=net, target_layers=self.target_layer, postprocessing=_identity)
            x = image.detach().clone().float().requires_grad_(True)
            return cam(x, class_idx=self.lesion_class).detach()

    def sample(self, image: torch.Tensor, case_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Grad-CAM, min-max normalised per image, with its Otsu mask (``case_ids`` is unused)."""
        return saliency_outputs(min_max_normalize(self.cam(image)), self.largest_component)

    def inference_settings(self) -> dict[str, Any]:
        return self.single_pass_settings(
            threshold="otsu", target_layer=self.target_layer, largest_component=self.largest_component
        )


__all__ = ["GradCAMModule"]
