"""Instance segmentation of glands by diffusion over boxes (Sun, Huang & Zheng, MICCAI 2023), and the U-Net +
connected-components baseline, both scored with the GlaS challenge's object-level metrics.

:class:`GlandDiffusionModule` trains :class:`~diffseg_lightning.nets.gland_diffusion.GlandDiffusionNet` with
DiffusionDet's box diffusion on our :class:`~diffseg_lightning.diffusion.GaussianKernel`;
:class:`UNetInstanceModule` is MONAI's U-Net (:class:`~diffseg_lightning.methods.UNetSegmentationModule`) whose
foreground is split into instances by connected components. Both add object F1 (the GlaS detection rule),
object Dice and object Hausdorff to every ``summary.json`` row through :meth:`case_rows`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.diffusion.reverse import StepRecord, reverse
from diffseg_lightning.diffusion.solvers.base import Solver
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.sampler import DiffusionSampler, case_generators, describe_samples
from diffseg_lightning.losses import sigmoid_focal_loss, squared_dice_loss
from diffseg_lightning.methods.base import SegmentationMethod
from diffseg_lightning.methods.segmentation import UNetSegmentationModule
from diffseg_lightning.metrics.instances import glas_f1, hungarian_match, object_dice, object_hausdorff
from diffseg_lightning.utils.boxes import (
    batched_nms,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    random_boxes,
)

__all__ = [
    "GlandDiffusionModule",
    "InstanceScoring",
    "UNetInstanceModule",
    "glas_f1",
    "hungarian_match",
    "instance_boxes",
    "matching_cost",
]


# ------------------------------------------------------------------------------------------------ metrics
class InstanceScoring:
    """Adds the GlaS object-level columns to :meth:`SegmentationMethod.case_rows`: ``object_f1`` (:func:`glas_f1`,
    with ``object_precision`` / ``object_recall``), ``object_dice`` and ``object_hausdorff`` (pixels; GlaS
    definitions in :mod:`diffseg_lightning.metrics.instances`), from ``out["instances"]`` (B, H, W) against
    ``batch["instances"]``. Batches without reference instances get the standard rows only."""

    def case_rows(self, out: dict[str, Tensor], batch: dict) -> list[dict]:
        rows = super().case_rows(out, batch)  # type: ignore[misc]
        if "instances" not in batch or "instances" not in out:
            return rows
        preds = out["instances"].cpu().numpy()
        refs = batch["instances"].cpu().numpy()
        for row, pred, ref in zip(rows, preds, refs, strict=True):
            f1 = glas_f1(pred, ref)
            row["object_f1"] = f1["f1"]
            row["object_precision"] = f1["precision"]
            row["object_recall"] = f1["recall"]
            row["object_dice"] = object_dice(pred, ref)
            row["object_hausdorff"] = object_hausdorff(pred, ref)
            row["num_objects_pred"] = float(np.unique(pred[pred > 0]).size)
        return rows


# --------------------------------------------------------------------------------------- training helpers
def instance_boxes(instances: Tensor) -> tuple[Tensor, Tensor]:
    """The objects of an (H, W) label map: boxes (M, 4) xyxy pixel edges (x2 = last column + 1) and masks
    (M, H, W) bool, in increasing label order (labels need not be consecutive)."""
    labels = torch.unique(instances)
    labels = labels[labels > 0]
    masks = instances[None] == labels[:, None, None]
    if labels.numel() == 0:
        return torch.zeros(0, 4, device=instances.device), masks
    h, w = instances.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (M, H), (M, W)
    ar_h = torch.arange(h, device=instances.device)
    ar_w = torch.arange(w, device=instances.device)
    y1 = torch.where(rows, ar_h, h).min(dim=1).values
    y2 = torch.where(rows, ar_h, -1).max(dim=1).values + 1
    x1 = torch.where(cols, ar_w, w).min(dim=1).values
    x2 = torch.where(cols, ar_w, -1).max(dim=1).values + 1
    return torch.stack([x1, y1, x2, y2], dim=1).float(), masks


def matching_cost(
    logits: Tensor,
    boxes: Tensor,
    gt_boxes: Tensor,
    image_size: tuple[int, int],
    class_weight: float = 2.0,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """The (N, M) matching cost of N predictions against M reference objects (DETR / DiffusionDet).

    ``C = class_weight * C_cls + l1_weight * |b - g|_1 + giou_weight * (-GIoU(b, g))`` where ``C_cls`` is the
    focal-loss cost of calling the prediction a gland, ``alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma
    (-log(1 - p))`` with ``p = sigmoid(logit)`` (Deformable DETR's), and the L1 is on xyxy boxes divided by the
    image's (W, H, W, H). The weights are DiffusionDet's (2, 5, 2), alpha 0.25 and gamma 2.

    Args:
        logits: (N,) gland logits.
        boxes: (N, 4) xyxy pixels; gt_boxes: (M, 4) xyxy pixels.
        image_size: (H, W).
    """
    h, w = image_size
    norm = boxes.new_tensor([w, h, w, h])
    p = logits.sigmoid()
    pos = alpha * (1 - p) ** gamma * (-(p + 1e-8).log())
    neg = (1 - alpha) * p**gamma * (-(1 - p + 1e-8).log())
    cost_class = (pos - neg)[:, None]
    cost_l1 = torch.cdist(boxes / norm, gt_boxes / norm, p=1)
    cost_giou = -generalized_box_iou(boxes, gt_boxes)
    return class_weight * cost_class + l1_weight * cost_l1 + giou_weight * cost_giou


# ----------------------------------------------------------------------------------------------- the method
class GlandDiffusionModule(InstanceScoring, SegmentationMethod):
    """Instance-aware diffusion model for gland segmentation (Sun, Huang & Zheng, MICCAI 2023).

    Detection is a denoising diffusion over box coordinates, as in DiffusionDet (Chen, Sun, Song & Luo, ICCV
    2023); each box's decoder feature emits instance-aware filters that segment it on the mask branch's
    ``F_mask`` (CondInst; see :class:`~diffseg_lightning.nets.gland_diffusion.GlandDiffusionNet`).

    Training (per image): the reference instances' boxes, as (cx, cy, w, h) fractions of the image, are
    padded to ``num_proposals`` with random boxes (``N(0.5, 1/6)``, w, h >= 1e-4; DiffusionDet's; an image
    without glands gets the box (0.5, 0.5, 1, 1), more instances than proposals a random subset), mapped to
    the signal ``x0 = (2 b - 1) * signal_scale``, noised by the kernel at ``t ~ U[0, T)``
    (``kernel.q_sample``), clamped to ``[-scale, scale]``, mapped back to pixel boxes and denoised by the
    decoder conditioned on the image features and ``t``. Each decoder stage's predictions are matched to the
    reference objects by the Hungarian algorithm (:func:`hungarian_match` on :func:`matching_cost`); the losses
    are DiffusionDet's: focal class loss over all proposals (weight 2), L1 on normalised xyxy boxes (5) and
    GIoU (2) on matched ones, each summed and divided by the number of reference objects in the batch, on
    every stage (deep supervision); plus CondInst's Dice loss of the matched instances' masks (weight 1) on the
    last stage (:func:`~diffseg_lightning.losses.sigmoid_focal_loss`,
    :func:`~diffseg_lightning.losses.squared_dice_loss`).

    Inference (``sample``): ``x_T ~ N(0, I)`` of shape (B, N, 4) from per-case generators (seed, case id);
    at each of the kernel's strided timesteps ``T-1 = t_K > ... > t_0``, the decoder predicts boxes (the
    x0 objective), the sampler's solver (``sampler.solver``, e.g. DDIM with its ``eta``) moves the signal to
    ``t_prev`` (:func:`~diffseg_lightning.diffusion.reverse.reverse`), and with ``box_renewal`` the proposals
    scoring at most ``score_threshold`` are replaced with fresh noise (DiffusionDet's box renewal). The final step's boxes and scores go through the score threshold, a batched
    NMS (IoU ``nms_threshold``), the ``max_detections`` best, then their masks (sigmoid of the dynamic head's
    logits) > ``sampler.threshold``; the instance map gives each pixel to the highest-scoring instance covering
    it. The foreground probability is the per-pixel maximum of the kept instances' mask probabilities;
    ``sample`` returns it in the standard layout (S = 1) plus ``instances`` (B, H, W), ``boxes`` (B, K, 4) and
    ``scores`` (B, K) (0 for empty slots).

    Choices where the paper is silent (DiffusionDet's published defaults unless said): signal scale 2.0;
    500 proposals (its COCO setting; the GlaS config keeps it); cosine schedule, T = 1000; the network
    predicts x0 (boxes); DDIM with eta = 1 and box renewal at score 0.5; focal alpha 0.25, gamma 2; matching
    by the Hungarian algorithm (the paper's; DiffusionDet uses a dynamic-k assignment); score threshold 0.5 and
    NMS at IoU 0.5 (ours: one class, touching glands); at most 100 detections; mask Dice weight 1 (CondInst);
    boxes from the final step only (no ensembling over steps). With a stochastic solver (DDIM with ``eta > 0``,
    DDPM), the step noise comes from the batch's first case's generator, so those samples depend on the batch
    composition.

    The kernel must be a :class:`~diffseg_lightning.diffusion.GaussianKernel` with ``objective="x0"`` (the
    decoder predicts boxes) and the solver must not clip x0 (the signal lives in ``[-scale, scale]``; this
    class clamps it): set ``noise.objective=x0 sampler=ddim sampler.solver.clip_x0=false`` (the experiments
    do).

    Args:
        net: :class:`~diffseg_lightning.nets.gland_diffusion.GlandDiffusionNet`.
        kernel: the Gaussian kernel (see above).
        sampler: ``num_steps``, ``threshold`` (mask), ``seed`` and ``solver`` (see above); ``num_samples`` and
            ``fusion`` do not apply (one detection set per image).
        optimizer, scheduler: partial optimiser / LR scheduler.
        mask_channels: must be 1 (foreground of the instances).
        spacing: pixel spacing for HD95, or None.
        num_proposals: N boxes.
        signal_scale: box signal scale.
        score_threshold: detection score threshold (inference and box renewal).
        nms_threshold: IoU above which NMS suppresses.
        max_detections: most instances per image.
        box_renewal: replace low-scoring boxes with noise between steps.
        class_weight, l1_weight, giou_weight, mask_weight: loss (and matching) weights.
        focal_alpha, focal_gamma: focal loss.
        deep_supervision: box and class losses on every decoder stage (else the last only).
        compile, channels_last: see :class:`SegmentationMethod`.
    """

    network_attr = "net"

    def __init__(
        self,
        net: nn.Module,
        kernel: GaussianKernel,
        sampler: DiffusionSampler,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        num_proposals: int = 500,
        signal_scale: float = 2.0,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        box_renewal: bool = True,
        class_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        mask_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        deep_supervision: bool = True,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        if mask_channels != 1:
            raise ConfigError(
                f"GlandDiffusionModule segments one foreground class; got mask_channels={mask_channels}"
            )
        if not isinstance(kernel, GaussianKernel) or kernel.objective != "x0":
            got = (
                f"objective={kernel.objective!r}"
                if isinstance(kernel, GaussianKernel)
                else type(kernel).__name__
            )
            raise ConfigError(
                "GlandDiffusionModule needs the Gaussian kernel with objective='x0' (the decoder predicts boxes): "
                f"set noise=gaussian noise.objective=x0 (got {got})"
            )
        solver = sampler.resolve_solver(kernel)
        if solver.options().get("clip_x0", False):
            raise ConfigError(
                "GlandDiffusionModule needs a solver that does not clip x0 to [-1, 1] (the box signal lives in "
                "[-signal_scale, signal_scale]): set sampler=ddim sampler.solver.clip_x0=false "
                f"(got {solver!r})"
            )
        for name, value in (("num_proposals", num_proposals), ("max_detections", max_detections)):
            if int(value) < 1:
                raise ConfigError(f"GlandDiffusionModule: {name} must be >= 1, got {value}")
        if signal_scale <= 0:
            raise ConfigError(f"GlandDiffusionModule: signal_scale must be > 0, got {signal_scale}")
        for name, value in (("score_threshold", score_threshold), ("nms_threshold", nms_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"GlandDiffusionModule: {name} must be in [0, 1], got {value}")
        self.net = net
        self.kernel = kernel
        self.sampler = sampler
        self.num_proposals = int(num_proposals)
        self.signal_scale = float(signal_scale)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_detections = int(max_detections)
        self.box_renewal = bool(box_renewal)
        self.weights = {"class": class_weight, "l1": l1_weight, "giou": giou_weight, "mask": mask_weight}
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)
        self.deep_supervision = bool(deep_supervision)

    # ------------------------------------------------------------------------------ box <-> signal
    def boxes_to_signal(self, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
        """(..., 4) xyxy pixels -> the diffusion signal ``(2 cxcywh / size - 1) * scale``, clamped."""
        h, w = image_size
        return self.boxes_to_signal_frac(box_xyxy_to_cxcywh(boxes) / boxes.new_tensor([w, h, w, h]))

    def signal_to_boxes(self, x: Tensor, image_size: tuple[int, int]) -> Tensor:
        """The signal (..., 4), clamped to ``[-scale, scale]`` -> xyxy pixel boxes."""
        h, w = image_size
        frac = (x.clamp(-self.signal_scale, self.signal_scale) / self.signal_scale + 1) / 2
        return box_cxcywh_to_xyxy(frac) * x.new_tensor([w, h, w, h])

    def padded_targets(self, gt_boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
        """One image's (M, 4) xyxy pixel boxes -> (N, 4) cxcywh fractions padded with random boxes."""
        h, w = image_size
        n = self.num_proposals
        frac = box_xyxy_to_cxcywh(gt_boxes) / gt_boxes.new_tensor([w, h, w, h])
        if frac.shape[0] == 0:
            frac = gt_boxes.new_tensor([[0.5, 0.5, 1.0, 1.0]])
        if frac.shape[0] > n:
            frac = frac[torch.randperm(frac.shape[0], device=frac.device)[:n]]
        pad = random_boxes((n - frac.shape[0],), device=frac.device)
        return torch.cat([frac, pad], dim=0)

    # ----------------------------------------------------------------------------------- network
    def forward(self, boxes: Tensor, t: Tensor, image: Tensor) -> dict[str, Tensor]:
        """One network pass, image branch included: boxes (B, N, 4) xyxy pixels, t (B,), image."""
        return self.net(boxes, t, self.to_memory_format(image))

    def example_input(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, w = image.shape[-2:]
        boxes = image.new_tensor([0.25 * w, 0.25 * h, 0.75 * w, 0.75 * h]).expand(1, self.num_proposals, 4)
        return boxes.contiguous(), torch.zeros(1, dtype=torch.long), image

    # ----------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if "instances" not in batch:
            raise ConfigError(
                "GlandDiffusionModule trains on instance maps: every item needs `instances` (H, W) int64 "
                "(0 background, 1..N objects), as data=glas, data=monuseg and data=synthetic give"
            )
        image = self.to_memory_format(batch["image"])
        size = tuple(image.shape[-2:])
        targets = [instance_boxes(inst) for inst in batch["instances"]]
        x0 = torch.stack([self.boxes_to_signal_frac(self.padded_targets(b, size)) for b, _ in targets])
        t = self.kernel.sample_timesteps(x0.shape[0], device=x0.device)
        x_t = self.kernel.q_sample(x0, t)
        cond = self.net.encode(image)
        out = self.net.decode(self.signal_to_boxes(x_t, size), t, cond)
        losses = self.detection_losses(out, cond, targets, size)
        self.check_loss(losses["loss"], batch_idx)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=x0.shape[0])
        return losses["loss"]

    def boxes_to_signal_frac(self, frac: Tensor) -> Tensor:
        """(..., 4) cxcywh fractions -> the signal ``(2 b - 1) * scale`` (DiffusionDet's ``prepare_diffusion``)."""
        return ((frac * 2 - 1) * self.signal_scale).clamp(-self.signal_scale, self.signal_scale)

    def detection_losses(
        self, out: dict[str, Tensor], cond: dict, targets: list[tuple[Tensor, Tensor]], size: tuple[int, int]
    ) -> dict[str, Tensor]:
        """Hungarian-matched focal, L1 and GIoU losses per stage, and the Dice mask loss on the last stage."""
        h, w = size
        norm = out["boxes"].new_tensor([w, h, w, h])
        num_gt = max(1, sum(int(b.shape[0]) for b, _ in targets))
        stages = range(out["logits"].shape[0]) if self.deep_supervision else [out["logits"].shape[0] - 1]
        zero = out["logits"].sum() * 0
        totals = {"class": zero, "l1": zero, "giou": zero}
        matches: list[tuple[Tensor, Tensor]] = []
        for s in stages:
            logits, boxes = out["logits"][s], out["boxes"][s]
            cls_target = torch.zeros_like(logits)
            matches = []
            for b, (gt_boxes, _) in enumerate(targets):
                if gt_boxes.shape[0] == 0:
                    matches.append(
                        (gt_boxes.new_zeros(0, dtype=torch.long), gt_boxes.new_zeros(0, dtype=torch.long))
                    )
                    continue
                with torch.no_grad():
                    cost = matching_cost(
                        logits[b], boxes[b], gt_boxes, size, self.weights["class"], self.weights["l1"],
                        self.weights["giou"], self.focal_alpha, self.focal_gamma,
                    )  # fmt: skip
                pi, gi = hungarian_match(cost)
                matches.append((pi, gi))
                cls_target[b, pi] = 1.0
                pred, ref = boxes[b, pi], gt_boxes[gi]
                totals["l1"] = totals["l1"] + (pred / norm - ref / norm).abs().sum()
                totals["giou"] = totals["giou"] + (1 - torch.diagonal(generalized_box_iou(pred, ref))).sum()
            focal = sigmoid_focal_loss(logits, cls_target, self.focal_alpha, self.focal_gamma).sum()
            totals["class"] = totals["class"] + focal
        terms = {k: v / num_gt for k, v in totals.items()}
        terms["mask"] = self.mask_loss(out, cond, targets, matches)
        terms["loss"] = sum(self.weights[k] * terms[k] for k in ("class", "l1", "giou", "mask"))
        return terms

    def mask_loss(
        self, out: dict[str, Tensor], cond: dict, targets: list[tuple[Tensor, Tensor]], matches: list
    ) -> Tensor:
        """Mean Dice loss of the matched instances' masks (last stage), all images in one dynamic-head pass."""
        counts = [int(pi.numel()) for pi, _ in matches]
        k = max(counts, default=0)
        if k == 0:
            return out["filters"].sum() * 0
        b = len(matches)
        index = torch.zeros(b, k, dtype=torch.long, device=out["filters"].device)
        valid = torch.zeros(b, k, dtype=torch.bool, device=index.device)
        gt_masks = torch.zeros(b, k, *cond["image"].shape[-2:], device=index.device)
        for i, ((pi, gi), (_, masks)) in enumerate(zip(matches, targets, strict=True)):
            index[i, : pi.numel()] = pi
            valid[i, : pi.numel()] = True
            gt_masks[i, : pi.numel()] = masks[gi].float()
        boxes = torch.gather(out["boxes"][-1], 1, index[..., None].expand(-1, -1, 4)).detach()
        filters = torch.gather(out["filters"], 1, index[..., None].expand(-1, -1, out["filters"].shape[-1]))
        prob = self.net.masks(cond, boxes, filters).float().sigmoid()
        return squared_dice_loss(prob[valid], gt_masks[valid]).mean()

    # ----------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def detect(self, image: Tensor, case_ids: Tensor | None = None) -> dict[str, Any]:
        """Denoise N random boxes per image; return the final step's ``boxes`` (B, N, 4) xyxy pixels,
        ``logits`` (B, N), ``filters`` (B, N, P) and the condition ``cond``."""
        image = self.to_memory_format(image)
        b = image.shape[0]
        size = tuple(image.shape[-2:])
        if case_ids is None:
            case_ids = torch.arange(b)
        generators = case_generators(int(self.sampler.seed), case_ids, image.device)
        shape = (self.num_proposals, 4)

        def noise() -> Tensor:
            return torch.stack([torch.randn(shape, generator=g, device=image.device) for g in generators])

        cond = self.net.encode(image)
        steps = self.kernel.inference_timesteps(int(self.sampler.num_steps), device=image.device)
        last: dict[str, dict[str, Tensor]] = {}  # the decoder's outputs at the latest step

        def denoise(x_t: Tensor, t: Tensor) -> Tensor:
            last["out"] = self.net.decode(self.signal_to_boxes(x_t, size), t, cond)
            return self.boxes_to_signal(last["out"]["boxes"][-1].float(), size)

        def renew(step: StepRecord) -> Tensor | None:
            """DiffusionDet's box renewal between steps (none after the last: its boxes are the result)."""
            if not self.box_renewal or step.index + 1 == steps.numel():
                return None
            keep = last["out"]["logits"][-1].sigmoid() > self.score_threshold
            return torch.where(keep[..., None], step.x_prev, noise())

        reverse(self.kernel, self.solver, denoise, noise(), steps, generator=generators[0], on_step=renew)
        out = last["out"]
        return {
            "boxes": out["boxes"][-1].float(),
            "logits": out["logits"][-1].float(),
            "filters": out["filters"],
            "cond": cond,
        }

    @torch.no_grad()
    def sample(self, image: Tensor, case_ids: Tensor | None = None) -> dict[str, Tensor]:
        """Instances for (B, C_img, H, W) images: the standard layout (S = 1) of the foreground probability,
        plus ``instances`` (B, H, W) int64, ``boxes`` (B, K, 4) and ``scores`` (B, K)."""
        det = self.detect(image, case_ids)
        b, n = det["logits"].shape
        scores = det["logits"].sigmoid()
        flat_scores = scores.reshape(-1)
        candidates = torch.nonzero(flat_scores > self.score_threshold).squeeze(1)
        kept = batched_nms(
            det["boxes"].reshape(-1, 4)[candidates],
            flat_scores[candidates],
            torch.div(candidates, n, rounding_mode="floor"),
            self.nms_threshold,
        )
        keep = torch.zeros(b * n, dtype=torch.bool, device=scores.device)
        keep[candidates[kept]] = True
        ranked = torch.where(keep.reshape(b, n), scores, torch.full_like(scores, -1.0))
        k = min(self.max_detections, n)
        top_scores, top = ranked.topk(k, dim=1)  # sorted by score, best first
        valid = top_scores >= 0
        boxes = torch.gather(det["boxes"], 1, top[..., None].expand(-1, -1, 4))
        filters = torch.gather(det["filters"], 1, top[..., None].expand(-1, -1, det["filters"].shape[-1]))
        prob = self.net.masks(det["cond"], boxes, filters).float().sigmoid() * valid[..., None, None]
        covered = prob > self.sampler.threshold
        first = covered.to(torch.uint8).argmax(dim=1)  # the best-scoring instance covering each pixel
        instances = torch.where(covered.any(dim=1), first + 1, torch.zeros_like(first)).long()
        probability = prob.amax(dim=1, keepdim=True) if k else torch.zeros_like(image[:, :1])
        result = describe_samples(probability[:, None], "mean", self.sampler.threshold)
        result["instances"] = instances
        result["boxes"] = boxes * valid[..., None]
        result["scores"] = top_scores.clamp(min=0)
        return result

    @property
    def solver(self) -> Solver:
        """The reverse update of the box chain: ``sampler.solver``, else the kernel's default."""
        return self.sampler.resolve_solver(self.kernel)

    def inference_settings(self) -> dict[str, Any]:
        settings = self.sampler.settings(self.kernel)
        return {
            **dict.fromkeys(settings),
            "update": settings["update"],
            "deterministic": settings["deterministic"],
            "solver": settings["solver"],
            "num_steps": int(self.sampler.num_steps),
            "num_samples": 1,
            "fusion": "none",
            "threshold": self.sampler.threshold,
            "seed": self.sampler.seed,
            "parallel": self.sampler.parallel,
            "num_proposals": self.num_proposals,
            "signal_scale": self.signal_scale,
            "score_threshold": self.score_threshold,
            "nms_threshold": self.nms_threshold,
            "max_detections": self.max_detections,
            "box_renewal": self.box_renewal,
        }


# ------------------------------------------------------------------------------------------- the baseline
class UNetInstanceModule(InstanceScoring, UNetSegmentationModule):
    """The U-Net + connected components baseline for gland instances.

    :class:`~diffseg_lightning.methods.UNetSegmentationModule` (MONAI's U-Net, Dice + BCE; same training,
    arguments and ``summary.json``), whose thresholded foreground is split into instances by connected
    components (``scipy.ndimage.label``, ``connectivity`` 1 = 4-neighbourhood, 2 = 8-neighbourhood), then
    scored like :class:`GlandDiffusionModule` (:class:`InstanceScoring`). ``sample`` adds ``instances``
    (B, H, W) int64.

    Args:
        connectivity: 1 or 2 (see above); other arguments are :class:`UNetSegmentationModule`'s.
    """

    def __init__(self, *args: Any, connectivity: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if connectivity not in (1, 2):
            raise ConfigError(f"UNetInstanceModule: connectivity must be 1 or 2, got {connectivity}")
        self.structure = ndimage.generate_binary_structure(2, connectivity)

    @torch.no_grad()
    def sample(self, image: Tensor, case_ids: Tensor | None = None) -> dict[str, Tensor]:
        out = super().sample(image, case_ids)
        masks = out["mask"][:, 0].bool().cpu().numpy()
        labels = np.stack([ndimage.label(m, structure=self.structure)[0] for m in masks])
        out["instances"] = torch.from_numpy(labels.astype(np.int64)).to(image.device)
        return out
