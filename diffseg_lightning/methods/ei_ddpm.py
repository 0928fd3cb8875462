"""EI-DDPM: parallel per-modality mask diffusion fused by evidence (Dempster-Shafer, context discounting)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.diffusion.reverse import diffusion_loss
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.evidence import dirichlet_opinion, discounted_plausibility
from diffseg_lightning.inference.fusion import Fusion
from diffseg_lightning.inference.sampler import DiffusionSampler, describe_samples
from diffseg_lightning.losses import evidential_loss, soft_dice_loss
from diffseg_lightning.methods.base import SegmentationMethod
from diffseg_lightning.metrics.segmentation import segmentation_metrics
from diffseg_lightning.nets.ei_ddpm import ParallelDenoisers

FUSIONS = ("discounted", "dempster", "average")
LABELS = ("nested", "exclusive")
EVIDENCE = ("softplus", "relu", "exp")


class _FusedDenoiser:
    """The denoiser the sampler sees: M paths -> EIL -> CDO -> Dempster -> the fused x_0 in kernel space."""

    def __init__(self, method: EIDDPMModule) -> None:
        self.method = method

    def encode_condition(self, image: Tensor) -> Any:
        return self.method.paths.encode_condition(image)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        fused = self.method.fuse(self.method.paths(x_t, t, cond).float())["probability"]
        return self.method.model_output(fused, x_t, t)


class EIDDPMModule(SegmentationMethod):
    """EI-DDPM (Zhao and Li, MICCAI 2023): one DDPM path per modality, an evidence-identified layer (EIL),
    the contextual discounting operator (CDO) and Dempster's rule.

    Training step (B images with M modalities, C mask channels, K = C + 1 exclusive classes):

    1. Classes: the C mask channels become K one-hot classes ``y`` (``labels="nested"``: the channels are
       nested regions, e.g. BraTS WT ⊇ TC ⊇ ET, class 0 = outside the first, class k = region k-1 minus
       region k, i.e. background / ED / NCR / ET; ``"exclusive"``: disjoint channels, class 0 = none).
       Non-nested (resp. overlapping) masks raise a ``ValueError``.
    2. Diffusion: ``x_0 = kernel.encode_mask(y)`` (K channels in {-1, 1}), ``t ~ U[0, T)``,
       ``x_t ~ q(x_t | x_0)`` (the Gaussian kernel; the schedule is the only thing the paths share).
    3. Parallel paths: M denoisers with separate weights, path m conditioned on modality m only, all on
       the same x_t, in one vectorised pass (:class:`~diffseg_lightning.nets.ei_ddpm.ParallelDenoisers`);
       each outputs K channels.
    4. EIL: evidence ``e = softplus(output)``, ``alpha = e + 1``, ``b_k = e_k / S``, ``u = K / S``
       (:func:`~diffseg_lightning.inference.evidence.dirichlet_opinion`); per path the evidential loss
       ``L_ace + lambda_t KL`` with ``lambda_t = min(1, epoch / anneal_epochs)``
       (:func:`~diffseg_lightning.losses.evidential_loss`).
    5. CDO + Dempster: reliabilities ``beta = sigmoid(theta)`` (M, K), learnable, discount each path's
       masses; Dempster's rule combines the M discounted mass functions; the output is the normalised
       fused plausibility (:func:`~diffseg_lightning.inference.evidence.discounted_plausibility`),
       trained with Huang et al.'s discounted Dice loss
       (:func:`~diffseg_lightning.losses.soft_dice_loss`).
    6. Loss: ``lambda_eil * mean_m L_EIL(m) + lambda_dice * L_dice(fused) + lambda_ddpm * kernel.loss``,
       the last the kernel's x_0 loss (MSE) on the fused prediction ``2 p - 1``.

    Sampling: the fused prediction is the x_0 estimate of the reverse process (given to the kernel as
    x_0, or as the epsilon it implies when ``noise.objective=epsilon``), so the S chains of the sampler
    (:class:`DiffusionSampler`: one batched pass per step, per-case seeds, strided DDIM / DDPM) denoise
    one K-class segmentation that every path sees at every step. The final fused class probabilities
    (B, S, K, H, W) become the C region probabilities
    (nested: region c = sum_{k > c} p_k; exclusive: channel c = p_{c+1}), fused over S and scored by the
    shared protocol. The learned reliabilities are logged (``reliability/<modality>/<class>``) and
    written to ``summary.json`` (``reliability``: modality -> class -> beta).

    Choices the paper leaves open (no code was released; where the issue's summary of the paper does not
    fix a detail, the evidential-segmentation papers it builds on do: Han et al. ICLR 2021 for the EIL and
    its loss, Huang et al. MICCAI 2022 for the CDO, Dempster's rule and the discounted Dice loss), ours:

    - the paths are MedSegDiff U-Nets (the config's ``denoiser``), one per modality, separate weights;
      the noisy segmentation x_t is shared by all paths (one reverse chain, fused at every step);
    - the paths predict x_0 (as K evidence logits), not epsilon: evidence is about the segmentation;
    - evidence through softplus (``evidence``: softplus | relu | exp), as Han et al. and Zou et al.;
    - ``lambda_t = min(1, epoch / anneal_epochs)`` with ``anneal_epochs = 10`` (Han et al. anneal over
      the first epochs; their released default is 50 for far longer trainings);
    - reliabilities ``beta = sigmoid(theta)`` initialised to ``reliability_init = 0.5`` for every
      modality and class (no prior preference, steepest sigmoid), learned with the network's optimiser,
      optionally at their own rate ``reliability_lr``;
    - the discounted Dice loss is per image and class (background included), averaged;
    - loss weights 1, 1, 1 (``lambda_eil``, ``lambda_dice``, ``lambda_ddpm``).

    Ablations (``fusion``): ``discounted`` (the paper), ``dempster`` (no discounting, beta = 1), and
    ``average``: no evidence at all, the paths' softmax probabilities averaged, each path trained with
    cross-entropy instead of the evidential loss (the "average of the four paths" baseline).

    Args:
        denoiser: a factory (Hydra partial) for one path's denoiser, ``image_channels=1``,
            ``mask_channels = out_channels = K``; or a module (see ``ParallelDenoisers``).
        kernel: the Gaussian kernel without learned variance; ``objective="x0"`` (the experiments) or
            ``"epsilon"`` (the fused x_0 is converted to the noise it implies).
        sampler: the inference recipe (fusion mean, vote or staple).
        optimizer: a partial optimiser, called with the parameters (reliabilities included).
        scheduler: a partial LR scheduler, or None.
        mask_channels: C, mask channels (K = C + 1 classes).
        num_modalities: M, modalities = image channels = paths.
        labels: ``nested`` or ``exclusive`` (see 1.).
        fusion: ``discounted``, ``dempster`` or ``average``.
        evidence: ``softplus``, ``relu`` or ``exp``.
        reliability_init: initial beta, in (0, 1).
        reliability_lr: learning rate of the reliability logits (their own parameter group, no weight
            decay); None: the network's. Adam moves every logit by about ``lr`` per step whatever its
            gradient's size, so with the network's 1e-4 to 2e-3 the 16 reliabilities hardly move in a short
            training; a larger rate lets them settle.
        anneal_epochs: epochs over which the KL weight rises to 1 (>= 1).
        lambda_eil, lambda_dice, lambda_ddpm: loss weights (>= 0).
        modality_names: names of the M modalities (for logs and summary.json), default ``m0..``.
        class_names: names of the K classes, default ``background, class1, ...``.
        region_names: names of the C mask channels (e.g. WT, TC, ET), default ``region0, ...``: every
            ``summary.json`` row gains ``dice_<name>`` and ``hd95_<name>`` per channel (C > 1).
        spacing: pixel spacing for HD95, or None.
        compile: ``torch.compile`` the paths (see :class:`SegmentationMethod`).
        channels_last: accepted for the shared interface; the stacked path weights are not Conv2d
            modules, so it has no effect.
    """

    network_attr = "paths"

    def __init__(
        self,
        denoiser: nn.Module | Callable[[], nn.Module],
        kernel: GaussianKernel,
        sampler: DiffusionSampler,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        mask_channels: int = 3,
        num_modalities: int = 4,
        labels: str = "nested",
        fusion: str = "discounted",
        evidence: str = "softplus",
        reliability_init: float = 0.5,
        reliability_lr: float | None = None,
        anneal_epochs: int = 10,
        lambda_eil: float = 1.0,
        lambda_dice: float = 1.0,
        lambda_ddpm: float = 1.0,
        modality_names: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        region_names: Sequence[str] | None = None,
        spacing: Sequence[float] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        for name, value, valid in (
            ("labels", labels, LABELS),
            ("fusion", fusion, FUSIONS),
            ("evidence", evidence, EVIDENCE),
        ):
            if value not in valid:
                raise ConfigError(f"EIDDPMModule: {name} must be one of {valid}, got {value!r}")
        if not isinstance(kernel, GaussianKernel) or kernel.learn_variance:
            got = (
                "learn_variance=true" if isinstance(kernel, GaussianKernel) else f"a {type(kernel).__name__}"
            )
            raise ConfigError(
                "EIDDPMModule needs the Gaussian kernel (noise=gaussian, objective x0 or epsilon) without a "
                f"learned variance (noise.learn_variance=false): the fused evidence is the x_0 estimate of every "
                f"reverse step; got {got}"
            )
        if Fusion.parse(sampler.fusion) is Fusion.EVOLUTION:
            raise ConfigError("EIDDPMModule: sampler.fusion=evolution needs a learned variance; use mean")
        if not 0.0 < reliability_init < 1.0:
            raise ConfigError(f"reliability_init must lie in (0, 1), got {reliability_init}")
        if anneal_epochs < 1 or min(lambda_eil, lambda_dice, lambda_ddpm) < 0:
            raise ConfigError("anneal_epochs must be >= 1 and the loss weights >= 0")
        self.num_classes = int(mask_channels) + 1
        self.num_modalities = int(num_modalities)
        if not isinstance(denoiser, nn.Module):  # a factory: every path gets K input and output channels
            denoiser = functools.partial(
                denoiser, image_channels=1, mask_channels=self.num_classes, out_channels=self.num_classes
            )
        self.paths = ParallelDenoisers(denoiser, self.num_modalities)
        if self.paths.out_channels != self.num_classes or self.paths.mask_channels != self.num_classes:
            raise ConfigError(
                f"each path denoiser must take and return K = mask_channels + 1 = {self.num_classes} "
                f"channels (one per class), got mask_channels={self.paths.mask_channels}, "
                f"out_channels={self.paths.out_channels}"
            )
        self.kernel = kernel
        self.sampler = sampler
        self.labels, self.fusion, self.evidence = labels, fusion, evidence
        self.anneal_epochs = int(anneal_epochs)
        if reliability_lr is not None and reliability_lr <= 0:
            raise ConfigError(f"reliability_lr must be null or > 0, got {reliability_lr}")
        self.reliability_lr = reliability_lr
        self.lambda_eil, self.lambda_dice, self.lambda_ddpm = lambda_eil, lambda_dice, lambda_ddpm
        logit = torch.logit(torch.tensor(float(reliability_init)))
        self.reliability_logit = nn.Parameter(
            torch.full((self.num_modalities, self.num_classes), float(logit))
        )
        self.modality_names = list(modality_names or [f"m{i}" for i in range(self.num_modalities)])
        self.class_names = list(
            class_names or ["background", *[f"class{k}" for k in range(1, self.num_classes)]]
        )
        self.region_names = list(region_names or [f"region{c}" for c in range(self.mask_channels)])
        if (
            len(self.modality_names) != self.num_modalities
            or len(self.class_names) != self.num_classes
            or len(self.region_names) != self.mask_channels
        ):
            raise ConfigError(
                f"modality_names needs {self.num_modalities} names, class_names {self.num_classes} and "
                f"region_names {self.mask_channels}, got {self.modality_names}, {self.class_names} and "
                f"{self.region_names}"
            )

    # -------------------------------------------------------------------------------- labels
    def regions_to_classes(self, mask: Tensor) -> Tensor:
        """(B, C, H, W) {0, 1} masks -> (B, K, H, W) one-hot classes (see the class docstring)."""
        mask = mask.float()
        ones = torch.ones_like(mask[:, :1])
        if self.labels == "nested":
            outer = torch.cat([ones, mask], 1)
            inner = torch.cat([mask, torch.zeros_like(ones)], 1)
            classes = outer - inner
            if bool((classes < 0).any()):
                raise ConfigError(
                    "EIDDPMModule(labels=nested): the mask channels are not nested (channel c+1 must lie "
                    "inside channel c, e.g. BraTS WT, TC, ET); use labels=exclusive for disjoint classes"
                )
            return classes
        background = ones - mask.sum(1, keepdim=True)
        if bool((background < 0).any()):
            raise ConfigError("EIDDPMModule(labels=exclusive): the mask channels overlap; use labels=nested")
        return torch.cat([background, mask], 1)

    def classes_to_regions(self, probability: Tensor, dim: int = -3) -> Tensor:
        """(..., K, H, W) class probabilities -> (..., C, H, W) mask-channel probabilities."""
        if self.labels == "nested":  # region c = P(class > c)
            tail = probability.flip(dim).cumsum(dim).flip(dim)
            return tail.narrow(dim, 1, self.mask_channels).clamp(0.0, 1.0)
        return probability.narrow(dim, 1, self.mask_channels)

    # ------------------------------------------------------------------------------ evidence
    @property
    def reliability(self) -> Tensor:
        """beta (M, K) in (0, 1); ones when ``fusion`` is not ``discounted``."""
        beta = torch.sigmoid(self.reliability_logit)
        return beta if self.fusion == "discounted" else torch.ones_like(beta)

    def to_evidence(self, output: Tensor) -> Tensor:
        if self.evidence == "softplus":
            return F.softplus(output)
        if self.evidence == "relu":
            return F.relu(output)
        return torch.exp(output.clamp(max=10.0))

    def fuse(self, output: Tensor) -> dict[str, Tensor]:
        """(B, M, K, H, W) path outputs -> the EIL's opinions and the fused class probability (B, K, H, W)."""
        if self.fusion == "average":
            per_path = torch.softmax(output, dim=2)
            return {"probability": per_path.mean(1), "per_path": per_path}
        opinion = dirichlet_opinion(self.to_evidence(output), dim=2, check=False)  # >= 0 by construction
        beta = self.reliability.to(output.dtype)[:, None, :, None, None]  # (M, 1, K, 1, 1)
        fused = discounted_plausibility(
            opinion["belief"].transpose(0, 1), opinion["uncertainty"].transpose(0, 1), beta, dim=2
        )
        return {**opinion, "path_probability": opinion["probability"], "probability": fused}

    # ----------------------------------------------------------------------------- training
    def model_output(self, probability: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The fused class probability (B, K, H, W) as the kernel's network output: ``x_0 = 2 p - 1`` for
        ``objective=x0``; for ``epsilon`` the noise it implies,
        ``(x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)``."""
        x0 = self.kernel.encode_mask(probability)
        if self.kernel.objective == "x0":
            return x0
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        sa = self.kernel.sqrt_alphas_cumprod[t].to(x_t.dtype).view(shape)
        s1 = self.kernel.sqrt_one_minus_alphas_cumprod[t].to(x_t.dtype).view(shape)
        return (x_t - sa * x0) / s1

    def forward(self, x_t: Tensor, t: Tensor, image: Tensor) -> Tensor:
        """One pass of all M paths (image branches included): (B, M, K, H, W) path outputs."""
        return self.paths(x_t, t, self.paths.encode_condition(image))

    def example_input(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_t = torch.zeros(1, self.num_classes, *image.shape[-2:])
        return x_t, torch.zeros(1, dtype=torch.long), image

    def annealing(self) -> float:
        return min(1.0, self.current_epoch / self.anneal_epochs)

    def losses(
        self, output: Tensor, fused: dict[str, Tensor], classes: Tensor, ddpm: Tensor
    ) -> dict[str, Tensor]:
        """Every loss term from the path outputs (B, M, K, H, W), their :meth:`fuse`, the one-hot classes
        (B, K, H, W) and the kernel's loss ``ddpm`` of the fused prediction."""
        target = classes.unsqueeze(1).expand_as(output)
        if self.fusion == "average":
            path = F.cross_entropy(output.flatten(0, 1), target.flatten(0, 1).argmax(1))
            terms = {"ce": path}
        else:
            eil = evidential_loss(fused["alpha"], target, self.annealing(), dim=2)
            path = eil["loss"]
            terms = {"ace": eil["ace"], "kl": eil["kl"]}
        dice = soft_dice_loss(fused["probability"], classes)
        loss = self.lambda_eil * path + self.lambda_dice * dice + self.lambda_ddpm * ddpm
        return {"loss": loss, "path": path, "dice": dice, "ddpm": ddpm, **terms}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        classes = self.regions_to_classes(self.training_target(batch))
        x0 = self.kernel.encode_mask(classes)
        paths: dict[str, Any] = {}  # the path outputs and their fusion, for the other loss terms

        def fused_output(x_t: Tensor, t: Tensor) -> Tensor:
            paths["output"] = self(x_t, t, batch["image"]).float()
            paths["fused"] = self.fuse(paths["output"])
            return self.model_output(paths["fused"]["probability"], x_t, t)

        ddpm = diffusion_loss(self.kernel, x0, fused_output).terms["loss"]
        losses = self.losses(paths["output"], paths["fused"], classes, ddpm)
        self.check_loss(losses["loss"], batch_idx)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=x0.shape[0])
        return losses["loss"]

    def configure_optimizers(self) -> Any:
        """The network's optimiser; the reliability logits in their own group if ``reliability_lr`` is set."""
        if self.reliability_lr is None:
            return super().configure_optimizers()
        others = [p for name, p in self.named_parameters() if name != "reliability_logit"]
        groups = [
            {"params": others},
            {"params": [self.reliability_logit], "lr": self.reliability_lr, "weight_decay": 0.0},
        ]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer, total_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------- inference
    def sample(self, image: Tensor, case_ids: Tensor | None = None) -> dict[str, Tensor]:
        """S fused segmentations per image: ``samples`` (B, S, C, H, W) region probabilities, fused
        ``probability`` / ``mask`` and the uncertainty maps (B, C, H, W); ``class_probability``
        (B, K, H, W), the mean over S of the fused class probabilities."""
        if image.dim() != 4 or image.shape[1] != self.num_modalities:
            raise ConfigError(
                f"EI-DDPM expects (B, {self.num_modalities}, H, W) images, one channel per modality, got "
                f"{tuple(image.shape)}"
            )
        out = self.sampler.sample(_FusedDenoiser(self), self.kernel, image, self.num_classes, case_ids)
        classes = out["samples"]  # (B, S, K, H, W)
        result = describe_samples(
            self.classes_to_regions(classes), self.sampler.fusion, self.sampler.threshold
        )
        return {**result, "class_probability": classes.mean(1)}

    def case_rows(self, out: dict[str, Tensor], batch: dict) -> list[dict]:
        """The shared per-case rows plus Dice and HD95 per mask channel (``dice_<name>``, ``hd95_<name>``)."""
        rows = super().case_rows(out, batch)
        if self.mask_channels > 1 and batch.get("fov") is None:
            scores = segmentation_metrics(out["mask"], batch["mask"].float())
            for i, row in enumerate(rows):
                for c, name in enumerate(self.region_names):
                    row[f"dice_{name}"] = float(scores["dice"][i, c])
                    row[f"hd95_{name}"] = float(scores["hd95"][i, c])
        return rows

    def inference_settings(self) -> dict[str, Any]:
        return self.sampler.settings(self.kernel)

    # --------------------------------------------------------------------------- reliability
    def reliability_table(self) -> dict[str, dict[str, float]]:
        """modality -> class -> learned beta (ones unless ``fusion=discounted``)."""
        beta = self.reliability.detach().float().cpu().tolist()
        return {
            name: dict(zip(self.class_names, row, strict=True))
            for name, row in zip(self.modality_names, beta, strict=True)
        }

    def _log_reliability(self, stage: str) -> None:
        table = self.reliability_table()
        for modality, row in table.items():
            for cls, value in row.items():
                self.log(f"reliability/{modality}/{cls}", value, sync_dist=False, rank_zero_only=False)
        if stage in self.results:
            self.results[stage]["reliability"] = table
            self.results[stage]["fusion"] = self.fusion
        if stage == "test":
            rank_zero_info(f"EI-DDPM reliabilities (beta, modality x class): {table}")

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_reliability("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_reliability("test")
