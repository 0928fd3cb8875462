"""The one reverse loop of the project, and the one diffusion training step.

Every method that walks a chain (the mask sampler, nuclei augmentation, gland diffusion, weak CDM) calls
:func:`reverse`; every diffusion method's training step calls :func:`diffusion_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from diffseg_lightning.diffusion.base import NoiseKernel
from diffseg_lightning.diffusion.solvers.base import Solver

#: ``denoise(x_t, t) -> model_output``: the network with its condition already bound.
Denoise = Callable[[Tensor, Tensor], Tensor]


class StepRecord(NamedTuple):
    """What :func:`reverse` passes to ``on_step`` after each step ``index`` (``t -> t_prev``, both ``(B,)``):
    the float32 ``model_output`` at ``(x_t, t)``, the step's result ``x_prev`` and ``x0_pred``, and ``x_t``."""

    index: int
    t: Tensor
    t_prev: Tensor
    model_output: Tensor
    x_prev: Tensor
    x0_pred: Tensor
    x_t: Tensor


def reverse(
    kernel: NoiseKernel,
    solver: Solver,
    denoise: Denoise,
    x: Tensor,
    timesteps: Tensor | list[int],
    generator: torch.Generator | None = None,
    final_t_prev: int = -1,
    on_step: Callable[[StepRecord], Tensor | None] | None = None,
) -> Tensor:
    """Walk the chain from ``x`` down the strided ``timesteps`` with ``solver``; return the last ``x0_pred``.

    Step ``i`` goes from ``timesteps[i]`` to ``timesteps[i + 1]`` (``final_t_prev`` after the last, -1: the
    clean mask). The model output is cast to float32 before the solver sees it (the network may run in bf16; a
    float64 chain keeps float64).

    Args:
        kernel: the noise process.
        solver: the reverse update; checked against ``kernel``.
        denoise: ``denoise(x_t, t) -> model_output`` for the whole (B, ...) batch.
        x: the start ``x_{t_K}`` (B, C, ...), e.g. ``kernel.sample_prior``.
        timesteps: the strided steps ``t_K > ... > t_1`` (e.g. ``kernel.inference_timesteps(N)``).
        generator: random generator of the solver's draws.
        final_t_prev: the noise level after the last step (-1: the clean mask).
        on_step: called after every step with a :class:`StepRecord`; a returned tensor replaces ``x_prev``
            (e.g. box renewal), ``None`` keeps it.

    Returns:
        ``x0_pred`` of the last step (B, C, ...); for ``final_t_prev = -1`` this is the sample.
    """
    solver.check_kernel(kernel)
    steps = [int(t) for t in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
    state: dict[str, Tensor] = {}
    x0 = x
    for i, t in enumerate(steps):
        t_prev = steps[i + 1] if i + 1 < len(steps) else final_t_prev
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        t_prev_batch = torch.full((x.shape[0],), t_prev, device=x.device, dtype=torch.long)
        output = denoise(x, t_batch).to(torch.promote_types(x.dtype, torch.float32))
        x_prev, x0 = solver.step(kernel, output, t_batch, t_prev_batch, x, generator=generator, state=state)
        if on_step is not None:
            replaced = on_step(StepRecord(i, t_batch, t_prev_batch, output, x_prev, x0, x))
            if replaced is not None:
                x_prev = replaced
        x = x_prev
    return x0


class DiffusionLoss(NamedTuple):
    """The terms of :meth:`NoiseKernel.loss` and the ``x_t``, ``t`` they were computed at."""

    terms: dict[str, Tensor]
    x_t: Tensor
    t: Tensor


def diffusion_loss(
    kernel: NoiseKernel,
    x0: Tensor,
    denoise: Denoise,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> DiffusionLoss:
    """One diffusion training step's loss: ``t ~ U[0, T)``, ``x_t = q_sample(x0, t)``, ``kernel.loss``.

    Ho et al. (2020), Algorithm 1, for any kernel. The model output is cast to float32 before the loss (float64
    for float64 targets).

    Args:
        kernel: the noise process.
        x0: clean targets in kernel space (B, C, ...).
        denoise: ``denoise(x_t, t) -> model_output`` (the network with its condition bound).
        t: LongTensor (B,) timesteps; drawn uniformly when None.
        noise: the forward noise (shape of ``x0``); drawn by the kernel when None.
        generator: random generator of ``t`` and the noise.

    Returns:
        :class:`DiffusionLoss`: the kernel's loss terms (``terms["loss"]`` is what to minimise), ``x_t``, ``t``.
    """
    if t is None:
        t = kernel.sample_timesteps(x0.shape[0], device=x0.device, generator=generator)
    x_t = kernel.q_sample(x0, t, noise=noise, generator=generator)
    output = denoise(x_t, t).to(torch.promote_types(x0.dtype, torch.float32))
    return DiffusionLoss(kernel.loss(output, x0, x_t, t), x_t, t)
