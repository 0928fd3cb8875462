"""Noise kernels, their solvers and the one reverse loop (no networks, no Lightning, no Hydra).

Every kernel follows the noise-kernel contract of :class:`~diffseg_lightning.diffusion.base.NoiseKernel` (the
noise process); every solver the contract of :class:`~diffseg_lightning.diffusion.solvers.Solver` (one reverse
update); :func:`~diffseg_lightning.diffusion.reverse.reverse` walks a chain with them.
"""

from __future__ import annotations

from diffseg_lightning.diffusion.base import Denoiser, NoiseKernel
from diffseg_lightning.diffusion.bernoulli import BernoulliKernel
from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.diffusion.schedules import make_beta_schedule
from diffseg_lightning.diffusion.solvers import DDIM, DDPM, SOLVERS, BernoulliPosterior, DPMSolverPP2M, Solver

__all__ = [
    "DDIM",
    "DDPM",
    "SOLVERS",
    "BernoulliKernel",
    "BernoulliPosterior",
    "DPMSolverPP2M",
    "Denoiser",
    "GaussianKernel",
    "NoiseKernel",
    "Solver",
    "make_beta_schedule",
]
