"""Diffusion-based data augmentation for nuclei segmentation (Yu et al., MICCAI 2023): the two generators.

One LightningModule holds both stages (``stage`` option): stage 1, an unconditional DDPM over the 3-channel
nuclei structure; stage 2, a DDPM over histopathology images conditioned on the structure through SPADE
normalisation, trained with classifier-free guidance. ``diffseg-synthesize`` turns a trained checkpoint
into image / instance-map pairs (:meth:`NucleiAugmentationModule.generate`), and the downstream network
is :class:`~diffseg_lightning.methods.hovernet.HoVerNetModule`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.diffusion.reverse import diffusion_loss, reverse
from diffseg_lightning.diffusion.solvers.base import Solver
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.sampler import DiffusionSampler
from diffseg_lightning.methods.base import SegmentationMethod
from diffseg_lightning.utils.hover import (
    combination_variants,
    instances_from_structure,
    structure_from_instances,
)

STAGES = ("both", "structure", "image")
#: The timesteps (fractions of T) at which validation and test score the held-out denoising error.
EVAL_TIMESTEP_FRACTIONS = (0.05, 0.25, 0.5, 0.75, 0.95)


def classifier_free_guidance(
    conditional: torch.Tensor, unconditional: torch.Tensor, scale: float
) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022): ``out_u + s (out_c - out_u)``.

    The form of the semantic diffusion model (Wang et al., 2022) on which the authors' released code is
    built: ``s = 1`` is the conditional model, ``s = 0`` the unconditional one; Yu et al. sample with
    ``s = 2``. (Ho & Salimans write the same thing as ``(1 + w) out_c - w out_u`` with ``w = s - 1``.)

    Args:
        conditional: the network output with the condition, any shape.
        unconditional: the output with the null condition, same shape.
        scale: ``s``.
    """
    return unconditional + scale * (conditional - unconditional)


