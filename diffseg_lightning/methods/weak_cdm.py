"""Weakly supervised segmentation with a class-conditional diffusion model (CDM; Hu, Chen, Ho & Shi,
"Conditional Diffusion Models for Weakly Supervised Medical Image Segmentation", MICCAI 2023).

Training sees images and image-level labels only; the mask comes from the derivative of the deterministic
(DDIM) reverse update with respect to the class condition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms.utils import get_largest_connected_component_mask
from skimage.filters import threshold_otsu
from torch import nn

from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.diffusion.reverse import StepRecord, diffusion_loss, reverse
from diffseg_lightning.diffusion.solvers import DDIM
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.sampler import DiffusionSampler, case_generators, describe_samples
from diffseg_lightning.methods.base import SegmentationMethod


def min_max_normalize(saliency: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each image of (B, ...) to [0, 1] by its own minimum and maximum (a constant image gives 0)."""
    flat = saliency.flatten(1)
    low = flat.min(1).values.view(-1, *([1] * (saliency.dim() - 1)))
    high = flat.max(1).values.view(-1, *([1] * (saliency.dim() - 1)))
    span = high - low
    return torch.where(span > eps, (saliency - low) / span.clamp(min=eps), torch.zeros_like(saliency))


def otsu_masks(saliency: torch.Tensor, largest_component: bool = False) -> torch.Tensor:
    """Threshold each map of (B, 1, H, W) with its own Otsu threshold: ``mask = map > threshold_otsu(map)``.

    scikit-image's :func:`skimage.filters.threshold_otsu` (256 bins) per image (one call per image: it has
    no batched form), the convention ``foreground = value > threshold`` of scikit-image and of the released
    code. A constant map has no threshold to find and gives an empty mask. ``largest_component`` keeps only
    the largest connected component of each mask (MONAI's ``get_largest_connected_component_mask``, full
    connectivity), the paper's optional post-processing.

    Returns:
        (B, 1, H, W) float masks in {0, 1}, on the input's device.
    """
    if saliency.dim() != 4 or saliency.shape[1] != 1:
        raise ConfigError(f"otsu_masks expects (B, 1, H, W) maps, got {tuple(saliency.shape)}")
    maps = saliency.detach().float().cpu().numpy()
    out = np.zeros(maps.shape, dtype=np.float32)
    for i, image in enumerate(maps[:, 0]):
        if image.max() <= image.min():
            continue
        mask = image > threshold_otsu(image)
        if largest_component and mask.any():
            mask = np.asarray(get_largest_connected_component_mask(mask[None]))[0]
        out[i, 0] = mask
    return torch.from_numpy(out).to(saliency.device)


def saliency_outputs(saliency: torch.Tensor, largest_component: bool) -> dict[str, torch.Tensor]:
    """The evaluation layout (:func:`describe_samples`) for a (B, 1, H, W) saliency map in [0, 1].

    ``samples`` is the map as S = 1 sample, ``probability`` the map, ``mask`` its per-image Otsu mask
    (:func:`otsu_masks`), ``entropy`` the Bernoulli entropy of the map read as a probability, and ``std``
    and ``mutual_information`` are 0 (one deterministic map).
    """
    out = describe_samples(saliency.unsqueeze(1), "mean", 0.5)
    out["mask"] = otsu_masks(saliency, largest_component).to(out["mask"].dtype)
    return out


