"""DARL: diffusion adversarial representation learning for self-supervised vessel segmentation (Kim, Oh & Ye,
ICLR 2023): a diffusion module, a switchable-SPADE generator and two LSGAN discriminators, trained without
labels; inference is one network pass at t = 0."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.diffusion.reverse import diffusion_loss
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.sampler import DiffusionSampler, describe_samples
from diffseg_lightning.losses import lsgan_loss
from diffseg_lightning.methods.base import SegmentationMethod
from diffseg_lightning.nets.darl import one_hot_mask

__all__ = ["DARLModule", "darl_discriminator_losses", "darl_generator_losses", "to_unit_range"]

TRAIN_KEYS = ("image", "background", "fake_mask")


def darl_generator_losses(
    diffusion_loss: torch.Tensor,
    d_s_segmentation: torch.Tensor,
    d_a_synthetic: torch.Tensor,
    cycle_reconstruction: torch.Tensor,
    fake_mask: torch.Tensor,
    alpha: float,
    beta: float,
) -> dict[str, torch.Tensor]:
    """DARL's generator-side objective (Kim et al., ICLR 2023, Eq. 7-9 and 11).

    ``L^G = L_diff + alpha L_adv^G + beta L_cyc`` with
    ``L_adv^G = E[(D_s(G(eps(x^a); 0)) - 1)^2] + E[(D_a(G(eps(x^b); s^f)) - 1)^2]`` and
    ``L_cyc = E[|G(eps(G(eps(x^b); s^f)); 0) - s^f|]`` (L1, masks in [-1, 1]).

    Args:
        diffusion_loss: ``L_diff``, a scalar.
        d_s_segmentation: ``D_s`` on path A's segmentation (B, 1, h, w).
        d_a_synthetic: ``D_a`` on path B's synthetic angiogram (B, 1, h, w).
        cycle_reconstruction: path A on the (noised) synthetic angiogram (B, 1, H, W) in [-1, 1].
        fake_mask: ``s^f`` in [-1, 1], (B, 1, H, W).
        alpha: weight of the adversarial term (the paper: 0.2).
        beta: weight of the cyclic term (the paper: 5.0).

    Returns:
        ``loss`` (= L^G), ``diff``, ``adv`` (unweighted L_adv^G), ``adv_s``, ``adv_a``, ``cyc`` (unweighted).
    """
    adv_s = lsgan_loss(d_s_segmentation, True)
    adv_a = lsgan_loss(d_a_synthetic, True)
    adv = adv_s + adv_a
    cyc = (cycle_reconstruction - fake_mask).abs().mean()
    loss = diffusion_loss + alpha * adv + beta * cyc
    return {"loss": loss, "diff": diffusion_loss, "adv": adv, "adv_s": adv_s, "adv_a": adv_a, "cyc": cyc}


def darl_discriminator_losses(
    d_s_real: torch.Tensor,
    d_s_fake: torch.Tensor,
    d_a_real: torch.Tensor,
    d_a_fake: torch.Tensor,
    weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """DARL's discriminator objective (Kim et al., ICLR 2023, Eq. 8 and 12).

    ``L_adv^{D_s} = 1/2 E[(D_s(s^f) - 1)^2] + 1/2 E[D_s(G(eps(x^a); 0))^2]``,
    ``L_adv^{D_a} = 1/2 E[(D_a(x_0^a) - 1)^2] + 1/2 E[D_a(G(eps(x^b); s^f))^2]``,
    ``L^D = weight * (L_adv^{D_a} + L_adv^{D_s})`` (the paper: weight 1).

    Args:
        d_s_real: ``D_s(s^f)``; d_s_fake: ``D_s`` on the (detached) segmentation; d_a_real: ``D_a(x_0^a)``;
            d_a_fake: ``D_a`` on the (detached) synthetic angiogram; each (B, 1, h, w).
        weight: scale of the total, applied before ``backward()``.

    Returns:
        ``loss`` (= L^D), ``d_s`` and ``d_a`` (unweighted).
    """
    d_s = 0.5 * lsgan_loss(d_s_real, True) + 0.5 * lsgan_loss(d_s_fake, False)
    d_a = 0.5 * lsgan_loss(d_a_real, True) + 0.5 * lsgan_loss(d_a_fake, False)
    return {"loss": weight * (d_s + d_a), "d_s": d_s, "d_a": d_a}


def to_unit_range(image: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per image and channel min-max scaling to [-1, 1]: (B, C, H, W) -> (B, C, H, W).

    DARL's images live in [-1, 1] (its generator ends with tanh and ``D_a`` compares real angiograms with
    generated ones); this maps whatever the data module gives (z-scored or raw) there.
    """
    low = image.amin(dim=(-2, -1), keepdim=True)
    high = image.amax(dim=(-2, -1), keepdim=True)
    return (image - low) / (high - low + eps) * 2.0 - 1.0