class NucleiAugmentationModule(SegmentationMethod):
    """The two generators of Yu et al., "Diffusion-Based Data Augmentation for Nuclei Image Segmentation",
    MICCAI 2023 (one module; ``stage`` chooses which of them train).

    Stage 1 (``structure_net``): an unconditional DDPM over the nuclei structure ``(semantic +1/-1,
    horizontal, vertical)`` of :func:`~diffseg_lightning.utils.hover.structure_from_instances` (B, 3, H, W),
    built on the fly from the batch's ``instances``. By default MONAI's
    :class:`~monai.networks.nets.DiffusionModelUNet` (``conf/model/nuclei_aug.yaml``).

    Stage 2 (``image_net``): a DDPM over the image (B, C, H, W) conditioned on the structure through
    spatially adaptive (SPADE) group norm in the middle and decoder blocks, as the paper: by default
    :class:`~diffseg_lightning.nets.nuclei_spade.SPADEMiddleDiffusionUNet` (MONAI's
    :class:`~monai.networks.nets.SPADEDiffusionModelUNet`, which has SPADE in its decoder only, with SPADE
    residual blocks in its middle block too; MONAI's own network is one ``_target_`` away), called
    ``image_net(x_t, timesteps=t, seg=structure)``. Classifier-free guidance: with probability ``cond_drop_prob`` (0.2) per image the
    structure is replaced by the null condition, all zeros (the convention of the semantic diffusion model
    the authors' code builds on), from training step ``cond_drop_start_step`` on (0: from the start; the
    paper first trains the conditional model, then fine-tunes with dropping: resume a checkpoint with a
    start step past its steps, or set the start step to a point of one run). Sampling uses
    :func:`classifier_free_guidance` with ``guidance_scale`` (2), the conditional and null rows of every
    step in one batched network pass.

    Both stages use the run's noise kernel (``noise=gaussian``: ``q_sample``, ``loss`` and the strided
    ``inference_timesteps``) and the sampler's solver (``sampler.solver``; ``sampler=default``: the kernel's
    DDIM), each stage with its own network; the training loss is the sum of the active stages' kernel losses
    (:func:`~diffseg_lightning.diffusion.reverse.diffusion_loss`; separate networks, so each gets its own
    gradient).
    Images are mapped to the kernel's [-1, 1] by ``image_range`` (e.g. [0, 255] with ``data.normalize=none``
    on MoNuSeg) and back when generating.

    Evaluation (validation, test, ``summary.json``): a generator has no reference mask to score, so each
    case's row holds the held-out denoising error of each active stage, the mean squared error of the
    network output against its target (noise or x0, the kernel's objective) at the timesteps
    :data:`EVAL_TIMESTEP_FRACTIONS` of T, with noise seeded per case (``sampler.seed`` and the case index),
    so runs compare on the same draws: ``structure_mse`` and ``image_mse``, and their mean
    ``denoising_mse`` (which the experiments' checkpointing monitors, ``mode: min``). ``diffseg-predict`` does not
    apply (there is no input image to segment); ``diffseg-synthesize`` generates pairs.

    Generation (:meth:`generate`): structures from noise with ``num_steps`` strided steps of the solver
    (:func:`~diffseg_lightning.diffusion.reverse.reverse`), inverted to instance maps with the eight swap / sign combinations
    (:func:`~diffseg_lightning.utils.hover.instances_from_structure`); the kept combination is applied to
    the structure before it conditions stage 2 (the image network was trained on correctly oriented
    maps), then images with guidance.

    Args:
        structure_net: ``structure_net(x_t, timesteps=t)`` -> (B, 3, H, W).
        image_net: ``image_net(x_t, timesteps=t, seg=structure)`` -> (B, C, H, W).
        optimizer: a partial optimiser, called with the parameters.
        kernel: the noise kernel (a ``GaussianKernel``; learned variance is not supported).
        sampler: its ``num_steps``, ``seed`` and ``solver`` set the generation steps and solver and the
            evaluation seed; None: 50 steps of the kernel's default solver, seed 0.
        scheduler: a partial LR scheduler, or None.
        stage: ``both``, ``structure`` or ``image``: which networks train (the other is kept as it is).
        image_channels: C of the images.
        image_range: ``(low, high)`` of the data's image values, mapped linearly to [-1, 1] (clamped).
        cond_drop_prob: probability of the null condition per training image (classifier-free guidance).
        cond_drop_start_step: the training step from which conditions are dropped.
        guidance_scale: ``s`` of :func:`classifier_free_guidance` when sampling.
        mask_channels, spacing, compile, channels_last: as for every method (unused by the generators
            except ``compile``, which compiles ``image_net``).
    """

    network_attr = "image_net"

    def __init__(
        self,
        structure_net: nn.Module,
        image_net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        kernel: GaussianKernel,
        sampler: DiffusionSampler | None = None,
        scheduler: Callable[..., Any] | None = None,
        stage: str = "both",
        image_channels: int = 3,
        image_range: Sequence[float] = (0.0, 255.0),
        cond_drop_prob: float = 0.2,
        cond_drop_start_step: int = 0,
        guidance_scale: float = 2.0,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        if stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {stage!r}")
        if not 0.0 <= float(cond_drop_prob) <= 1.0:
            raise ConfigError(f"cond_drop_prob must lie in [0, 1], got {cond_drop_prob}")
        low, high = (float(v) for v in image_range)
        if not high > low:
            raise ConfigError(f"image_range must be (low, high) with high > low, got {tuple(image_range)}")
        if not isinstance(kernel, GaussianKernel):
            raise ConfigError(
                "NucleiAugmentationModule diffuses structures and images with the Gaussian kernel "
                f"(noise=gaussian), got a {type(kernel).__name__}"
            )
        if kernel.learn_variance:
            raise ConfigError(
                "NucleiAugmentationModule needs a kernel without learned variance (noise.learn_variance=false)"
            )
        #: the reverse update of generation (``sampler.solver``, else the kernel's default)
        self.solver: Solver = (
            sampler.resolve_solver(kernel) if sampler is not None else kernel.default_solver()
        )
        self.structure_net = structure_net
        self.image_net = image_net
        self.kernel = kernel
        self.stage = stage
        self.image_channels = int(image_channels)
        self.image_range = (low, high)
        self.cond_drop_prob = float(cond_drop_prob)
        self.cond_drop_start_step = int(cond_drop_start_step)
        self.guidance_scale = float(guidance_scale)
        self.num_steps = sampler.num_steps if sampler is not None else 50
        self.seed = int(sampler.seed) if sampler is not None and sampler.seed is not None else 0
        if stage == "structure":
            self.image_net.requires_grad_(False)
        elif stage == "image":
            self.structure_net.requires_grad_(False)

    # ------------------------------------------------------------------------------ conversions
    def to_kernel_space(self, image: torch.Tensor) -> torch.Tensor:
        """Data image values (``image_range``) -> [-1, 1]."""
        low, high = self.image_range
        return ((image.float() - low) / (high - low) * 2.0 - 1.0).clamp(-1.0, 1.0)

    def from_kernel_space(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> data image values (``image_range``)."""
        low, high = self.image_range
        return (x.clamp(-1.0, 1.0) + 1.0) / 2.0 * (high - low) + low

    def stages(self) -> tuple[str, ...]:
        return ("structure", "image") if self.stage == "both" else (self.stage,)

    # ----------------------------------------------------------------------------------- network
    def forward(self, x_structure: torch.Tensor, t: torch.Tensor, x_image: torch.Tensor) -> tuple:
        """One pass of each network: (B, 3, H, W) and (B, C, H, W) noisy inputs at timesteps t (B,)."""
        structure_out = self.structure_net(x_structure, timesteps=t)
        image_out = self.image_net(self.to_memory_format(x_image), timesteps=t, seg=x_structure)
        return structure_out, image_out

    def example_input(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = image.shape[-2:]
        return (
            torch.zeros(1, 3, h, w),
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1, self.image_channels, h, w),
        )

    def drop_condition(
        self, structure: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The structure with each image's condition replaced by the null (zero) one with ``cond_drop_prob``."""
        if self.cond_drop_prob <= 0.0 or self.global_step < self.cond_drop_start_step:
            return structure
        draw = torch.rand(structure.shape[0], device=structure.device, generator=generator)
        keep = (draw >= self.cond_drop_prob).to(structure.dtype)
        return structure * keep[:, None, None, None]

    def stage_targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(structure (B, 3, H, W), image in kernel space (B, C, H, W)) of a batch with ``instances``."""
        if "instances" not in batch:
            raise ConfigError(
                "NucleiAugmentationModule trains on instance maps: the dataset must yield 'instances' "
                "(MoNuSeg, GlaS, or the synthetic data)"
            )
        return structure_from_instances(batch["instances"]), self.to_kernel_space(batch["image"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        structure, image = self.stage_targets(batch)
        b = structure.shape[0]
        losses: dict[str, torch.Tensor] = {}
        if "structure" in self.stages():
            terms = diffusion_loss(
                self.kernel, structure, lambda x_t, t: self.structure_net(x_t, timesteps=t)
            )
            losses.update({f"structure_{k}": v for k, v in terms.terms.items()})
        if "image" in self.stages():

            def image_output(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                # the condition is dropped after the noise is drawn (the draw order of every run so far)
                seg = self.drop_condition(structure)
                return self.image_net(self.to_memory_format(x_t), timesteps=t, seg=seg)

            terms = diffusion_loss(self.kernel, image, image_output)
            losses.update({f"image_{k}": v for k, v in terms.terms.items()})
        losses["loss"] = sum(losses[f"{s}_loss"] for s in self.stages())
        self.check_loss(losses["loss"], batch_idx)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=b)
        return losses["loss"]

    # ------------------------------------------------------------------------------- evaluation
    def held_out_errors(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per-case denoising MSE of each active stage at :data:`EVAL_TIMESTEP_FRACTIONS`, seeded per case."""
        structure, image = self.stage_targets(batch)
        b, device = structure.shape[0], structure.device
        T = self.kernel.num_train_timesteps
        steps = torch.tensor([min(T - 1, int(f * T)) for f in EVAL_TIMESTEP_FRACTIONS], device=device)
        k = steps.numel()
        t = steps.repeat(b)  # (B k,): every case at every timestep, one batched pass per network
        generators = [
            torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + int(i)) for i in batch["index"]
        ]
        out = {}
        for name, x0, net in (("structure", structure, self.structure_net), ("image", image, self.image_net)):
            if name not in self.stages():
                continue
            noise = torch.cat(
                [torch.randn((k, *x0.shape[1:]), generator=g, device=device) for g in generators]
            )
            x0_rep = x0.repeat_interleave(k, 0)
            x_t = self.kernel.q_sample(x0_rep, t, noise=noise)
            if name == "structure":
                pred = net(x_t, timesteps=t)
            else:
                pred = net(self.to_memory_format(x_t), timesteps=t, seg=structure.repeat_interleave(k, 0))
            target = noise if self.kernel.objective == "epsilon" else x0_rep
            out[f"{name}_mse"] = ((pred.float() - target) ** 2).flatten(1).mean(1).reshape(b, k).mean(1)
        out["denoising_mse"] = torch.stack(list(out.values())).mean(0)  # what checkpointing monitors (min)
        return out

    def _score(self, batch: dict) -> None:
        start = time.perf_counter()
        with torch.inference_mode():
            errors = self.held_out_errors(batch)
        self._sampling_seconds += time.perf_counter() - start
        for i, (case, index) in enumerate(zip(batch["case"], batch["index"].tolist(), strict=True)):
            self._rows.append({"case": case, "index": index, **{k: float(v[i]) for k, v in errors.items()}})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._score(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._score(batch)

    def sample(self, image: torch.Tensor, case_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError(
            "NucleiAugmentationModule generates image / instance pairs; it does not segment an input image. "
            "Use diffseg-synthesize ckpt_path=... n=... (diffseg_lightning.synthesize)"
        )

    def inference_settings(self) -> dict[str, Any]:
        """The generation settings (``summary.json``'s ``sampler`` block)."""
        return {
            "num_steps": self.num_steps,
            "num_samples": 1,
            "fusion": "none",
            "threshold": None,
            "seed": self.seed,
            "guidance_scale": self.guidance_scale,
            # the solver's name, determinism and options, in the keys of DiffusionSampler.settings
            "update": self.solver.name,
            "deterministic": self.solver.is_deterministic,
            "solver": self.solver.options(),
        }

    # ------------------------------------------------------------------------------- generation
    def guided_image_output(
        self, x: torch.Tensor, t: torch.Tensor, structure: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Guided stage-2 output: the conditional and null rows in one network pass, then
        :func:`classifier_free_guidance`."""
        if scale == 1.0:
            return self.image_net(x, timesteps=t, seg=structure)
        both = self.image_net(
            torch.cat([x, x]),
            timesteps=torch.cat([t, t]),
            seg=torch.cat([structure, torch.zeros_like(structure)]),
        )
        conditional, unconditional = both.chunk(2)
        return classifier_free_guidance(conditional, unconditional, scale)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        size: Sequence[int],
        seed: int = 0,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        structure: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Generate ``n`` structure / instance / image triples at ``size`` (H, W).

        Args:
            n: number of pairs.
            size: (H, W).
            seed: seed of the initial noise and of stochastic steps.
            num_steps: reverse steps (None: ``sampler.num_steps`` of the run).
            guidance_scale: None: the module's.
            structure: (n, 3, H, W) structures to condition on, skipping stage 1 (e.g. real ones).

        Returns:
            ``structure`` (n, 3, H, W) as conditioned on, ``instances`` (n, H, W) int64, ``combination`` (n,)
            (index into :data:`~diffseg_lightning.utils.hover.COMBINATIONS`; -1 when ``structure`` was given),
            ``image`` (n, C, H, W) in ``image_range``.
        """
        steps = int(num_steps or self.num_steps)
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        h, w = (int(v) for v in size)
        device = next(self.parameters()).device
        generator = torch.Generator(device=device).manual_seed(int(seed))
        if structure is None:
            noise = torch.randn((n, 3, h, w), generator=generator, device=device)
            raw = reverse(
                self.kernel,
                self.solver,
                lambda x, t: self.structure_net(x, timesteps=t),
                noise,
                self.kernel.inference_timesteps(steps),
                generator,
            )
            instances, combination = instances_from_structure(raw.clamp(-1.0, 1.0).cpu())
            structure = combination_variants(raw.cpu())[torch.arange(n), combination].to(device)
            instances, combination = instances.to(device), combination.to(device)
        else:
            structure = structure.to(device).float()
            instances, _ = instances_from_structure(structure.cpu(), try_combinations=False)
            instances = instances.to(device)
            combination = torch.full((n,), -1, dtype=torch.long, device=device)
        noise = torch.randn((n, self.image_channels, h, w), generator=generator, device=device)
        x0 = reverse(
            self.kernel,
            self.solver,
            lambda x, t: self.guided_image_output(x, t, structure, scale),
            noise,
            self.kernel.inference_timesteps(steps),
            generator,
        )
        return {
            "structure": structure,
            "instances": instances,
            "combination": combination,
            "image": self.from_kernel_space(x0),
        }


__all__ = ["EVAL_TIMESTEP_FRACTIONS", "STAGES", "NucleiAugmentationModule", "classifier_free_guidance"]