class WeakCDMModule(SegmentationMethod):
    """CDM: a class-conditional image DDPM trained on image-level labels; masks from the derivative of the
    DDIM update with respect to the condition (Hu et al., MICCAI 2023).

    Training (Sec. 2.1): the image itself is x_0; ``t ~ U[0, T)``, ``x_t = q_sample(x_0, t)`` and the loss is
    the kernel's (``||eps - eps_theta(x_t, t, y)||^2`` with ``noise.objective=epsilon``), where ``y`` is the
    image-level label (``batch["label"]``, 0 = healthy y0, 1 = lesion y1). The label enters as a learnable
    embedding added to the timestep embedding (:class:`~diffseg_lightning.nets.weak_cdm.ClassConditionalUNet`,
    MONAI's ``DiffusionModelUNet(num_class_embeds=2)``). ``training_step`` reads ``batch["image"]`` and
    ``batch["label"]`` only; the experiments withhold every mask from the training batches
    (``data.withhold``), and ``tests/test_weak_cdm.py`` proves that no mask reaches training.

    Saliency (Sec. 2.2 and the released ``image_p_seg.py``): x_Q = q_sample(x_0, Q) with per-case seeded
    noise; two DDIM chains (eta = 0) start from x_Q, one conditioned on ``e1 = f(y1)``, the other on
    ``e_tau = tau f(y1) + (1 - tau) f(y0)``; at each of the R steps both chains go through the network as ONE
    batch of 2B rows, and ``(x_{t-1}(e1) - x_{t-1}(e_tau)) / (1 - tau)`` (the difference quotient of the
    paper's Eq., the derivative of x_{t-1} w.r.t. the condition as tau -> 1) is accumulated. The sum over
    steps and channels is min-max normalised per image (``probability``) and thresholded per image with
    Otsu (``mask``), optionally keeping its largest connected component.

    Choices the paper leaves open, taken from the released code where it says (facts, not code):

    - Steps: the released code steps one timestep at a time, Q -> Q-1 -> ... -> Q-R (``step_size=1``);
      ``step_size`` > 1 strides (t -> t - step_size); ``Q - R * step_size >= -1`` is required.
    - The first step is taken at t = Q on x_Q (the release noises to 400 and then evaluates the network at
      399 on it, an off-by-one not repeated here).
    - The two chains evolve separately from the shared x_Q (each its own condition), as in the release.
    - The quotient is divided by (1 - tau) as the paper writes it (the release omits the constant factor;
      the min-max normalisation makes the two equal).
    - A signed sum marks the lesion as the high end of the map only where the lesion-class chain makes it
      brighter than the interpolated one; where it makes it darker, Otsu's upper class is the background.
      The paper's choice, kept; ``absolute=true`` is the sign-free alternative.
    - An untrained network (MONAI zero-initialises the output convolution) gives identical chains, a
      constant map and an empty mask.
    - The channel sum is signed (the release's ``diff.sum(1)``); ``absolute=true`` sums magnitudes
      instead (for images whose lesions are brighter in one channel and darker in another).
    - Min-max normalisation and Otsu are per image (the release normalises over its batch of one).
    - Every test image gets the saliency of the lesion class y1 (the paper evaluates on lesion images only;
      the experiments' test splits hold lesion images only, see their headers). The image-level label is
      not used at inference.
    - Classifier guidance (the release's "CG-CDM") is not implemented: the issue asks for CDM.
    - Images are diffused as the DataModule gives them (z-scored per image and channel), so the
      experiments set ``sampler.solver.clip_x0=false`` (clamping x_0 to [-1, 1] would also make the update
      non-affine in the condition).

    What it takes from the Hydra groups: ``kernel`` (the Gaussian kernel: T, schedule, objective) and
    ``sampler`` (``seed``, ``parallel`` and ``solver``, which must be the deterministic DDIM, ``eta = 0``,
    checked; ``summary.json``'s ``sampler`` block reports what was really done: ``num_steps = R`` network
    passes of 2B rows, ``num_samples = 1``, ``fusion = "none"``, ``threshold = "otsu"``, the solver, plus
    ``noise_level``, ``condition_tau``, ``step_size``, ``largest_component``, ``absolute``).

    Args:
        net: ``forward(x_t, t, cond)`` with cond (B,) int labels or (B, K) float class weights.
        kernel: a :class:`~diffseg_lightning.diffusion.GaussianKernel`.
        sampler: the inference recipe (``seed``, ``parallel``, ``solver``: a
            :class:`~diffseg_lightning.diffusion.solvers.DDIM` with ``eta = 0``); None gives seed 0 and the
            kernel's default solver (DDIM, ``eta = 0``).
        optimizer: a partial optimiser, called with the parameters.
        scheduler: a partial LR scheduler, called with ``(optimizer, total_steps=...)``, or None.
        noise_level: Q, the timestep the image is noised to (the paper: 400 of T = 4000); in [0, T).
        num_steps: R, the number of DDIM steps (the paper: 10), >= 1.
        tau: the interpolation weight of the second condition, in (0, 1) (the paper: 0.95).
        step_size: timesteps per DDIM step (the release: 1).
        lesion_class: index of y1 in the class embedding.
        healthy_class: index of y0.
        largest_component: keep the largest connected component of each mask.
        absolute: sum |difference| over channels instead of the signed difference.
        mask_channels: C of the evaluated mask (1: one saliency map per image).
        spacing: pixel spacing for HD95, or None for pixels.
        compile: ``torch.compile`` the network (see :class:`SegmentationMethod`).
        channels_last: channels-last weights and images.

    Shapes:
        ``sample(image)``: image (B, C, H, W) -> the :func:`describe_samples` layout with C_mask = 1;
        ``saliency(image)``: (B, C, H, W) -> (B, 1, H, W) raw accumulated difference quotient (signed).
    """

    network_attr = "net"

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        kernel: GaussianKernel,
        sampler: DiffusionSampler | None = None,
        scheduler: Callable[..., Any] | None = None,
        noise_level: int = 400,
        num_steps: int = 10,
        tau: float = 0.95,
        step_size: int = 1,
        lesion_class: int = 1,
        healthy_class: int = 0,
        largest_component: bool = False,
        absolute: bool = False,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        if mask_channels != 1:
            raise ConfigError(
                f"WeakCDMModule gives one saliency map per image: mask_channels must be 1, got {mask_channels}"
            )
        if not isinstance(kernel, GaussianKernel):
            raise ConfigError(
                f"WeakCDMModule diffuses images with the Gaussian kernel (noise=gaussian), got a {type(kernel).__name__}"
            )
        solver = sampler.resolve_solver(kernel) if sampler is not None else kernel.default_solver()
        if not (isinstance(solver, DDIM) and solver.is_deterministic):
            raise ConfigError(
                "WeakCDMModule's saliency uses the deterministic DDIM update: set sampler=ddim "
                f"sampler.solver.eta=0 (or sampler=default, the Gaussian kernel's DDIM); got {solver!r}"
            )
        T = int(kernel.num_train_timesteps)
        if not 0 <= int(noise_level) < T:
            raise ConfigError(f"noise_level (Q) must be in [0, T={T}), got {noise_level}")
        if int(num_steps) < 1 or int(step_size) < 1:
            raise ConfigError(f"num_steps (R) and step_size must be >= 1, got {num_steps} and {step_size}")
        if int(noise_level) - int(num_steps) * int(step_size) < -1:
            raise ConfigError(
                f"noise_level - num_steps * step_size must be >= -1 (the chain cannot go below x_0); got "
                f"{noise_level} - {num_steps} * {step_size}"
            )
        if not 0.0 < float(tau) < 1.0:
            raise ConfigError(f"tau must be in (0, 1), got {tau}")
        num_classes = int(getattr(net, "num_classes", 2))
        for name, value in (("lesion_class", lesion_class), ("healthy_class", healthy_class)):
            if not 0 <= int(value) < num_classes:
                raise ConfigError(f"{name} must be in [0, {num_classes}), got {value}")
        if lesion_class == healthy_class:
            raise ConfigError("lesion_class and healthy_class must differ")
        self.net = net
        self.kernel = kernel
        #: the deterministic DDIM update whose derivative w.r.t. the condition is the saliency
        self.solver: DDIM = solver
        self.num_classes = num_classes
        self.noise_level = int(noise_level)
        self.num_steps = int(num_steps)
        self.tau = float(tau)
        self.step_size = int(step_size)
        self.lesion_class = int(lesion_class)
        self.healthy_class = int(healthy_class)
        self.largest_component = bool(largest_component)
        self.absolute = bool(absolute)
        self.seed = int(sampler.seed) if sampler is not None and sampler.seed is not None else 0
        self.use_sampler(sampler)  # parallel and the keys; the mask is Otsu's, self.threshold is unused

    # ----------------------------------------------------------------------------------- network
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One network pass: x_t (B, C, H, W), t (B,), cond (B,) labels or (B, K) weights -> (B, C, H, W)."""
        return self.net(self.to_memory_format(x_t), t, cond)

    def example_input(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return image, torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long)

    # ----------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "label" not in batch:
            raise ConfigError(
                "WeakCDMModule trains on image-level labels: the batch has no 'label' (set "
                "data.labels=from_masks for a loader without labels)"
            )
        x0 = batch["image"].float()
        label = batch["label"].reshape(-1).long()
        losses = diffusion_loss(self.kernel, x0, lambda x_t, t: self(x_t, t, label)).terms
        self.check_loss(losses["loss"], batch_idx)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=x0.shape[0])
        return losses["loss"]

    # ------------------------------------------------------------------------------- saliency
    def timesteps(self) -> tuple[list[int], list[int]]:
        """The R steps (t, t_prev): Q, Q - s, ..., Q - (R - 1) s, each to t - s."""
        ts = [self.noise_level - i * self.step_size for i in range(self.num_steps)]
        return ts, [t - self.step_size for t in ts]

    def condition_weights(
        self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """(2B, K) class weights: B rows one-hot y1, then B rows ``tau * onehot(y1) + (1 - tau) * onehot(y0)``."""
        eye = torch.eye(self.num_classes, device=device, dtype=dtype)
        e1 = eye[self.lesion_class]
        mixed = self.tau * e1 + (1.0 - self.tau) * eye[self.healthy_class]
        return torch.cat([e1.expand(batch, -1), mixed.expand(batch, -1)])

    def saliency(
        self, image: torch.Tensor, case_ids: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The accumulated difference quotient summed over channels: (B, C, H, W) -> (B, 1, H, W).

        ``sum_steps (x_{t-1}(x_t, t, e1) - x_{t-1}(x_t', t, e_tau)) / (1 - tau)``, each chain its own state.
        ``noise`` (B, C, H, W) overrides the per-case seeded noise of x_Q.
        """
        b = image.shape[0]
        x0 = image if image.is_floating_point() else image.float()
        if noise is None:
            ids = case_ids if case_ids is not None else torch.arange(b)
            generators = case_generators(self.seed, ids.reshape(-1), x0.device)
            noise = torch.stack(
                [torch.randn(x0.shape[1:], device=x0.device, generator=g, dtype=x0.dtype) for g in generators]
            )
        x_q = self.kernel.q_sample(x0, self.noise_level, noise=noise)
        cond = self.condition_weights(b, x0.device, x0.dtype)
        diff = torch.zeros_like(x_q)

        def difference_quotient(step: StepRecord) -> None:
            nonlocal diff
            diff = diff + (step.x_prev[:b] - step.x_prev[b:]) / (1.0 - self.tau)

        starts, ends = self.timesteps()
        reverse(
            self.kernel,
            self.solver,
            lambda x, t: self(x, t, cond),  # both chains as one batch of 2B rows
            torch.cat([x_q, x_q]),
            starts,
            final_t_prev=ends[-1],
            on_step=difference_quotient,
        )
        reduced = diff.abs() if self.absolute else diff
        return reduced.sum(1, keepdim=True)

    @torch.no_grad()
    def sample(self, image: torch.Tensor, case_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Saliency (min-max normalised per image) and its Otsu mask, in the layout every method returns."""
        return saliency_outputs(min_max_normalize(self.saliency(image, case_ids)), self.largest_component)

    def inference_settings(self) -> dict[str, Any]:
        """What inference did, in the keys of :meth:`DiffusionSampler.settings` plus CDM's own."""
        return self.single_pass_settings(
            num_steps=self.num_steps,
            threshold="otsu",
            seed=self.seed,
            noise_level=self.noise_level,
            condition_tau=self.tau,
            step_size=self.step_size,
            num_train_timesteps=int(self.kernel.num_train_timesteps),
            largest_component=self.largest_component,
            absolute=self.absolute,
            network_passes=self.num_steps,
            rows_per_pass="2 x images",
            update=self.solver.name,
            solver=self.solver.options(),
        )


__all__ = ["WeakCDMModule", "min_max_normalize", "otsu_masks", "saliency_outputs"]
