"""A non-diffusion baseline: a MONAI U-Net trained with Dice + BCE, scored under the same protocol.

It exists so that the gains of the diffusion methods are reported against an honest, equally trained
and equally evaluated discriminative network: the same data pipeline, callbacks (EMA, checkpointing),
metrics, ``summary.json`` layout, ``diffseg-eval`` and ``diffseg-predict``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.losses import DiceLoss
from torch import nn

from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.sampler import DiffusionSampler, describe_samples
from diffseg_lightning.methods.base import SegmentationMethod


class DiceBCELoss(nn.Module):
    """Soft Dice plus binary cross-entropy on C independent sigmoid channels.

    ``loss = lambda_dice * DiceLoss(sigmoid=True)(logits, y) + lambda_bce * BCEWithLogitsLoss()(logits, y)``
    with MONAI's :class:`monai.losses.DiceLoss` (Milletari, Navab & Ahmadi, "V-Net", 3DV 2016; the
    "Dice + CE" pairing of nnU-Net, Isensee et al., Nature Methods 18:203-211, 2021) and torch's
    :class:`torch.nn.BCEWithLogitsLoss` (mean over every pixel and channel).

    Why not MONAI's ``DiceCELoss(sigmoid=True)``: in MONAI 1.6 it uses BCE only when the input has one
    channel; with C > 1 channels it applies the softmax cross-entropy (mutually exclusive classes) even
    with ``sigmoid=True``, which is wrong for C independent, possibly overlapping channels (e.g. BraTS's
    nested regions). For C = 1 the two are the same number (``tests/test_unet_baseline.py`` checks both).

    Args:
        lambda_dice: weight of the Dice term (>= 0).
        lambda_bce: weight of the BCE term (>= 0); not both 0.
        batch: Dice over the whole batch per channel (nnU-Net's "batch Dice") instead of per image and
            channel, then averaged (MONAI's default, ``False``).
        smooth_nr: added to the Dice numerator (MONAI's default 1e-5; an empty mask predicted empty
            gives a Dice loss near 0).
        smooth_dr: added to the Dice denominator (MONAI's default 1e-5).

    Shapes:
        ``forward(logits, target)``: logits (B, C, H, W), target (B, C, H, W) in [0, 1]; returns a dict of
        scalars: ``loss`` (the weighted sum), ``dice_loss`` (1 - soft Dice) and ``bce`` (unweighted).
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_bce: float = 1.0,
        batch: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_bce < 0 or lambda_dice + lambda_bce == 0:
            raise ConfigError(
                f"DiceBCELoss needs lambda_dice >= 0 and lambda_bce >= 0, not both 0; "
                f"got {lambda_dice} and {lambda_bce}"
            )
        self.lambda_dice = lambda_dice
        self.lambda_bce = lambda_bce
        self.dice = DiceLoss(sigmoid=True, batch=batch, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        dice = self.dice(logits, target)
        bce = self.bce(logits, target)
        return {"loss": self.lambda_dice * dice + self.lambda_bce * bce, "dice_loss": dice, "bce": bce}


def _stride_product(net: nn.Module) -> tuple[int, int]:
    """How much the network downsamples (H, W): the product of its ``strides`` (1, 1) when it has none."""
    strides = getattr(net, "strides", None) or []
    factor_h = factor_w = 1
    for stride in strides:
        sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)[:2]
        factor_h, factor_w = factor_h * int(sh), factor_w * int(sw)
    return factor_h, factor_w


class UNetSegmentationModule(SegmentationMethod):
    """Non-diffusion baseline: a segmentation network trained with Dice + BCE, one deterministic prediction.

    The default network (``conf/model/unet.yaml``) is MONAI's :class:`monai.networks.nets.UNet`
    (Ronneberger, Fischer & Brox, "U-Net", MICCAI 2015, with the residual units of Kerfoot et al.,
    "Left-ventricle quantification using residual U-Net", STACOM 2018); any ``nn.Module`` mapping
    (B, C_img, H, W) images to (B, C, H, W) logits works. Multi-class masks (C > 1) are C independent
    sigmoid channels, as the diffusion methods treat them.

    Training: ``loss(net(image), mask)``, by default :class:`DiceBCELoss`; a loss returning a tensor
    (e.g. MONAI's ``DiceCELoss``) is accepted too. With several annotators per image, each step draws one
    annotator per image, exactly as :class:`~diffseg_lightning.methods.MaskDiffusionModule` does
    (:meth:`training_target`), so both see the same supervision.

    Inference (validation, test, ``diffseg-eval``, ``diffseg-predict``): one pass,
    ``probability = sigmoid(logits)`` (B, C, H, W), ``mask = probability > threshold``. The probability
    feeds the calibration metrics (ECE, and UEO / AUROC of the uncertainty against the error map); the
    uncertainty map ``entropy`` is the Bernoulli entropy of the probability, in bits. ``samples`` is the
    probability as S = 1 sample (B, 1, C, H, W), so ``std`` and ``mutual_information`` are 0 everywhere
    (a deterministic network has no sample spread), and the multi-annotator metrics are those of one
    sample (GED with S = 1, no ``ged_4`` / ``ged_16``; diversity NaN).

    What it takes from the Hydra groups every method gets (``entry.build_module`` passes ``kernel=`` and
    ``sampler=`` only to a method that takes them):

    - ``noise``: not built, and not taken (no kernel buffers in the checkpoint). The run's ``config.yaml``
      still lists the ``noise`` group, which has no effect on this method.
    - ``sampler``: only ``threshold`` (default 0.5) and ``parallel`` apply. ``num_steps``,
      ``num_samples``, ``fusion`` and ``seed`` do not: the ``sampler`` block of ``summary.json`` reports
      what was really done, ``num_steps = 1`` (one network pass), ``num_samples = 1``,
      ``fusion = "none"``, ``seed = null`` (and null for any other sampler setting),
      ``deterministic = true``. Running S test-time passes (test-time augmentation or MC dropout) would
      be a different method, so it is not done here. With ``parallel=sample`` under DDP every process
      predicts every image (there are no samples to split); the gathered rows are deduplicated by case
      index, so the result is the same as with one process.

    Args:
        net: (B, C_img, H, W) -> (B, C, H, W) logits; with a ``strides`` attribute (MONAI's U-Net), inputs
            must be divisible by the product of the strides (checked, ``ValueError`` naming the size).
        optimizer: a partial optimiser, called with the parameters.
        scheduler: a partial LR scheduler, called with ``(optimizer, total_steps=...)``, or None.
        mask_channels: C, channels of the mask (and of the network's output).
        spacing: pixel spacing for HD95, or None for pixels.
        loss: ``loss(logits, target)`` -> a dict with ``loss`` (and terms to log) or a scalar tensor;
            None gives :class:`DiceBCELoss` with its defaults.
        sampler: the inference recipe; only its ``threshold`` and ``parallel`` are used. None gives
            threshold 0.5.
        compile: ``torch.compile`` the U-Net (``self.net``; see :class:`SegmentationMethod`).
        channels_last: channels-last weights and images (see :class:`SegmentationMethod`).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        loss: nn.Module | None = None,
        sampler: DiffusionSampler | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        self.net = net
        self.loss = loss if loss is not None else DiceBCELoss()
        self.use_sampler(sampler)
        self.size_factor = _stride_product(net)

    def example_input(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (image,)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C_img, H, W) images -> (B, C, H, W) logits."""
        h, w = image.shape[-2:]
        fh, fw = self.size_factor
        if h % fh or w % fw:
            raise ConfigError(
                f"{type(self.net).__name__} downsamples by {fh}x{fw} (the product of its strides), so the "
                f"input size must be divisible by it; got {h}x{w} (set data.size to a multiple of {fh})"
            )
        return self.net(self.to_memory_format(image))

    # ----------------------------------------------------------------------------------- training
    def loss_terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss as a dict with ``loss``: logits and target (B, C, H, W)."""
        if logits.shape != target.shape:
            raise ConfigError(
                f"the network returns {tuple(logits.shape)} but the masks are {tuple(target.shape)}: its "
                f"output channels must equal data.mask_channels ({self.mask_channels})"
            )
        out = self.loss(logits, target)
        return out if isinstance(out, dict) else {"loss": out}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        target = self.training_target(batch).float()
        losses = self.loss_terms(self(batch["image"]).float(), target)
        self.check_loss(losses["loss"], batch_idx)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=target.shape[0])
        return losses["loss"]

    # ------------------------------------------------------------------------ sampling and metrics
    @torch.no_grad()
    def sample(self, image: torch.Tensor, case_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One deterministic prediction in the layout every method returns (``case_ids`` is unused).

        Returns:
            ``samples`` (B, 1, C, H, W) = the probability; ``probability`` (B, C, H, W) =
            sigmoid(logits); ``mask`` (B, C, H, W) = probability > threshold; ``entropy`` (B, C, H, W), the
            Bernoulli entropy of the probability in bits; ``std`` and ``mutual_information`` (B, C, H, W),
            zero.
        """
        probability = torch.sigmoid(self(image).float())
        # mean fusion of one sample is the identity; the entropy of the mean is the Bernoulli entropy
        return describe_samples(probability.unsqueeze(1), "mean", self.threshold)

    def inference_settings(self) -> dict[str, Any]:
        """What inference really did, in the keys of :meth:`DiffusionSampler.settings` (see the class).

        Sampler settings that did not apply (``seed``, and any other, e.g. ``tau``) are null.
        """
        return self.single_pass_settings()


__all__ = ["DiceBCELoss", "UNetSegmentationModule"]
