"""FEDD: frozen DDPM features read by per-pixel MLP probes (segmentation) and a linear probe (classification)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import OmegaConf
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.features import DiffusionFeatureExtractor, FeatureCache, dataset_identity
from diffseg_lightning.inference.sampler import DiffusionSampler, describe_samples
from diffseg_lightning.methods.base import SegmentationMethod
from diffseg_lightning.metrics.fairness import subgroup_report
from diffseg_lightning.nets.pixel_mlp import PixelMLPEnsemble
from diffseg_lightning.utils.checkpoints import load_checkpoint, sub_state_dict
from diffseg_lightning.utils.errors import ConfigError, DiffSegError
from diffseg_lightning.utils.moved_settings import split_moved_settings

__all__ = ["FEDDModule", "classification_scores", "load_backbone"]


def load_backbone(path: str | Path) -> tuple[nn.Module, GaussianKernel, dict[str, Any]]:
    """The frozen network and kernel of a ``diffseg-train model=image_ddpm`` checkpoint.

    Read with the project's checkpoint reader (:func:`~diffseg_lightning.utils.checkpoints.load_checkpoint`,
    its messages start with ``model.backbone_ckpt``). The network is rebuilt from the config stored in the
    checkpoint (``model.net``) and loaded with the checkpoint's ``net.*`` weights (the EMA weights when the
    run used the EMA callback); the kernel from its ``noise`` config (its forward process: the reverse-update
    options of older checkpoints are dropped,
    :func:`~diffseg_lightning.utils.moved_settings.split_moved_settings`).

    Returns:
        ``(net, kernel, config)``: the network, the kernel and the checkpoint's resolved run config.

    Raises:
        DiffSegError: the file is missing or unreadable, or holds no network config / weights.
        ConfigError: the checkpoint's kernel is not Gaussian.
    """
    key = "model.backbone_ckpt"
    checkpoint = load_checkpoint(path, key=key)
    config = checkpoint["diffseg_config"]
    if "net" not in (config.get("model") or {}):
        raise DiffSegError(
            f"{key}: checkpoint {path} has no model.net in its stored config; give a checkpoint written by "
            "diffseg-train model=image_ddpm"
        )
    cfg = OmegaConf.create(config)
    net = instantiate(cfg.model.net)
    net.load_state_dict(sub_state_dict(checkpoint, "net.", key))
    kernel = instantiate(split_moved_settings(OmegaConf.to_container(cfg.noise, resolve=True)).noise)
    if not isinstance(kernel, GaussianKernel):
        raise ConfigError(
            f"{key}: checkpoint {path} was trained with {type(kernel).__name__}; FEDD reads the features "
            "of a Gaussian image DDPM (noise=gaussian)"
        )
    return net, kernel, config


def classification_scores(
    probability: torch.Tensor, label: torch.Tensor, threshold: float = 0.5
) -> dict[str, float]:
    """Accuracy (at ``threshold``) and AUROC (torchmetrics) of binary probabilities (N,) against labels (N,).

    AUROC is NaN when only one class is present (it is undefined there)."""
    probability, label = probability.float().reshape(-1), label.long().reshape(-1)
    if probability.numel() == 0:
        return {"accuracy": float("nan"), "auroc": float("nan"), "num_cases": 0, "positives": 0}
    accuracy = ((probability > threshold).long() == label).float().mean().item()
    both = bool((label == 1).any() and (label == 0).any())
    auroc = binary_auroc(probability, label).item() if both else float("nan")
    return {
        "accuracy": accuracy,
        "auroc": auroc,
        "num_cases": int(label.numel()),
        "positives": int(label.sum()),
    }


class FEDDModule(SegmentationMethod):
    """FEDD (Carrion & Norouzi, "FEDD - Fair, Efficient, and Diverse Diffusion-based Lesion Segmentation
    and Malignancy Classification", MICCAI 2023).

    A DDPM pretrained on the images without labels (``diffseg-train model=image_ddpm``, then
    ``model.backbone_ckpt=<run>/checkpoints/best.ckpt``) is frozen; its decoder activations at a few
    timesteps (:class:`~diffseg_lightning.features.DiffusionFeatureExtractor`) are the per-pixel
    representation. On top of it, trained on the labelled fraction of the training set (5, 10, 15 or 20%
    in the paper; ``data.label_fraction`` of the ``*_fraction`` / ``synthetic_groups`` data configs):

    - segmentation: an ensemble of ``S`` per-pixel MLPs (:class:`~diffseg_lightning.nets.PixelMLPEnsemble`,
      Baranchuk et al., ICLR 2022), trained with binary cross-entropy per pixel; at inference the S
      member probabilities are the S "samples" of the shared protocol (fused by ``sampler.fusion``, mean
      by default; std / entropy / mutual information are the ensemble's disagreement);
    - classification: a linear probe on the spatially averaged features predicts the image-level label
      (``label_key``; malignancy in the paper, lesion presence on synthetic data), trained with BCE;
      reported as accuracy and AUROC in ``summary.json`` (``classification``);
    - fairness: with ``group_key`` in the batch, ``summary.json`` gets ``subgroups``: every metric per
      group, the worst-group value and the largest gap (:func:`~diffseg_lightning.metrics.fairness.subgroup_report`).

    Choices (the paper's text gives the design, not every setting; its released code was not available
    to us):
        * Blocks and timesteps: the paper reads one chosen decoder layer, upsampled for segmentation and
          pooled for classification; we follow Baranchuk et al.'s recipe, which FEDD builds on: several
          decoder blocks at ``t in {50, 150, 250}`` (of T = 1000), configurable (``blocks``,
          ``timesteps``), validated against the network. The defaults read the outputs of every
          up-block of MONAI's ``DiffusionModelUNet`` (``up_blocks.0`` ... ``up_blocks.{L-1}``).
        * Features are upsampled bilinearly to the image size (Baranchuk et al.) and the noise is fixed
          (``noise_seed``), so the same image always gives the same features and they can be cached
          (``feature_cache``: a folder; keyed by weights, blocks, timesteps, noise seed and dataset).
        * Ensemble: S = 10 members, MLP widths 128, 32 with ReLU then BatchNorm (Baranchuk et al.); all
          members run as one grouped network. Members differ by their initialisation and by a per-member
          random pixel subset per step (``pixel_fraction`` of the pixels, a bootstrap of the pixels
          in place of Baranchuk's separate shuffles).
        * Linear probe: global average pooling of the same features, a BatchNorm without affine
          parameters (a fixed standardisation, so the probe stays linear in the features), one linear
          layer; binary labels (``num_labels = 1``).
        * The backbone and its kernel come from the checkpoint (its stored config); the ``noise`` group
          of the FEDD run is used only without a checkpoint. With ``backbone_ckpt = null`` the backbone
          is MONAI's U-Net from ``backbone`` with RANDOM weights and a loud warning: only so that
          ``fast_dev_run`` and tests run without a pretraining run; its numbers mean nothing.
        * Rebuilding a trained FEDD module from its checkpoint (``diffseg-eval``, ``diffseg-predict``)
          rebuilds the backbone from ``backbone_ckpt`` again (the file must still exist), then loads
          FEDD's own state dict, which holds the backbone weights too.
        * The images must be normalised as they were for pretraining (same ``data.normalize``).

    Args:
        optimizer: a partial optimiser for the probes (Baranchuk et al.: Adam, lr 1e-3).
        backbone: the network used when ``backbone_ckpt`` is None (random weights).
        backbone_ckpt: path of an ``image_ddpm`` checkpoint, or None.
        blocks: backbone modules whose outputs are read.
        timesteps: diffusion timesteps of the features.
        num_classifiers: S, MLP ensemble size.
        hidden: hidden widths of each MLP.
        pixel_fraction: fraction of pixels each member trains on per step, in (0, 1].
        classify: train and report the linear probe.
        label_key: batch key of the image-level label (int64 0/1).
        group_key: batch key of the subgroup (int64); absent keys skip the subgroup report.
        feature_cache: folder of the feature cache, or None. Features are stored at full image
            resolution: F x H x W values per case (about 1 MB at 32 px with F = 240, 16 MB at 128 px).
        cache_dtype: ``float32`` (hits equal a recomputation) or ``float16`` (half the disk).
        noise_seed: seed of the fixed feature noise.
        kernel: the Gaussian kernel used without a checkpoint (``noise`` group), or None (features of the
            un-noised image).
        sampler: inference recipe; ``fusion``, ``threshold`` and ``parallel`` apply (S = ``num_classifiers``).
        scheduler: a partial LR scheduler, or None.
        mask_channels: C, mask channels (one sigmoid output per channel and member).
        spacing: pixel spacing for HD95, or None.
        compile: ``torch.compile`` the pixel ensemble (see :class:`SegmentationMethod`).
        channels_last: channels-last convolution weights (see :class:`SegmentationMethod`).
    """

    network_attr = "pixel_head"
    row_only_columns = ("group", "class_label", "class_probability")  # per-case attributes, not metrics

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        backbone: nn.Module | None = None,
        backbone_ckpt: str | None = None,
        blocks: Sequence[str] | None = None,
        timesteps: Sequence[int] = (50, 150, 250),
        num_classifiers: int = 10,
        hidden: Sequence[int] = (128, 32),
        pixel_fraction: float = 0.5,
        classify: bool = True,
        label_key: str = "label",
        group_key: str | None = "group",
        feature_cache: str | None = None,
        cache_dtype: str = "float32",
        noise_seed: int = 0,
        kernel: GaussianKernel | None = None,
        sampler: DiffusionSampler | None = None,
        scheduler: Callable[..., Any] | None = None,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        if not 0.0 < float(pixel_fraction) <= 1.0:
            raise ConfigError(f"pixel_fraction must lie in (0, 1], got {pixel_fraction}")
        self.backbone_ckpt = str(backbone_ckpt) if backbone_ckpt else None
        if self.backbone_ckpt is not None:
            backbone, kernel, _ = load_backbone(self.backbone_ckpt)
        else:
            if kernel is not None and not isinstance(kernel, GaussianKernel):
                raise ConfigError(
                    f"FEDD noises the backbone's input with a Gaussian kernel (noise=gaussian), got "
                    f"{type(kernel).__name__}"
                )
            if backbone is None:
                raise ConfigError(
                    "FEDD needs model.backbone_ckpt (a pretrained image_ddpm) or a model.backbone"
                )
            message = (
                "FEDD: model.backbone_ckpt is null, so the diffusion backbone has RANDOM weights. Its features "
                "are meaningless; this is for smoke tests only. Pretrain with `diffseg-train model=image_ddpm` "
                "and pass model.backbone_ckpt=<run>/checkpoints/best.ckpt"
            )
            warnings.warn(message, UserWarning, stacklevel=2)
            rank_zero_warn(message)
        if blocks is None:  # every decoder block of a MONAI DiffusionModelUNet
            up_blocks = getattr(backbone, "up_blocks", None)
            if up_blocks is None:
                raise ConfigError(f"{type(backbone).__name__} has no up_blocks: name model.blocks explicitly")
            blocks = [f"up_blocks.{i}" for i in range(len(up_blocks))]
        self.extractor = DiffusionFeatureExtractor(
            backbone, list(blocks), list(timesteps), kernel=kernel, output_size=None, noise_seed=noise_seed
        )
        self.pixel_head = PixelMLPEnsemble(
            self.extractor.out_channels, mask_channels, num_classifiers, hidden
        )
        self.classify = bool(classify)
        self.linear_probe = (
            nn.Sequential(
                nn.BatchNorm1d(self.extractor.out_channels, affine=False),
                nn.Linear(self.extractor.out_channels, 1),
            )
            if self.classify
            else None
        )
        self.pixel_fraction = float(pixel_fraction)
        self.label_key = label_key
        self.group_key = group_key
        self.feature_cache = feature_cache
        if cache_dtype not in ("float32", "float16"):
            raise ConfigError(f"cache_dtype must be 'float32' or 'float16', got {cache_dtype!r}")
        self.cache_dtype = getattr(torch, cache_dtype)
        self.fusion = sampler.fusion if sampler is not None else "mean"
        self.use_sampler(sampler)
        self._caches: dict[str, FeatureCache | None] = {}

    # ---------------------------------------------------------------------------------- features
    def _stage_split(self) -> str | None:
        trainer = self._trainer
        if trainer is None:
            return None
        if trainer.training:
            return "train"
        if trainer.sanity_checking or trainer.validating:
            return "val"
        if trainer.testing:
            return "test"
        return None

    def _cache_for(self, split: str | None) -> FeatureCache | None:
        if self.feature_cache is None or split is None:
            return None
        if split not in self._caches:
            datamodule = getattr(self._trainer, "datamodule", None)
            dataset = getattr(datamodule, "datasets", {}).get(split) if datamodule is not None else None
            cache = None
            if dataset is not None and getattr(dataset, "deterministic_items", True):
                ident = dataset_identity(
                    dataset, split=split, normalize=getattr(datamodule, "normalize", None)
                )
                cache = FeatureCache(self.feature_cache, self.extractor, ident, dtype=self.cache_dtype)
            elif dataset is not None:
                rank_zero_warn(f"FEDD: the {split} items are random per read; their features are not cached")
            self._caches[split] = cache
        return self._caches[split]

    def features(
        self, image: torch.Tensor, case_ids: Sequence[Any] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Frozen features (B, F, H, W) of (B, C, H, W) images, from the cache when one applies."""
        cache = self._cache_for(self._stage_split()) if case_ids is not None else None
        if cache is None:
            return self.extractor(image)
        ids = [str(int(i)) for i in case_ids] if torch.is_tensor(case_ids) else [str(i) for i in case_ids]
        return cache(image, ids)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C_img, H, W) images -> member logits (B, S, C, H, W) (one backbone pass + the ensemble)."""
        return self.pixel_head(self.to_memory_format(self.extractor(image)))

    def example_input(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (image,)

    def class_logit(self, features: torch.Tensor) -> torch.Tensor:
        """The linear probe on pooled features: (B, F, H, W) -> (B,) logits."""
        if self.linear_probe is None:
            raise RuntimeError("model.classify is false: there is no linear probe")
        return self.linear_probe(features.mean(dim=(-2, -1))).squeeze(1)

    # ----------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        feats = self.features(batch["image"], batch["index"])
        logits = self.pixel_head(self.to_memory_format(feats)).float()  # (B, S, C, H, W)
        target = self.training_target(batch).float().unsqueeze(1).expand_as(logits)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.pixel_fraction < 1.0:  # each member trains on its own random pixel subset
            keep = (torch.rand_like(bce) < self.pixel_fraction).float()
            seg = (bce * keep).sum() / keep.sum().clamp(min=1.0)
        else:
            seg = bce.mean()
        losses = {"seg_bce": seg}
        loss = seg
        if self.linear_probe is not None and self.label_key in batch:
            label = batch[self.label_key].float().reshape(-1)
            cls = F.binary_cross_entropy_with_logits(self.class_logit(feats).float(), label)
            losses["cls_bce"] = cls
            loss = loss + cls
        losses["loss"] = loss
        self.check_loss(loss, batch_idx)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=logits.shape[0])
        return loss

    # ------------------------------------------------------------------------ sampling and metrics
    @torch.no_grad()
    def sample(self, image: torch.Tensor, case_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The ensemble's prediction: ``samples`` (B, S, C, H, W) are the S members' probabilities, fused by
        ``sampler.fusion``; with the linear probe also ``class_probability`` (B,)."""
        feats = self.features(image, case_ids)
        samples = torch.sigmoid(self.pixel_head(self.to_memory_format(feats)).float())
        out = describe_samples(samples, self.fusion, self.threshold)
        if self.linear_probe is not None:
            out["class_probability"] = torch.sigmoid(self.class_logit(feats).float())
        return out

    def case_rows(self, out: dict[str, torch.Tensor], batch: dict) -> list[dict]:
        """The shared metrics, plus ``class_probability``, ``class_label`` and ``class_correct`` (the
        image-level probe), and ``group`` (when the batch has one)."""
        rows = super().case_rows(out, batch)
        probability = out.get("class_probability")
        labels = batch.get(self.label_key)
        groups = batch.get(self.group_key) if self.group_key else None
        for i, row in enumerate(rows):
            if probability is not None and labels is not None:
                p, y = float(probability[i]), int(labels.reshape(-1)[i])
                row.update(class_probability=p, class_label=y, class_correct=float((p > 0.5) == bool(y)))
            if groups is not None:
                row["group"] = int(groups.reshape(-1)[i])
        return rows

    def _report(self, stage: str) -> None:
        results = self.results.get(stage)
        if results is None:
            return
        rows = results["metric_per_case"]
        labelled = [r for r in rows if "class_label" in r]
        if labelled:
            scores = classification_scores(
                torch.tensor([r["class_probability"] for r in labelled]),
                torch.tensor([r["class_label"] for r in labelled]),
            )
            results["classification"] = {
                "probe": "linear on pooled features",
                "label_key": self.label_key,
                **scores,
            }
            for name in ("accuracy", "auroc"):
                if not math.isnan(scores[name]):
                    self.log(f"{stage}/class_{name}", scores[name], sync_dist=False, rank_zero_only=False)
        if stage == "test" and rows and all("group" in r for r in rows):
            metrics = [
                k
                for k, v in rows[0].items()
                if k not in ("case", "index", *self.row_only_columns)
                and not k.startswith("mean_")  # uncertainty descriptors: neither better nor worse
                and isinstance(v, float | int)
            ]

            def auroc(members: Sequence[dict]) -> float:
                members = [m for m in members if "class_label" in m]
                return classification_scores(
                    torch.tensor([m["class_probability"] for m in members]),
                    torch.tensor([m["class_label"] for m in members]),
                )["auroc"]

            aggregates = {"class_auroc": auroc} if labelled else None
            results["subgroups"] = subgroup_report(rows, "group", metrics, aggregates)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._report("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._report("test")

    def inference_settings(self) -> dict[str, Any]:
        """What inference did: one backbone pass, S = ``num_classifiers`` ensemble members, fused."""
        return self.single_pass_settings(
            num_samples=self.pixel_head.num_members,
            fusion=str(self.fusion),
            seed=self.extractor.noise_seed,
            samples="ensemble members",
            blocks=list(self.extractor.blocks),
            timesteps=list(self.extractor.timesteps),
            backbone_ckpt=self.backbone_ckpt,
        )
