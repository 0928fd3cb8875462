"""ODISE: open-vocabulary panoptic segmentation with a frozen text-to-image diffusion backbone.

Xu, Liu, Vahdat, Byeon, Wang & De Mello, "Open-Vocabulary Panoptic Segmentation with Text-to-Image
Diffusion Models", CVPR 2023. The networks are in :mod:`diffseg_lightning.nets.odise`; this module holds the
training (Hungarian matching, mask and class losses), the test-time fusion of the diffusion and CLIP class
scores, the panoptic merge, and the panoptic evaluation (PQ per class, seen / unseen, and mIoU, from the counts
of :mod:`diffseg_lightning.metrics.instances`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.sampler import DiffusionSampler, describe_samples
from diffseg_lightning.losses import smoothed_dice_loss
from diffseg_lightning.methods.base import SegmentationMethod
from diffseg_lightning.metrics.instances import (
    hungarian_match,
    mean_iou,
    panoptic_counts,
    panoptic_quality_from_counts,
    semantic_counts,
)
from diffseg_lightning.nets.odise import ODISENet


# ------------------------------------------------------------------------------------ score fusion
def fuse_class_probabilities(
    p_diff: Tensor, p_clip: Tensor, seen: Tensor, lambda_seen: float = 0.35, lambda_unseen: float = 0.65
) -> Tensor:
    """ODISE's test-time geometric mean: ``p_diff^(1 - lambda_k) * p_clip^lambda_k`` per category k.

    Xu et al. (CVPR 2023), Sec. 3.4: ``lambda_k = lambda_seen`` (0.35) for categories seen in training and
    ``lambda_unseen`` (0.65) for the others, so unseen names lean more on CLIP. Unnormalised, as written.

    Args:
        p_diff: (..., K) class probabilities of the diffusion-feature head.
        p_clip: (..., K) class probabilities of the mask-pooled CLIP features.
        seen: (K,) bool, True for a category seen in training.
    """
    if p_diff.shape != p_clip.shape or p_diff.shape[-1] != seen.shape[-1]:
        raise ConfigError(
            f"p_diff {tuple(p_diff.shape)}, p_clip {tuple(p_clip.shape)} and seen {tuple(seen.shape)} must agree on K"
        )
    lam = torch.where(seen.bool(), torch.as_tensor(lambda_seen), torch.as_tensor(lambda_unseen)).to(p_diff)
    return p_diff ** (1 - lam) * p_clip**lam


def open_vocabulary_probabilities(
    class_logits: Tensor,
    clip_logits: Tensor,
    seen: Tensor,
    lambda_seen: float = 0.35,
    lambda_unseen: float = 0.65,
) -> Tensor:
    """Final (B, N, K + 1) class probabilities of ODISE's inference, the last column "no object".

    As in the authors' code: ``p_null = softmax(class_logits)[..., K]``; the K category probabilities of each
    head are softmaxes over the K categories only (``class_logits[..., :K]`` and ``clip_logits``); their
    :func:`fuse_class_probabilities` is renormalised over K and scaled by ``1 - p_null``.
    """
    p_null = class_logits.softmax(-1)[..., -1:]
    fused = fuse_class_probabilities(
        class_logits[..., :-1].softmax(-1), clip_logits.softmax(-1), seen, lambda_seen, lambda_unseen
    )
    fused = fused / fused.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.cat([fused * (1 - p_null), p_null], dim=-1)


# ------------------------------------------------------------------------------------- matching
def matching_cost(
    class_prob: Tensor,
    mask_logits: Tensor,
    target_classes: Tensor,
    target_masks: Tensor,
    weight_class: float = 2.0,
    weight_mask: float = 5.0,
    weight_dice: float = 5.0,
) -> Tensor:
    """Mask2Former's matching cost (N, M) between N predictions and M targets of one image.

    ``C = w_class * (-p_i(c_j)) + w_mask * BCE(m_i, t_j) + w_dice * (1 - (2 <s_i, t_j> + 1) / (|s_i| + |t_j| + 1))``
    with ``s_i = sigmoid(m_i)``, BCE the mean over pixels (Cheng et al., CVPR 2022; computed on every pixel
    here, where the authors sample 12544 points).

    Args:
        class_prob: (N, K + 1) class probabilities; mask_logits: (N, P); target_classes: (M,) int;
        target_masks: (M, P) in {0, 1}.
    """
    target_masks = target_masks.float()
    cost_class = -class_prob[:, target_classes]
    pos = F.binary_cross_entropy_with_logits(mask_logits, torch.ones_like(mask_logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(mask_logits, torch.zeros_like(mask_logits), reduction="none")
    cost_mask = (pos @ target_masks.t() + neg @ (1 - target_masks).t()) / mask_logits.shape[-1]
    s = mask_logits.sigmoid()
    cost_dice = 1 - (2 * s @ target_masks.t() + 1) / (s.sum(-1)[:, None] + target_masks.sum(-1)[None] + 1)
    return weight_class * cost_class + weight_mask * cost_mask + weight_dice * cost_dice


# ----------------------------------------------------------------------------------- panoptic merge
def panoptic_merge(
    class_prob: Tensor, mask_prob: Tensor, object_threshold: float = 0.8, overlap_threshold: float = 0.8
) -> tuple[Tensor, Tensor]:
    """Mask2Former's panoptic inference for one image: queries -> a segment map and a class map.

    Keep query i when its best class is not "no object" and its score ``s_i = max_k p_i(k)`` exceeds
    ``object_threshold``; each pixel goes to the kept query with the largest ``s_i * m_i(p)``; a kept query
    becomes a segment of the pixels it won that also have ``m_i(p) >= 0.5``, unless that is empty or less
    than ``overlap_threshold`` of its own ``m_i >= 0.5`` area (then its pixels stay void). Every category is
    a "thing" here (no stuff merging). Segment ids are 1, 2, ... in query order.

    Args:
        class_prob: (N, K + 1) probabilities, the last "no object".
        mask_prob: (N, H, W) mask probabilities.

    Returns:
        ``segments`` (H, W) int64, 0 void, and ``classes`` (H, W) int64, 0 void and ``k + 1`` for category k.
    """
    num_classes = class_prob.shape[-1] - 1
    scores, labels = class_prob.max(-1)
    keep = (labels != num_classes) & (scores > object_threshold)
    if not keep.any():
        void = torch.zeros(mask_prob.shape[-2:], dtype=torch.long, device=mask_prob.device)
        return void, void.clone()
    prob, cls, score = mask_prob[keep], labels[keep], scores[keep]
    winner = (score[:, None, None] * prob).argmax(0)  # (H, W): the kept query with the largest s_i m_i(p)
    won = F.one_hot(winner, prob.shape[0]).permute(2, 0, 1).bool()  # (Q, H, W)
    own = prob >= 0.5
    final = won & own  # disjoint across queries (each pixel has one winner)
    area, own_area, final_area = won.flatten(1).sum(1), own.flatten(1).sum(1), final.flatten(1).sum(1)
    valid = (area > 0) & (own_area > 0) & (final_area > 0) & (area >= overlap_threshold * own_area)
    ids = torch.cumsum(valid.long(), 0) * valid  # 1, 2, ... for the valid queries, 0 for the others
    segments = (final * ids[:, None, None]).sum(0)
    classes = (final * ((cls + 1) * valid)[:, None, None]).sum(0)
    return segments, classes


# ------------------------------------------------------------------------------------------ module
class ODISEModule(SegmentationMethod):
    """ODISE (Xu et al., CVPR 2023): open-vocabulary panoptic segmentation from frozen diffusion features.

    Training (category-label supervision, the paper's "label" variant; no caption grounding loss): the net
    (:class:`~diffseg_lightning.nets.odise.ODISENet`) predicts N masks and class logits against the text
    embeddings of the *seen* category names (+ "no object"); each image's predictions are matched to its
    objects by the Hungarian algorithm (:func:`hungarian_match` on :func:`matching_cost`, Mask2Former's
    weights 2 / 5 / 5), and the loss is ``2 * CE + 5 * BCE + 5 * Dice`` (Mask2Former): cross-entropy over
    K + 1 classes for every query (matched queries take their object's class, the others "no object" with
    weight 0.1), BCE and Dice of the matched masks (on every pixel, at the image's size: predicted masks
    are upsampled bilinearly), normalised by the number of objects in the batch; the same loss on the
    output of every decoder layer (deep supervision). Only the captioner, the mask generator, the null
    embedding and the logit scale learn; the U-Net, VAE and CLIP are frozen.

    Inference (validation, test, ``diffseg-eval``, ``diffseg-predict``) with the full vocabulary
    (``categories``): class probabilities from :func:`open_vocabulary_probabilities` (the geometric mean of
    the diffusion and mask-pooled CLIP scores with lambda 0.35 for seen, 0.65 for ``unseen`` names; with
    ``clip_fusion=false`` the diffusion head alone), masks upsampled to the image, then
    :func:`panoptic_merge`. The shared protocol's binary ``mask`` is the foreground of the semantic view,
    ``probability = clamp(sum_k sum_i p_i(k) m_i, 0, 1)`` (Mask2Former's semantic inference summed over
    categories) thresholded at the sampler's threshold; one deterministic pass (S = 1, so ``std`` and
    ``mutual_information`` are 0).

    Metrics (``case_rows`` and ``summary.json``): the shared Dice / IoU / HD95 on the foreground, and per case
    ``pq``, ``pq_seen``, ``pq_unseen`` (mean PQ over the categories that occur in that image), ``miou`` and
    ``pq_class_agnostic`` (every object one category: the masks and object scores alone);
    after each validation / test epoch ``results[stage]["panoptic"]`` holds the dataset-level figures (the
    standard definition: counts summed over all images, then averaged over categories): PQ / SQ / RQ for
    all, seen and unseen categories, per category, class-agnostic, and mIoU. Batches need ``instances`` (H, W) and
    ``semantic`` (H, W) (0 background, ``k + 1`` for ``categories[k]``), as
    :class:`~diffseg_lightning.data.synthetic_shapes.SyntheticShapes` gives.

    Choices (the paper leaves them open or our scale forces them): training objects whose category is
    unseen are dropped from the targets (they never occur in the synthetic training split); the CLIP score
    pools CLIP's dense features with the predicted soft masks (see ``ODISENet.clip_logits``); Mask2Former's
    thresholds 0.8 / 0.8 for the merge.

    Args:
        net: the :class:`~diffseg_lightning.nets.odise.ODISENet`, or a partial of it called with
            ``kernel=`` (the noise group's kernel: ODISE noises the latent to t = 0 with it).
        optimizer: a partial optimiser, called with the trainable parameters.
        categories: the vocabulary (class ``k`` of the data's ``semantic`` map is ``categories[k]``).
        unseen: names of ``categories`` held out from training (trained on the others).
        lambda_seen, lambda_unseen: the fusion exponents (paper: 0.35, 0.65).
        clip_fusion: fuse the CLIP scores at test time (ODISE) or use the diffusion head alone.
        weight_class, weight_mask, weight_dice: loss and matching weights (Mask2Former: 2, 5, 5).
        no_object_weight: CE weight of the "no object" class (Mask2Former: 0.1).
        object_threshold, overlap_threshold: of :func:`panoptic_merge`.
        deep_supervision: the loss on every decoder layer's output, not only the last.
        scheduler, mask_channels, spacing, compile, channels_last: see :class:`SegmentationMethod`.
        kernel: the Gaussian kernel, passed to ``net`` when it is a partial.
        sampler: only ``threshold`` and ``parallel`` apply (one deterministic pass).
    """

    network_attr = "net"

    def __init__(
        self,
        net: ODISENet | Callable[..., ODISENet],
        optimizer: Callable[..., torch.optim.Optimizer],
        categories: Sequence[str],
        unseen: Sequence[str] = (),
        lambda_seen: float = 0.35,
        lambda_unseen: float = 0.65,
        clip_fusion: bool = True,
        weight_class: float = 2.0,
        weight_mask: float = 5.0,
        weight_dice: float = 5.0,
        no_object_weight: float = 0.1,
        object_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        deep_supervision: bool = True,
        scheduler: Callable[..., Any] | None = None,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        kernel: GaussianKernel | None = None,
        sampler: DiffusionSampler | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        if mask_channels != 1:
            raise ConfigError(
                f"ODISE scores one foreground channel (data.mask_channels=1), got {mask_channels}"
            )
        self.categories = [str(c) for c in categories]
        self.unseen = [str(c) for c in unseen]
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ConfigError(f"categories must be distinct names, got {self.categories}")
        missing = [c for c in self.unseen if c not in self.categories]
        if missing or len(self.unseen) >= len(self.categories):
            raise ConfigError(f"unseen {self.unseen} must be a proper subset of categories {self.categories}")
        for name, value in (("lambda_seen", lambda_seen), ("lambda_unseen", lambda_unseen)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {value}")
        self.net = net if isinstance(net, ODISENet) else net(kernel=kernel)
        self.seen_names = [c for c in self.categories if c not in self.unseen]
        # full-vocabulary class id (k + 1 in the data) -> index among the seen names, -1 for unseen
        train_index = [self.seen_names.index(c) if c in self.seen_names else -1 for c in self.categories]
        self.register_buffer("train_index", torch.tensor([-1, *train_index]), persistent=False)
        self.register_buffer(
            "seen", torch.tensor([c not in self.unseen for c in self.categories]), persistent=False
        )
        self.lambda_seen, self.lambda_unseen, self.clip_fusion = (
            float(lambda_seen),
            float(lambda_unseen),
            bool(clip_fusion),
        )
        self.weights = (float(weight_class), float(weight_mask), float(weight_dice))
        self.no_object_weight = float(no_object_weight)
        self.object_threshold, self.overlap_threshold = float(object_threshold), float(overlap_threshold)
        self.deep_supervision = bool(deep_supervision)
        self.use_sampler(sampler)
        self._counts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    # ------------------------------------------------------------------------------- parameters
    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(trainable)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer, total_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def example_input(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (image,)

    def forward(self, image: torch.Tensor) -> Tensor:
        """One pass with the full vocabulary: the final mask logits (B, N, h, w) (for the cost measurement)."""
        return self.net(image, self.categories)["predictions"][-1]["mask_logits"]

    # ----------------------------------------------------------------------------------- training
    @staticmethod
    def check_panoptic_batch(batch: dict) -> None:
        """A clear error when the data has no panoptic annotation (``instances`` and ``semantic``)."""
        missing = [key for key in ("instances", "semantic") if key not in batch]
        if missing:
            raise ConfigError(
                f"ODISE needs panoptic annotations: the batches lack {missing} (segment ids and class ids per "
                "pixel); use data=synthetic_shapes or a dataset whose items carry them"
            )

    def targets(self, batch: dict) -> list[tuple[Tensor, Tensor]]:
        """Per image: classes (M,) among the seen names and masks (M, H, W) of its objects (unseen dropped)."""
        self.check_panoptic_batch(batch)
        out = []
        for segments, semantic in zip(batch["instances"], batch["semantic"], strict=True):
            ids = torch.unique(segments)
            ids = ids[ids > 0]
            masks = segments[None] == ids[:, None, None]  # (M, H, W)
            full = (semantic[None] * masks).flatten(1).amax(1)  # the category id (k + 1) of each segment
            classes = self.train_index[full]
            keep = classes >= 0
            out.append((classes[keep], masks[keep].float()))
        return out

    def loss_terms(
        self, predictions: list[dict[str, Tensor]], targets: list[tuple[Tensor, Tensor]]
    ) -> dict[str, Tensor]:
        """Mask2Former's matched loss summed over the decoder layers (see the class docstring)."""
        w_class, w_mask, w_dice = self.weights
        num_masks = max(1, sum(int(c.numel()) for c, _ in targets))
        size = targets[0][1].shape[-2:] if targets else None
        levels = predictions if self.deep_supervision else predictions[-1:]
        totals = {"ce": 0.0, "bce": 0.0, "dice": 0.0}
        for out in levels:
            logits = out["class_logits"]  # (B, N, K + 1)
            k = logits.shape[-1] - 1
            masks = F.interpolate(
                out["mask_logits"], size=size, mode="bilinear", align_corners=False
            ).flatten(2)
            target_classes = torch.full(logits.shape[:2], k, dtype=torch.long, device=logits.device)
            bce = dice = logits.new_zeros(())
            for b, (classes, target_masks) in enumerate(targets):
                if classes.numel() == 0:
                    continue
                flat = target_masks.flatten(1)
                with torch.no_grad():
                    cost = matching_cost(
                        logits[b].softmax(-1), masks[b], classes, flat, w_class, w_mask, w_dice
                    )
                rows, cols = hungarian_match(cost)  # on the cost's device (the logits')
                target_classes[b, rows] = classes[cols]
                bce = (
                    bce
                    + F.binary_cross_entropy_with_logits(masks[b, rows], flat[cols], reduction="none")
                    .mean(-1)
                    .sum()
                )
                dice = dice + smoothed_dice_loss(masks[b, rows], flat[cols]).sum()
            weight = torch.ones(k + 1, device=logits.device)
            weight[-1] = self.no_object_weight
            totals["ce"] = totals["ce"] + F.cross_entropy(
                logits.transpose(1, 2), target_classes, weight=weight
            )
            totals["bce"] = totals["bce"] + bce / num_masks
            totals["dice"] = totals["dice"] + dice / num_masks
        loss = w_class * totals["ce"] + w_mask * totals["bce"] + w_dice * totals["dice"]
        return {"loss": loss, **totals}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.net(self.to_memory_format(batch["image"]), self.seen_names)
        losses = self.loss_terms(out["predictions"], self.targets(batch))
        self.check_loss(losses["loss"], batch_idx)
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=batch["image"].shape[0]
        )
        return losses["loss"]

    # ---------------------------------------------------------------------------------- inference
    def class_probabilities(self, out: dict[str, Any]) -> Tensor:
        """(B, N, K + 1) final class probabilities over the full vocabulary (fused with CLIP or not)."""
        final = out["predictions"][-1]
        if not self.clip_fusion:
            return final["class_logits"].softmax(-1)
        clip_logits = self.net.clip_logits(final["mask_logits"], out["clip_dense"], out["text_embed"])
        return open_vocabulary_probabilities(
            final["class_logits"], clip_logits, self.seen, self.lambda_seen, self.lambda_unseen
        )

    @torch.no_grad()
    def sample(self, image: Tensor, case_ids: Tensor | None = None) -> dict[str, Tensor]:
        """Panoptic prediction of (B, C, H, W) images in the shared layout (``case_ids`` is unused).

        Returns:
            :func:`describe_samples` of the foreground probability (S = 1), plus ``panoptic`` (B, H, W)
            int64 segment ids (0 void), ``panoptic_classes`` (B, H, W) int64 (0 void, ``k + 1`` for
            ``categories[k]``) and ``semantic`` (B, K, H, W), Mask2Former's per-category semantic scores.
        """
        out = self.net(image, self.categories)
        probs = self.class_probabilities(out)
        mask_prob = F.interpolate(
            out["predictions"][-1]["mask_logits"], size=image.shape[-2:], mode="bilinear", align_corners=False
        ).sigmoid()
        semantic = torch.einsum("bnk,bnhw->bkhw", probs[..., :-1], mask_prob)
        merged = [
            panoptic_merge(p, m, self.object_threshold, self.overlap_threshold)
            for p, m in zip(probs, mask_prob, strict=True)
        ]
        foreground = semantic.sum(1, keepdim=True).clamp(0, 1).float()
        result = describe_samples(foreground.unsqueeze(1), "mean", self.threshold)
        result["panoptic"] = torch.stack([s for s, _ in merged])
        result["panoptic_classes"] = torch.stack([c for _, c in merged])
        result["semantic"] = semantic
        return result

    def inference_settings(self) -> dict[str, Any]:
        """One deterministic pass (S = 1), in the keys of the diffusion sampler, plus the fusion settings."""
        return self.single_pass_settings(
            clip_fusion=self.clip_fusion,
            lambda_seen=self.lambda_seen,
            lambda_unseen=self.lambda_unseen,
            categories=self.categories,
            unseen=self.unseen,
        )

    # ------------------------------------------------------------------------------------ metrics
    def case_rows(self, out: dict[str, Tensor], batch: dict) -> list[dict]:
        rows = super().case_rows(out, batch)
        self.check_panoptic_batch(batch)
        k = len(self.categories)
        seen = self.seen.cpu().numpy()
        pred_s, pred_c = out["panoptic"].cpu().numpy(), out["panoptic_classes"].cpu().numpy()
        gt_s, gt_c = batch["instances"].cpu().numpy(), batch["semantic"].cpu().numpy()
        for i, row in enumerate(rows):
            counts = panoptic_counts(pred_s[i], pred_c[i], gt_s[i], gt_c[i], k)
            semantic = semantic_counts(pred_c[i], gt_c[i], k)
            row["pq"] = panoptic_quality_from_counts(counts)["pq"]
            row["pq_seen"] = panoptic_quality_from_counts(counts, seen)["pq"]
            row["pq_unseen"] = panoptic_quality_from_counts(counts, ~seen)["pq"]
            row["miou"] = mean_iou(semantic)
            # class-agnostic: every object one category, so only the masks and the object scores count
            agnostic = panoptic_counts(
                pred_s[i], (pred_c[i] > 0).astype(np.int64), gt_s[i], (gt_c[i] > 0).astype(np.int64), 1
            )
            row["pq_class_agnostic"] = panoptic_quality_from_counts(agnostic)["pq"]
            self._counts.append((int(row["index"]), counts, semantic, agnostic))
        return rows

    def dataset_panoptic(self, counts: np.ndarray, semantic: np.ndarray) -> dict[str, Any]:
        """Dataset-level PQ / SQ / RQ (all, seen, unseen, per category) and mIoU from summed counts."""
        seen = self.seen.cpu().numpy()
        return {
            "all": panoptic_quality_from_counts(counts),
            "seen": panoptic_quality_from_counts(counts, seen),
            "unseen": panoptic_quality_from_counts(counts, ~seen),
            "per_category": {
                name: {
                    **panoptic_quality_from_counts(counts, np.arange(len(seen)) == i),
                    "seen": bool(seen[i]),
                }
                for i, name in enumerate(self.categories)
            },
            "miou": mean_iou(semantic),
            "miou_seen": mean_iou(semantic, seen),
            "miou_unseen": mean_iou(semantic, ~seen),
        }

    def _finish(self, stage: str) -> None:
        parts = self._counts
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, parts)
            parts = [item for part in gathered for item in part]
        unique = {index: rest for index, *rest in parts}  # the distributed sampler pads with repeats
        self._counts = []
        super()._finish(stage)
        if not unique:
            return
        counts, semantic, agnostic = (sum(item[j] for item in unique.values()) for j in range(3))
        panoptic = self.dataset_panoptic(counts, semantic)
        panoptic["class_agnostic"] = panoptic_quality_from_counts(agnostic)
        self.results[stage]["panoptic"] = panoptic
        for name in ("all", "seen", "unseen"):
            if not np.isnan(panoptic[name]["pq"]):
                self.log(f"{stage}/PQ_{name}", panoptic[name]["pq"], sync_dist=False, rank_zero_only=False)


__all__ = [
    "ODISEModule",
    "fuse_class_probabilities",
    "matching_cost",
    "open_vocabulary_probabilities",
    "panoptic_merge",
]
