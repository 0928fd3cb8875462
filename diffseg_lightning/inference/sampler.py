"""Batched multi-sample reverse diffusion for any noise kernel and solver (``diffusion/base.py``,
``diffusion/solvers``): the S samples of every image, fused, with their uncertainty maps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from diffseg_lightning.diffusion.base import Denoiser, NoiseKernel
from diffseg_lightning.diffusion.reverse import StepRecord, reverse
from diffseg_lightning.diffusion.solvers.base import Solver
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.fusion import (
    Fusion,
    check_learned_variance,
    evolution_fusion,
    final_step_log_variance,
    fuse_samples,
)
from diffseg_lightning.inference.uncertainty import mutual_information, predictive_entropy, sample_std

PARALLEL_MODES = ("data", "sample")


def describe_samples(
    samples: torch.Tensor, fusion: str = "mean", threshold: float = 0.5
) -> dict[str, torch.Tensor]:
    """Fuse S samples and map their uncertainty: what every method's inference returns.

    Args:
        samples: (B, S, C, H, W) foreground probabilities.

    Returns:
        ``samples``, fused ``probability`` and ``mask`` (B, C, H, W), and the ``std``, ``entropy`` and
        ``mutual_information`` maps (B, C, H, W; bits).
    """
    probability, mask = fuse_samples(samples, fusion, threshold)
    return {
        "samples": samples,
        "probability": probability,
        "mask": mask,
        "std": sample_std(samples),
        "entropy": predictive_entropy(samples),
        "mutual_information": mutual_information(samples),
    }


def repeat_condition(cond: Any, repeats: int) -> Any:
    """Repeat every batch-first tensor in ``cond`` (a tensor, tuple, list or dict) ``repeats`` times per item."""
    if torch.is_tensor(cond):
        return cond.repeat_interleave(repeats, dim=0)
    if isinstance(cond, tuple | list):
        return type(cond)(repeat_condition(c, repeats) for c in cond)
    if isinstance(cond, dict):
        return {k: repeat_condition(v, repeats) for k, v in cond.items()}
    if cond is None:
        return None
    raise TypeError(f"cannot repeat a condition of type {type(cond).__name__}")


def slice_condition(cond: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every batch-first tensor in ``cond`` (a tensor, tuple, list or dict)."""
    if torch.is_tensor(cond):
        return cond[start:stop]
    if isinstance(cond, tuple | list):
        return type(cond)(slice_condition(c, start, stop) for c in cond)
    if isinstance(cond, dict):
        return {k: slice_condition(v, start, stop) for k, v in cond.items()}
    if cond is None:
        return None
    raise TypeError(f"cannot slice a condition of type {type(cond).__name__}")


