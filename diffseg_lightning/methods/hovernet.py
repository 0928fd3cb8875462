"""Hover-Net as a method: the downstream nuclei instance segmenter of Yu et al. (MICCAI 2023)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.apps.pathology.losses import HoVerNetLoss
from torch import nn

from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.sampler import DiffusionSampler, describe_samples
from diffseg_lightning.methods.base import SegmentationMethod
from diffseg_lightning.metrics.instances import (
    aggregated_jaccard_index,
    f1_at_iou,
    object_dice,
    panoptic_quality,
)
from diffseg_lightning.utils.hover import hover_maps, instances_from_hover

NP_KEY = "nucleus_prediction"
HV_KEY = "horizontal_vertical"


class HoVerNetModule(SegmentationMethod):
    """Hover-Net (Graham et al., "HoVer-Net: Simultaneous segmentation and classification of nuclei in
    multi-tissue histology images", MedIA 58, 2019), the downstream network of Yu et al., "Diffusion-Based
    Data Augmentation for Nuclei Image Segmentation", MICCAI 2023.

    Network: by default MONAI's :class:`~monai.networks.nets.HoVerNet` (``conf/model/hovernet.yaml``: fast
    mode, padded decoders so the output is the input size, 256 x 256 inputs, NP and HV branches, no type
    branch); any module returning the dict ``{"nucleus_prediction": (B, 2, H, W) logits,
    "horizontal_vertical": (B, 2, H, W)}`` works (e.g. :class:`~diffseg_lightning.nets.hover_unet.HoVerUNet`).

    Training: MONAI's :class:`~monai.apps.pathology.losses.HoVerNetLoss` (NP: Dice + cross-entropy; HV: MSE
    and the MSE of the Sobel gradients inside nuclei, weights 1, 1, 2, 1 as Hover-Net), with the targets
    built on the fly from the batch's ``instances``: the one-hot nucleus map and the HV maps of
    :func:`~diffseg_lightning.utils.hover.hover_maps` (MONAI's ``ComputeHoVerMaps``, batched).

    Inference: ``probability`` = softmax NP channel 1 (B, 1, H, W), ``mask`` = probability > threshold;
    ``instances`` (B, H, W) from the Hover-Net post-processing
    (:func:`~diffseg_lightning.utils.hover.instances_from_hover`, MONAI's defaults). One deterministic pass
    (``num_samples = 1``, as :class:`~diffseg_lightning.methods.segmentation.UNetSegmentationModule`).

    Metrics (:meth:`case_rows`): every metric of the protocol on the semantic mask (Dice, IoU, HD95, ...),
    plus, where the batch carries reference ``instances``, AJI, PQ / DQ / SQ (IoU > 0.5 matching), object
    Dice and F1 at IoU 0.5 of :mod:`diffseg_lightning.metrics.instances` (their empty-map policy: NaN when
    both maps are empty).

    Args:
        net: the network (see above).
        optimizer: a partial optimiser.
        scheduler: a partial LR scheduler, or None.
        loss: ``loss(prediction_dict, target_dict)`` -> scalar; None gives ``HoVerNetLoss()``.
        mask_channels: must be 1 (nuclei vs background).
        spacing: pixel spacing for HD95, or None.
        sampler: only ``threshold`` and ``parallel`` are used (there is no kernel: the ``noise`` group is
            not built).
        post_processing: keyword options of :func:`instances_from_hover` (e.g. ``min_object_size``).
        compile, channels_last: as every method.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        loss: nn.Module | None = None,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        sampler: DiffusionSampler | None = None,
        post_processing: dict[str, float] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        if mask_channels != 1:
            raise ConfigError(
                f"HoVerNetModule segments nuclei vs background: mask_channels must be 1, got {mask_channels}"
            )
        self.net = net
        self.loss = loss if loss is not None else HoVerNetLoss()
        self.use_sampler(sampler)
        self.post_processing = dict(post_processing or {})

    def example_input(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (image,)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, C, H, W) -> the NP logits and HV maps, (B, 2, H, W) each."""
        out = self.net(self.to_memory_format(image))
        if not isinstance(out, dict) or NP_KEY not in out or HV_KEY not in out:
            raise ConfigError(
                f"{type(self.net).__name__} must return a dict with {NP_KEY!r} and {HV_KEY!r} (Hover-Net's NP and "
                "HV branches)"
            )
        return out

    @staticmethod
    def targets(instances: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hover-Net targets of (B, H, W) instance maps: one-hot NP (B, 2, H, W) and HV maps (B, 2, H, W)."""
        nucleus = (instances > 0).long()
        return {
            NP_KEY: F.one_hot(nucleus, 2).permute(0, 3, 1, 2).float(),
            HV_KEY: hover_maps(instances),
        }

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "instances" not in batch:
            raise ConfigError("HoVerNetModule trains on instance maps: the dataset must yield 'instances'")
        prediction = {k: v.float() for k, v in self(batch["image"]).items()}
        loss = self.loss(prediction, self.targets(batch["instances"]))
        self.check_loss(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    @torch.no_grad()
    def sample(self, image: torch.Tensor, case_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One pass: the protocol's layout plus ``instances`` (B, H, W) int64 and ``hv`` (B, 2, H, W)."""
        out = self(image)
        probability = torch.softmax(out[NP_KEY].float(), dim=1)[:, 1:2]
        result = describe_samples(probability.unsqueeze(1), "mean", self.threshold)
        options = {"threshold": self.threshold, **self.post_processing}
        result["instances"] = instances_from_hover(probability[:, 0], out[HV_KEY].float(), **options)
        result["hv"] = out[HV_KEY].float()
        return result

    def case_rows(self, out: dict[str, torch.Tensor], batch: dict) -> list[dict]:
        """The protocol's rows plus AJI, PQ, DQ, SQ, object Dice and F1 per case (reference ``instances``)."""
        rows = super().case_rows(out, batch)
        reference = batch.get("instances")
        if reference is None:
            return rows
        for row, pred, ref in zip(rows, out["instances"].cpu().numpy(), reference.cpu().numpy(), strict=True):
            pq = panoptic_quality(pred, ref)
            row.update(
                aji=aggregated_jaccard_index(pred, ref),
                pq=pq["pq"],
                dq=pq["dq"],
                sq=pq["sq"],
                object_dice=object_dice(pred, ref),
                f1=f1_at_iou(pred, ref)["f1"],
                num_instances=float(np.unique(pred[pred > 0]).size),
            )
        return rows

    def inference_settings(self) -> dict[str, Any]:
        return self.single_pass_settings()


__all__ = ["HoVerNetModule"]