class DARLModule(SegmentationMethod):
    """DARL (Kim, Oh & Ye, "Diffusion Adversarial Representation Learning for Self-supervised Vessel
    Segmentation", ICLR 2023): vessel masks learnt from unlabelled angiograms, backgrounds and synthetic masks.

    Networks: the diffusion module ``epsilon_theta(x_t, t)`` (any ``forward(x, timesteps)`` module; the config
    uses MONAI's ``DiffusionModelUNet``), the generator ``G`` (:class:`~diffseg_lightning.nets.darl.
    DARLGenerator`, input ``[x_t, epsilon_theta(x_t, t)]``), and the LSGAN discriminators ``D_s`` (masks) and
    ``D_a`` (angiograms). The diffusion is the project's :class:`~diffseg_lightning.diffusion.GaussianKernel`
    (the paper: T = 2000, linear betas 1e-6 .. 1e-2; the kernel rescales linear betas by 1000 / T, so the
    config passes 2e-6 .. 2e-2), with ``objective = epsilon``.

    One training step (manual optimisation; batch: ``image`` = angiograms ``x^a``, ``background`` = ``x^b``,
    ``fake_mask`` = ``s^f`` in {0, 1}; all images mapped to [-1, 1] by :func:`to_unit_range`, ``s^f`` to
    ``2 s^f - 1``):

    - path A: ``t_a ~ U[0, angiogram_max_t)``, ``x^a_t = q(x^a, t_a)``, ``s^v = G([x^a_t, eps(x^a_t, t_a)]; 0)``;
    - path B: ``t_b ~ U[0, T)``, ``x^b_t = q(x^b, t_b)``, ``x_hat^a = G([x^b_t, eps(x^b_t, t_b)]; one_hot(s^f))``;
    - cycle: ``x_hat^a_t = q(x_hat^a, t_a)``, ``s_hat^f = G([x_hat^a_t, eps(x_hat^a_t, t_a)]; 0)``;
    - generator side: ``L^G = L_diff + alpha L_adv^G + beta L_cyc`` (:func:`darl_generator_losses`),
      ``L_diff`` the kernel's epsilon MSE on path B; ``backward``, then the G / eps optimiser steps (the
      discriminators are frozen meanwhile, Lightning's ``toggle_optimizer``);
    - discriminator side: ``L^D`` (:func:`darl_discriminator_losses`) on the detached fakes; ``backward``, then
      the discriminators' optimiser steps.

    Lightning counts one ``global_step`` per optimiser step, so each training batch advances it by 2
    (``trainer.max_steps`` and the step numbers of logs and checkpoints count both optimisers). The LR
    schedulers, if any, step once per batch. The trainer's ``gradient_clip_val`` must be null (Lightning
    refuses it under manual optimisation); ``gradient_clip`` clips each side instead.

    ``alpha`` multiplies ``L_adv^G`` BEFORE ``backward()``, so it really weighs the adversarial gradient
    against ``L_diff`` and ``L_cyc`` (``tests/test_darl.py`` checks the gradient). The released code also
    multiplies the discriminator losses by alpha, but after their ``backward()``, where it changes only the
    logged number; the paper's ``L^D`` has no weight. Ours: ``discriminator_weight`` (default 1, the paper),
    applied before ``backward()``; note that Adam is invariant to a constant loss scale (up to its eps), so
    with the discriminators' own Adam any weight there changes little.

    Inference (validation, test, predict): one pass at t = 0, ``out = G([x, eps(x, 0)]; 0)`` (tanh output),
    ``mask = out > 0``; the probability map is ``(out + 1) / 2`` (so ``sampler.threshold = 0.5`` is the paper's
    rule), S = 1 sample, no iterative reverse process. Images larger than ``tile_size`` are tiled with MONAI's
    :func:`~monai.inferers.sliding_window_inference` (the authors split 512 px into four 256 px images by a
    polyphase subsampling; we tile with ``tile_overlap`` and Gaussian blending instead). Each tile is min-max
    scaled to [-1, 1] on its own, as each training window is.

    Choices where the paper is silent (from the released code, boahK/DARL, as facts; our own code):
    path A's timesteps are drawn from [0, 200) (``angiogram_max_t``), path B's from [0, T); one noise draw is
    shared by paths A, B and the cycle (as released); ``L_diff`` is the squared error the paper writes (the
    released code uses L1 by default); Adam with betas (0.5, 0.999) for both optimisers; the one-hot mask has
    two channels (background, vessel). The released code keeps a pool of 50 past fakes for the
    discriminators (Shrivastava et al. 2017); we do not (the paper does not mention it). Model selection uses
    the validation split only (``val/dice`` in the checkpoint callback), never the test images (the released
    code picks its checkpoint on test images).

    Args:
        diffusion: ``epsilon_theta``: ``forward(x (B, 1, H, W), timesteps (B,)) -> (B, 1, H, W)``.
        generator: ``G``: ``forward(x (B, 2, H, W), segmap (B, 2, H, W) | None) -> (B, 1, H, W)`` in [-1, 1].
        discriminator_mask: ``D_s``: (B, 1, H, W) -> patch scores.
        discriminator_image: ``D_a``: (B, 1, H, W) -> patch scores.
        kernel: a Gaussian kernel with ``objective = "epsilon"``.
        sampler: only ``threshold`` and ``parallel`` apply (one deterministic pass).
        optimizer: partial optimiser for ``epsilon_theta`` and ``G`` together.
        discriminator_optimizer: partial optimiser for ``D_s`` and ``D_a``; None uses ``optimizer``.
        scheduler: partial LR scheduler for both optimisers (stepped every training step), or None.
        alpha: adversarial weight (the paper: 0.2).
        beta: cyclic weight (the paper: 5.0).
        discriminator_weight: scale of ``L^D`` (the paper: 1).
        angiogram_max_t: path A's timesteps are drawn from [0, angiogram_max_t) (released: 200).
        input_channel: for multi-channel images, the channel to use (e.g. 1, the green channel of fundus
            photographs); None averages the channels.
        tile_size: (H, W) or int: inference tiles for larger images; None runs whole images.
        tile_overlap: overlap of the tiles (0 .. 1).
        gradient_clip: clip each optimiser's gradient norm to this (manual optimisation cannot use the
            trainer's ``gradient_clip_val``); None does not clip.
        mask_channels: must be 1.
        spacing: pixel spacing for HD95, or None.
        compile: ``torch.compile`` the generator.
        channels_last: channels-last weights and images.
    """

    network_attr = "generator"

    def __init__(
        self,
        diffusion: nn.Module,
        generator: nn.Module,
        discriminator_mask: nn.Module,
        discriminator_image: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        kernel: GaussianKernel | None = None,
        sampler: DiffusionSampler | None = None,
        discriminator_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        alpha: float = 0.2,
        beta: float = 5.0,
        discriminator_weight: float = 1.0,
        angiogram_max_t: int = 200,
        input_channel: int | None = None,
        tile_size: int | Sequence[int] | None = None,
        tile_overlap: float = 0.25,
        gradient_clip: float | None = None,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        if not isinstance(kernel, GaussianKernel) or kernel.objective != "epsilon":
            raise ConfigError(
                "DARLModule needs a Gaussian kernel with objective=epsilon (noise=gaussian "
                f"noise.objective=epsilon): the generator reads the noise prediction; got {kernel!r}"
            )
        if mask_channels != 1:
            raise ConfigError(
                f"DARLModule segments one vessel channel: mask_channels must be 1, got {mask_channels}"
            )
        for name, value in (("alpha", alpha), ("beta", beta), ("discriminator_weight", discriminator_weight)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"DARLModule: {name} must be a number >= 0, got {value!r}")
        T = kernel.num_train_timesteps
        if (
            isinstance(angiogram_max_t, bool)
            or not isinstance(angiogram_max_t, int)
            or not 1 <= angiogram_max_t <= T
        ):
            raise ConfigError(
                f"DARLModule: angiogram_max_t must be an int in [1, T={T}], got {angiogram_max_t!r}"
            )
        if not 0.0 <= tile_overlap < 1.0:
            raise ConfigError(f"DARLModule: tile_overlap must lie in [0, 1), got {tile_overlap!r}")
        if gradient_clip is not None and not gradient_clip > 0:
            raise ConfigError(f"DARLModule: gradient_clip must be > 0 or None, got {gradient_clip!r}")
        self.automatic_optimization = False
        self.diffusion = diffusion
        self.generator = generator
        self.discriminator_mask = discriminator_mask
        self.discriminator_image = discriminator_image
        self.kernel = kernel
        self.discriminator_optimizer_factory = discriminator_optimizer
        self.alpha, self.beta = float(alpha), float(beta)
        self.discriminator_weight = float(discriminator_weight)
        self.angiogram_max_t = int(angiogram_max_t)
        self.input_channel = input_channel
        self.tile_size = (
            None if tile_size is None else tuple([tile_size] * 2 if isinstance(tile_size, int) else tile_size)
        )
        self.tile_overlap = float(tile_overlap)
        self.gradient_clip = gradient_clip
        self.use_sampler(sampler)

    # ------------------------------------------------------------------------------------ helpers
    def grey(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1, H, W): ``input_channel`` of the image (or the channel mean), in [-1, 1]."""
        if image.dim() != 4:
            raise ConfigError(f"DARLModule expects (B, C, H, W) images, got {tuple(image.shape)}")
        image = image if image.is_floating_point() else image.float()
        if self.input_channel is None:
            image = image.mean(dim=1, keepdim=True)
        else:
            if not 0 <= self.input_channel < image.shape[1]:
                raise ConfigError(
                    f"DARLModule: input_channel={self.input_channel} but the images have {image.shape[1]} channel(s)"
                )
            image = image[:, self.input_channel : self.input_channel + 1]
        return to_unit_range(image)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Path A at t = 0 on grey images, (B, 1, H, W) -> G's tanh output (B, 1, H, W).

        Each image (or tile) is min-max scaled to [-1, 1] here, as every training image or window is, so
        tiles see the intensity range that training windows saw.
        """
        x = self.to_memory_format(to_unit_range(x))
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        eps = self.diffusion(x, t)
        return self.generator(torch.cat([x, eps], dim=1), None)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> G's output (B, 1, H, W) in [-1, 1] (one pass per tile at t = 0)."""
        x = self.grey(image)
        h, w = x.shape[-2:]
        if self.tile_size is not None and (h > self.tile_size[0] or w > self.tile_size[1]):
            return sliding_window_inference(
                x, self.tile_size, 4, self.segment, overlap=self.tile_overlap, mode="gaussian"
            )
        return self.segment(x)

    def example_input(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (image,)

    # ----------------------------------------------------------------------------------- training
    def forward_paths(self, batch: dict) -> dict[str, torch.Tensor]:
        """Paths A, B and the cycle on one training batch (see the class docstring).

        Returns:
            ``angiogram`` x^a and ``fake_mask`` s^f in [-1, 1]; ``segmentation`` (path A), ``synthetic`` (path
            B), ``reconstruction`` (the cycle), each (B, 1, H, W) in [-1, 1]; ``diffusion_loss`` (scalar).
        """
        missing = [key for key in TRAIN_KEYS if key not in batch]
        if missing:
            raise ConfigError(
                f"DARLModule trains on unpaired angiograms, backgrounds and synthetic masks: the training batch "
                f"lacks {missing} (use data=synthetic_angio, data=xcad or data=drive_darl, whose training items "
                "carry image, background and fake_mask)"
            )
        x_a = self.grey(batch["image"])
        x_b = self.grey(batch["background"])
        s_f = batch["fake_mask"].to(x_a.dtype)
        if s_f.shape != x_a.shape or x_b.shape != x_a.shape:
            raise ConfigError(
                f"DARLModule: image {tuple(x_a.shape)}, background {tuple(x_b.shape)} and fake_mask "
                f"{tuple(s_f.shape)} must share (B, 1, H, W)"
            )
        b = x_a.shape[0]
        noise = torch.randn_like(x_a)  # one draw shared by paths A, B and the cycle (the released code's)
        t_a = torch.randint(0, self.angiogram_max_t, (b,), device=x_a.device)
        t_b = self.kernel.sample_timesteps(b, device=x_a.device)
        x_a_t = self.kernel.q_sample(x_a, t_a, noise=noise)
        eps: dict[str, torch.Tensor] = {}

        def both_paths(x_b_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # paths A and B through the diffusion module in one batched pass; L_diff is path B's
            out = self.diffusion(self.to_memory_format(torch.cat([x_a_t, x_b_t])), torch.cat([t_a, t])).to(
                x_a.dtype
            )
            eps["a"], eps["b"] = out[:b], out[b:]
            return eps["b"]

        path_b = diffusion_loss(self.kernel, x_b, both_paths, t=t_b, noise=noise)
        x_b_t, eps_a, eps_b = path_b.x_t, eps["a"], eps["b"]
        segmentation = self.generator(torch.cat([x_a_t, eps_a], dim=1), None)  # path A: s^v
        synthetic = self.generator(torch.cat([x_b_t, eps_b], dim=1), one_hot_mask(s_f))  # path B: x_hat^a
        x_f_t = self.kernel.q_sample(synthetic, t_a, noise=noise)  # cycle: path A on the synthetic angiogram
        eps_f = self.diffusion(self.to_memory_format(x_f_t), t_a).to(x_a.dtype)
        reconstruction = self.generator(torch.cat([x_f_t, eps_f], dim=1), None)
        return {
            "angiogram": x_a,
            "fake_mask": s_f * 2.0 - 1.0,
            "segmentation": segmentation,
            "synthetic": synthetic,
            "reconstruction": reconstruction,
            "diffusion_loss": path_b.terms["mse"],  # L_diff on path B
        }

    def generator_terms(self, paths: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``L^G`` and its terms (:func:`darl_generator_losses`) for the output of :meth:`forward_paths`."""
        return darl_generator_losses(
            paths["diffusion_loss"],
            self.discriminator_mask(paths["segmentation"]),
            self.discriminator_image(paths["synthetic"]),
            paths["reconstruction"],
            paths["fake_mask"],
            self.alpha,
            self.beta,
        )

    def discriminator_terms(self, paths: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``L^D`` and its terms (:func:`darl_discriminator_losses`) on the detached fakes of :meth:`forward_paths`."""
        return darl_discriminator_losses(
            self.discriminator_mask(paths["fake_mask"]),
            self.discriminator_mask(paths["segmentation"].detach()),
            self.discriminator_image(paths["angiogram"]),
            self.discriminator_image(paths["synthetic"].detach()),
            self.discriminator_weight,
        )

    def compute_losses(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(generator terms, discriminator terms)`` of one batch."""
        paths = self.forward_paths(batch)
        return self.generator_terms(paths), self.discriminator_terms(paths)

    def generator_parameters(self) -> list[nn.Parameter]:
        return [*self.diffusion.parameters(), *self.generator.parameters()]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [*self.discriminator_mask.parameters(), *self.discriminator_image.parameters()]

    def configure_optimizers(self) -> Any:
        opt_g = self.optimizer_factory(self.generator_parameters())
        opt_d = (self.discriminator_optimizer_factory or self.optimizer_factory)(
            self.discriminator_parameters()
        )
        if self.scheduler_factory is None:
            return [opt_g, opt_d]
        total = int(self.trainer.estimated_stepping_batches)
        schedulers = [self.scheduler_factory(opt, total_steps=total) for opt in (opt_g, opt_d)]
        return [opt_g, opt_d], schedulers

    def _step(self, optimizer: Any, loss: torch.Tensor) -> None:
        """Backward ``loss`` into ``optimizer``'s parameters only (the others frozen), clip, step."""
        self.toggle_optimizer(optimizer)
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.gradient_clip is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        self.untoggle_optimizer(optimizer)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        opt_g, opt_d = self.optimizers()
        paths = self.forward_paths(batch)
        # generator side: L^G backpropagates through D_s and D_a, whose parameters stay frozen meanwhile
        self.toggle_optimizer(opt_g)
        g_terms = self.generator_terms(paths)
        self.untoggle_optimizer(opt_g)
        self.check_loss(g_terms["loss"], batch_idx)
        self._step(opt_g, g_terms["loss"])
        d_terms = self.discriminator_terms(paths)  # on the detached fakes of this step
        self.check_loss(d_terms["loss"], batch_idx)
        self._step(opt_d, d_terms["loss"])
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                scheduler.step()
        b = batch["image"].shape[0]
        logged = {f"train/{k}": v.detach() for k, v in g_terms.items() if k != "loss"}
        logged.update({f"train/D_{k}": v.detach() for k, v in d_terms.items()})
        self.log_dict(logged, batch_size=b)
        self.log("train/loss", g_terms["loss"].detach(), prog_bar=True, batch_size=b)
        return g_terms["loss"].detach()

    # ------------------------------------------------------------------------ sampling and metrics
    @torch.no_grad()
    def sample(self, image: torch.Tensor, case_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One deterministic pass at t = 0 in the layout every method returns (``case_ids`` is unused).

        Returns:
            ``samples`` (B, 1, 1, H, W) = the probability ``(G + 1) / 2``; ``probability`` (B, 1, H, W);
            ``mask`` = probability > threshold (0.5: the paper's tanh(out) > 0); ``entropy`` (B, 1, H, W), the
            Bernoulli entropy in bits; ``std`` and ``mutual_information``, zero.
        """
        probability = ((self(image).float() + 1.0) / 2.0).clamp(0.0, 1.0)
        return describe_samples(probability.unsqueeze(1), "mean", self.threshold)

    def inference_settings(self) -> dict[str, Any]:
        """What inference really did, in the keys of :meth:`DiffusionSampler.settings` (see the class)."""
        return self.single_pass_settings(
            timestep=0,
            tile_size=list(self.tile_size) if self.tile_size is not None else None,
            tile_overlap=self.tile_overlap if self.tile_size is not None else None,
        )