def case_generators(seed: int, case_ids: torch.Tensor, device: torch.device) -> list[torch.Generator]:
    """One generator per case, seeded from (seed, case id), so a case's noise does not depend on its batch."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(i)) for i in case_ids.tolist()]


@dataclass
class DiffusionSampler:
    """Draw S masks per image in one batched pass per step, fuse them and map their uncertainty.

    The S samples of the B images run through the network as one (B*S) batch at every step; the
    denoiser's ``encode_condition`` runs once per image and is reused across steps and samples. The chain is
    walked by :func:`~diffseg_lightning.diffusion.reverse.reverse` with :meth:`resolve_solver`'s solver.

    Reproducibility: the prior noise of each case comes from its own generator seeded with
    ``(seed, case id)``, so deterministic solvers (DDIM with eta = 0, DPM-Solver++(2M)) give the same mask for
    a case whatever the batch or process it lands in. Stochastic steps draw from one generator per batch
    (the first case's).

    ``fusion="evolution"`` (MB-Diff, Wang et al., MICCAI 2023; see
    :func:`~diffseg_lightning.inference.fusion.evolution_fusion`) needs a kernel with a learned variance
    (``noise=gaussian noise.learn_variance=true``; anything else is refused with a ``ValueError`` before
    sampling starts). The mean ``mu_i`` of each sample's final step is the ``x0_pred`` that the solver's
    last step returns, and its log-variance ``Sigma_i`` is read from the same network output
    (:func:`~diffseg_lightning.inference.fusion.final_step_log_variance`): no extra network pass. The
    ``z_i`` of ``y_i = mu_i + exp(Sigma_i / 2) z_i`` come from the per-case generators, drawn right after
    the prior, so they too do not depend on the batch or the process. The returned ``samples`` are the
    decoded ``y_i``, and the dict gains ``evolution_uncertainty``, the std of the ``mu_i``.

    Args:
        num_steps: strided inference steps (the kernel's ``inference_timesteps``).
        num_samples: S, samples per image.
        fusion: ``mean``, ``vote``, ``staple`` or ``evolution`` (see :class:`Fusion`).
        threshold: the cut on the fused map (for ``evolution``: ``tau = threshold * S`` unless ``tau`` is set).
        seed: base seed of the per-case generators.
        parallel: under DDP, ``data`` splits the images across processes (the distributed sampler
            does it); ``sample`` gives every process all images and splits their S samples instead,
            gathering them before fusion (needs ``trainer.use_distributed_sampler=false``, which
            ``diffseg-eval`` sets). Both give the same result as one process for deterministic solvers.
        tau: the evolution fusion's voting threshold on ``sum_i y_i`` over the S decoded evolutions, in
            [0, S]; ``None`` (default) gives ``threshold * S``, i.e. ``S / 2`` (a majority) at threshold 0.5.
            Ignored by the other fusions.
        max_batch: the most rows (images x samples) one network pass may take: each step's (B*S) batch
            is split into chunks of at most ``max_batch`` rows, run one after the other, and their outputs
            concatenated before the solver's step, which still runs on the whole batch (so the samples,
            random draws included, are the same whatever the chunking). ``None`` (default): one pass.
        solver: the reverse update (``sampler=ddim|ddpm|dpmpp_2m|bernoulli``); ``None`` (``sampler=default``):
            the kernel's :meth:`~diffseg_lightning.diffusion.base.NoiseKernel.default_solver`.
    """

    num_steps: int = 25
    num_samples: int = 5
    fusion: str = "mean"
    threshold: float = 0.5
    seed: int = 0
    parallel: str = "data"
    tau: float | None = None
    max_batch: int | None = None
    solver: Solver | None = None

    def __post_init__(self) -> None:
        if self.max_batch is not None and (
            isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1
        ):
            raise ConfigError(
                f"sampler.max_batch must be null (one network pass per step) or a positive integer (the most "
                f"rows, images x samples, per network pass), got {self.max_batch!r}"
            )
        Fusion.parse(self.fusion)
        if self.tau is not None and not (
            isinstance(self.tau, int | float) and 0.0 <= self.tau <= self.num_samples
        ):
            raise ConfigError(
                f"sampler.tau must be null or a number in [0, num_samples={self.num_samples}] (a threshold on the "
                f"sum of the S evolutions' votes), got {self.tau!r}"
            )
        if self.parallel not in PARALLEL_MODES:
            raise ConfigError(f"sampler.parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if self.num_steps < 1 or self.num_samples < 1:
            raise ConfigError(
                f"sampler needs num_steps >= 1 and num_samples >= 1, got {self.num_steps}, {self.num_samples}"
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"sampler.threshold must lie in [0, 1], got {self.threshold}")
        if self.solver is not None and not isinstance(self.solver, Solver):
            raise ConfigError(
                f"sampler.solver must be null (the kernel's default) or a solver "
                f"(sampler=ddim|ddpm|dpmpp_2m|bernoulli), got {type(self.solver).__name__}"
            )

    def resolve_solver(self, kernel: NoiseKernel) -> Solver:
        """The solver that walks ``kernel``'s chain: :attr:`solver`, or the kernel's default when it is None.

        Raises:
            ConfigError: the solver does not fit the kernel (it names both and the ``sampler=`` to use).
        """
        solver = kernel.default_solver() if self.solver is None else self.solver
        solver.check_kernel(kernel)
        return solver

    def settings(self, kernel: NoiseKernel | None = None) -> dict[str, Any]:
        """The settings, as written to ``summary.json``'s ``sampler`` block.

        The solver's (:meth:`resolve_solver` with ``kernel``, else :attr:`solver`) ``update`` (its name) and
        ``deterministic``, and its options (e.g. ``{"eta": 0.0, "clip_x0": true}``) under ``solver``; all
        three null without a kernel when :attr:`solver` is None. The keys are the same in every case.
        """
        solver = self.resolve_solver(kernel) if kernel is not None else self.solver
        return {
            "num_steps": self.num_steps,
            "num_samples": self.num_samples,
            "fusion": str(Fusion.parse(self.fusion).value),
            "threshold": self.threshold,
            "seed": self.seed,
            "parallel": self.parallel,
            "tau": self.tau,
            "max_batch": self.max_batch,
            "update": solver.name if solver is not None else None,
            "deterministic": solver.is_deterministic if solver is not None else None,
            "solver": solver.options() if solver is not None else None,
        }

    def _sample_shard(self) -> tuple[int, int]:
        """(rank, world size) over which the S samples are split; (0, 1) unless sample-parallel under DDP."""
        if self.parallel == "sample" and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _denoise(self, denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The network's output for the (N, ...) batch ``x``, in passes of at most ``max_batch`` rows."""
        n = x.shape[0]
        if self.max_batch is None or n <= self.max_batch:
            return denoiser(x, t, cond).float()
        return torch.cat(
            [
                denoiser(
                    x[i : i + self.max_batch],
                    t[i : i + self.max_batch],
                    slice_condition(cond, i, i + self.max_batch),
                ).float()
                for i in range(0, n, self.max_batch)
            ]
        )

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        kernel: NoiseKernel,
        image: torch.Tensor,
        mask_channels: int,
        case_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Sample, fuse and measure uncertainty.

        Args:
            denoiser: the network (:class:`~diffseg_lightning.diffusion.base.Denoiser`).
            kernel: the noise process (:class:`~diffseg_lightning.diffusion.base.NoiseKernel`).
            image: (B, C_img, H, W).
            mask_channels: C, channels of the mask.
            case_ids: (B,) integer ids for the per-case generators; defaults to 0..B-1.

        Returns:
            ``samples`` (B, S, C, H, W) probabilities, ``probability`` and ``mask`` (B, C, H, W) fused,
            ``std``, ``entropy`` and ``mutual_information`` (B, C, H, W) uncertainty maps (bits); with
            ``fusion="evolution"`` also ``evolution_uncertainty`` (B, C, H, W).

        Raises:
            ValueError: ``fusion="evolution"`` with a kernel that has no learned variance; a solver that does
                not fit the kernel.
        """
        solver = self.resolve_solver(kernel)
        evolution = Fusion.parse(self.fusion) is Fusion.EVOLUTION
        if evolution:
            check_learned_variance(kernel)
        b, s = image.shape[0], self.num_samples
        h, w = image.shape[-2:]
        device = image.device
        if case_ids is None:
            case_ids = torch.arange(b)
        generators = case_generators(self.seed, case_ids, device)
        shape = (s, mask_channels, h, w)
        prior = torch.stack(
            [kernel.sample_prior(shape, device=device, generator=g) for g in generators]
        )  # (B, S, C, H, W): every rank draws all S, so a sample's noise does not depend on the rank count
        if evolution:  # z_i of y_i = mu_i + exp(Sigma_i / 2) z_i, per case, before any step draws
            z = torch.stack([torch.randn(shape, device=device, generator=g) for g in generators])
        rank, world = self._sample_shard()
        per_rank = -(-s // world)
        mine = torch.arange(rank * per_rank, (rank + 1) * per_rank, device=device).clamp(max=s - 1)
        cond = repeat_condition(denoiser.encode_condition(image), len(mine))
        timesteps = kernel.inference_timesteps(self.num_steps)
        final: list[torch.Tensor] = []  # the last step's learned log-variance (evolution fusion)

        def keep_final_log_variance(step: StepRecord) -> None:
            if step.index == len(timesteps) - 1:
                final.append(final_step_log_variance(kernel, step.model_output, step.x_t, step.t))

        x0 = reverse(
            kernel,
            solver,
            lambda x_t, t: self._denoise(denoiser, x_t, t, cond),
            prior[:, mine].flatten(0, 1),
            timesteps,
            generator=generators[0],
            on_step=keep_final_log_variance if evolution else None,
        )
        parts = [x0, *final]  # x0 (and the final log-variance)
        parts = [p.reshape(b, len(mine), mask_channels, h, w) for p in parts]
        if world > 1:
            gathered = []
            for part in parts:
                shards = [torch.empty_like(part) for _ in range(world)]
                dist.all_gather(shards, part.contiguous())
                gathered.append(torch.cat(shards, dim=1)[:, :s])  # [:, :s] drops the padding repeats
            parts = gathered
        if not evolution:
            return describe_samples(kernel.decode_mask(parts[0]), self.fusion, self.threshold)
        fused = evolution_fusion(parts[0], parts[1], z, self.tau, self.threshold, kernel.decode_mask)
        samples = fused["samples"]
        return {
            **fused,
            "std": sample_std(samples),
            "entropy": predictive_entropy(samples),
            "mutual_information": mutual_information(samples),
        }
